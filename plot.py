"""A run's curves, from the files train.py writes in its --out folder, as one PNG.

    python plot.py runs/coca-tiny                     # -> runs/coca-tiny/curves.png
    python plot.py runs/coca-tiny --out curves.png
    python plot.py runs/cap runs/tok runs/mlm --out overlay.png   # several runs, overlaid

One run: two panels, the loss terms over steps (progress.jsonl, one record per progress line)
and the evaluation metrics over steps (metrics.jsonl: the periodic val evaluations as lines, the
final test one as a star). Several runs: one panel per loss term or metric that every run has,
one colour per run, the legend naming each run by its folder (a VirTex pretext ablation: the
total loss and the linear probe side by side; terms only some runs have are named and left out).

It reads those two JSON-lines files and nothing else: no paper module, no torch. matplotlib is
optional (pip install matplotlib) and draws with its Agg backend, without a display. What cannot
be drawn is one line, never a traceback: a missing folder, a folder without either file, files
without records, runs with nothing in common; a malformed line is skipped, and counted.
"""

import argparse
import json
import math
import sys
from pathlib import Path

# The numbers of a progress record that are no loss term (shared.monitor.THROUGHPUT's keys and
# the learning rate): not drawn. Kept here so that plot.py does not import torch.
NOT_LOSSES = {"lr", "steps_per_s", "examples_per_s", "tokens_per_s", "mfu"}
FILES = ("progress.jsonl", "metrics.jsonl")
SINGLE_SIZE, DPI = (12.0, 4.5), 100  # inches, dots per inch: a 1200 x 450 PNG for one run
PANEL_SIZE, COLUMNS = (5.0, 3.5), 3  # each panel of an overlay, at most 3 panels a row
MATPLOTLIB_MISSING = "error: plot.py needs matplotlib: pip install matplotlib"


class PlotError(ValueError):
    """What keeps a figure from being drawn; the message is the one line the user sees."""


def read_records(path: Path) -> tuple[list[dict], int]:
    """(The records of a JSON-lines file, the number of lines that are not one): a record is a
    JSON object with an integer "step" and a string "split". Blank lines are not counted."""
    records, malformed = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            malformed += 1
            continue
        if (isinstance(record, dict) and isinstance(record.get("step"), int)
                and isinstance(record.get("split"), str)):
            records.append(record)
        else:
            malformed += 1
    return records, malformed


def curves(records: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{split: {name: [(step, value), ...]}} of the numbers to draw: on "train" the loss terms,
    on the other splits the metrics; integers are counts (images, pairs scored), not drawn, and
    neither are NaN or inf. A step that goes back within a split (a resumed run writing again the
    steps that a crashed one wrote past its checkpoint, or a new run in the same folder) drops
    the records of that split from that step on: the last run's numbers are drawn, as
    TensorBoard's purge shows them."""
    kept: dict[str, list[dict]] = {}
    for record in records:
        split = kept.setdefault(record["split"], [])
        if split and record["step"] <= split[-1]["step"]:
            split[:] = [r for r in split if r["step"] < record["step"]]
        split.append(record)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for split, rows in kept.items():
        for row in rows:
            for name, value in row.items():
                if not isinstance(value, float) or not math.isfinite(value):
                    continue
                if split == "train" and name in NOT_LOSSES:
                    continue
                out.setdefault(split, {}).setdefault(name, []).append((row["step"], value))
    return out


def read_run(folder: Path, warn=lambda line: print(line, file=sys.stderr)) -> dict:
    """curves() of a train.py --out folder (its progress.jsonl and metrics.jsonl, either may be
    missing); PlotError when there is nothing to draw. Malformed lines: one warning a file."""
    if not folder.is_dir():
        raise PlotError(f"{folder}: no such folder")
    present = [folder / name for name in FILES if (folder / name).is_file()]
    if not present:
        raise PlotError(f"{folder} has no {' or '.join(FILES)}: not a train.py --out folder")
    records, skipped = [], 0
    for path in present:
        try:
            more, malformed = read_records(path)
        except OSError as e:
            raise PlotError(f"could not read {path}: {e.strerror or e}") from None
        if malformed:
            warn(f"warning: {path}: {malformed} malformed line{'s' * (malformed > 1)} skipped")
        records, skipped = records + more, skipped + malformed
    drawn = curves(records)
    if not drawn:
        why = f"{skipped} malformed lines, " if skipped else ""
        raise PlotError(f"{folder}: nothing to draw in {' and '.join(p.name for p in present)} "
                        f"({why}{len(records)} records with a step and a split)")
    return drawn


def run_names(folders: list[Path]) -> list[str]:
    """Each run's label: its folder's name, or the path as given where two names are equal."""
    names = [f.resolve().name or str(f) for f in folders]
    labels = [name if names.count(name) == 1 else str(f) for name, f in zip(names, folders)]
    return [label if label not in labels[:i] else f"{label} ({labels[:i].count(label) + 1})"
            for i, label in enumerate(labels)]  # a folder named twice is drawn twice


def new_figure(size: tuple[float, float]):
    """A matplotlib Figure on the Agg canvas (no pyplot: no display, no global figure list)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def palette(n: int) -> list:
    """n distinct colours: matplotlib's tab10, or tab20 beyond 10 (a run has 13 metrics)."""
    from matplotlib import colormaps

    colours = colormaps["tab10" if n <= 10 else "tab20"]
    return [colours(i % colours.N) for i in range(n)]


def style_axes(ax, title: str) -> None:
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    ax.grid(alpha=0.3)


def draw_evaluations(ax, run: dict, color_of, labelled: bool) -> None:
    """Each metric of `run` ({split: {name: points}}) in its colour, color_of(name): the val
    points as a line, the test point(s) as stars; with `labelled`, one legend entry a metric."""
    named = set()
    for split, marker, style in (("val", "o", "-"), ("test", "*", "none")):
        for name, points in run.get(split, {}).items():
            label = name if labelled and name not in named else None
            named.add(name)
            ax.plot(*zip(*points), marker=marker, linestyle=style, color=color_of(name),
                    markersize=10 if marker == "*" else 4, label=label)


def draw_run(run: dict, title: str):
    """One run: the loss terms (left) and the evaluation metrics (right) over steps."""
    figure = new_figure(SINGLE_SIZE)
    losses, evaluations = figure.subplots(1, 2)
    for name, points in run.get("train", {}).items():
        losses.plot(*zip(*points), label=name)
    names = dict.fromkeys(n for split in ("val", "test") for n in run.get(split, {}))
    colours = dict(zip(names, palette(len(names))))
    draw_evaluations(evaluations, run, colours.get, labelled=True)
    for ax, what, empty in ((losses, "loss terms (progress.jsonl)", "no progress records"),
                            (evaluations, "evaluations (metrics.jsonl): val -o-, test *",
                             "no evaluation records")):
        style_axes(ax, what)
        entries = len(ax.get_legend_handles_labels()[1])
        if entries:
            ax.legend(fontsize="x-small", ncol=2 if entries > 8 else 1)
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    figure.suptitle(title)
    return figure


def panel_keys(run: dict) -> list[tuple[str, str]]:
    """("train", term) for each loss term, then ("eval", name) for each metric, in the order
    the run's records list them (the total "loss" first)."""
    evaluated = dict.fromkeys(n for split in run if split != "train" for n in run[split])
    return [("train", n) for n in run.get("train", {})] + [("eval", n) for n in evaluated]


def draw_overlay(runs: dict[str, dict], warn=lambda line: print(line, file=sys.stderr)):
    """Several runs ({label: curves}): one panel per loss term or metric that every run has, a
    colour per run, a legend naming the runs. PlotError when they have none in common."""
    listed = [panel_keys(run) for run in runs.values()]
    common = set.intersection(*map(set, listed))
    if not common:
        raise PlotError(f"{', '.join(runs)}: no loss term or metric in common")
    left_out = sorted({name for keys in listed for _, name in keys} - {n for _, n in common})
    if left_out:
        warn(f"note: not in every run, not drawn: {', '.join(left_out)}")
    panels = [key for key in dict.fromkeys(k for keys in listed for k in keys) if key in common]
    columns = min(COLUMNS, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = new_figure((PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows))
    from matplotlib.lines import Line2D  # (new_figure has checked that matplotlib is there)

    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colours = palette(len(runs))
    for ax, (kind, name) in zip(axes, panels):
        for colour, run in zip(colours, runs.values()):
            if kind == "train":
                ax.plot(*zip(*run["train"][name]), color=colour)
            else:
                draw_evaluations(ax, {split: {name: run[split][name]} for split in run
                                      if split != "train" and name in run[split]},
                                 lambda _, colour=colour: colour, labelled=False)
        style_axes(ax, name if kind == "train" else f"{name} (val -o-, test *)")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colour, label=label) for colour, label in zip(colours, runs)]
    figure.legend(handles=handles, loc="outside lower center", ncol=min(len(runs), 5))
    return figure


def plot(folders: list[Path], out: Path):
    """Read the runs, draw them (one: draw_run; several: draw_overlay), write `out`; returns the
    figure. PlotError (a one-line message) when that cannot be done."""
    names = run_names(folders)
    runs = {name: read_run(folder) for name, folder in zip(names, folders)}
    figure = draw_run(runs[names[0]], names[0]) if len(runs) == 1 else draw_overlay(runs)
    try:
        figure.savefig(out, format="png")  # whatever the suffix of its name, a PNG
    except OSError as e:
        raise PlotError(f"could not write {out}: {e.strerror or e}") from None
    return figure


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Draw the loss terms and evaluation metrics of "
                                     "one train.py run, or overlay several runs, as a PNG.")
    parser.add_argument("runs", nargs="+", type=Path, help="train.py --out folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG (default: RUN/curves.png for one run, overlay.png for "
                             "several)")
    args = parser.parse_args(argv)
    out = args.out or (args.runs[0] / "curves.png" if len(args.runs) == 1 else Path("overlay.png"))
    try:
        plot(args.runs, out)
    except PlotError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
