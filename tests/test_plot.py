"""plot.py: a run's progress.jsonl and metrics.jsonl drawn as one PNG, several runs overlaid,
and every file it cannot draw refused in one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import plot
import train
from shared.monitor import THROUGHPUT

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("zero_shot_acc", "i2t_r1", "cider", "linear_probe_acc")


def write_run(folder: Path, terms=("loss", "contrastive", "captioning"), metrics=METRICS,
              steps=range(1, 21), eval_every=5) -> Path:
    """A run folder as train.py writes it: a progress record a step, a val evaluation every
    eval_every steps, the test one at the last step (with a count, as --val_data gives)."""
    folder.mkdir(parents=True)
    with open(folder / "progress.jsonl", "w") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "split": "train", **{
                t: 5.0 / (i + 1) + 1.0 / step for i, t in enumerate(terms)}, "lr": 1e-4 * step,
                "steps_per_s": 2.5, "examples_per_s": 160.0, "tokens_per_s": 1300.0}) + "\n")
    with open(folder / "metrics.jsonl", "w") as f:
        for step in [*steps[eval_every - 1:-1:eval_every], steps[-1]]:
            split = "test" if step == steps[-1] else "val"
            f.write(json.dumps({"step": step, "split": split, "images": 40,
                                **{m: 0.02 * step + 0.1 * i for i, m in enumerate(metrics)}})
                    + "\n")
    return folder


def ink(png: Path) -> float:
    """The fraction of pixels that are not the white background."""
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return float((np.abs(pixels - 255).sum(axis=2) > 30).mean())


def test_one_run_is_two_panels_of_curves_in_a_png(tmp_path, capsys):
    run = write_run(tmp_path / "coca-tiny")
    out = plot.main([str(run)])
    assert out == run / "curves.png" and f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (1200, 450)  # plot.SINGLE_SIZE at plot.DPI
    assert ink(out) > 0.03
    figure = plot.plot([run], tmp_path / "again.png")
    losses, evaluations = figure.axes
    assert [line.get_label() for line in losses.lines] == ["loss", "contrastive", "captioning"]
    assert [text.get_text() for text in evaluations.get_legend().get_texts()] == list(METRICS)
    # val points as lines (3 periodic evaluations), the test one as a star at the last step
    val, test = evaluations.lines[0], evaluations.lines[len(METRICS)]
    assert list(val.get_xdata()) == [5, 10, 15] and list(test.get_xdata()) == [20]
    assert test.get_marker() == "*"
    assert not {"lr", "images", "steps_per_s"} & {l.get_label() for l in figure.axes[0].lines}


def test_several_runs_overlay_their_common_terms_with_a_legend_of_runs(tmp_path, capsys):
    """A VirTex pretext ablation: each pretext has its own loss terms; the total loss and the
    linear probe are drawn, one panel each, one line a run; the others are named, not drawn."""
    probe = ("linear_probe_acc",)
    runs = [write_run(tmp_path / "captioning", ("loss", "captioning_forward"), probe),
            write_run(tmp_path / "token_classification", ("loss", "token_classification"), probe,
                      steps=range(1, 31)),
            write_run(tmp_path / "masked_lm", ("loss", "masked_lm"), probe)]
    out = tmp_path / "overlay.png"
    figure = plot.plot(runs, out)
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend == ["captioning", "token_classification", "masked_lm"]
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["loss", "linear_probe_acc (val -o-, test *)"]
    assert len(visible[0].lines) == 3  # one loss curve a run
    assert max(visible[0].lines[1].get_xdata()) == 30
    assert "not drawn: captioning_forward, masked_lm, token_classification" in \
        capsys.readouterr().err
    assert Image.open(out).size == (1000, 350)  # 2 panels of plot.PANEL_SIZE
    assert ink(out) > 0.03
    assert plot.main([*map(str, runs), "--out", str(tmp_path / "cli.png")]) == \
        tmp_path / "cli.png"


def test_runs_with_the_same_folder_name_are_labelled_by_their_paths(tmp_path):
    a = write_run(tmp_path / "a" / "run")
    b = write_run(tmp_path / "b" / "run")
    assert plot.run_names([a, b]) == [str(a), str(b)]
    assert plot.run_names([a, a]) == [str(a), f"{a} (2)"]
    assert plot.run_names([a, b / ".."]) == ["run", "b"]


def test_a_restarted_run_draws_its_last_numbers_for_each_step():
    """A crashed run wrote steps 1-5, its checkpoint was at step 3: the resumed run writes 4-6
    again. A step that goes back drops what that split had from it on."""
    records = ([{"step": s, "split": "train", "loss": 10.0 + s} for s in range(1, 6)]
               + [{"step": 4, "split": "val", "acc": 0.1}]
               + [{"step": s, "split": "train", "loss": 1.0 + s} for s in range(4, 7)]
               + [{"step": 4, "split": "val", "acc": 0.2}])
    curves = plot.curves(records)
    assert curves["train"]["loss"] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 5.0), (5, 6.0),
                                       (6, 7.0)]
    assert curves["val"]["acc"] == [(4, 0.2)]


def test_malformed_lines_are_skipped_and_counted(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "split": "val", "cider": 0.5\n'  # cut short
                '[1, 2]\n'  # not an object
                '{"step": "x", "split": "val"}\n'  # no integer step
                '\n')  # blank: not counted
    plot.main([str(run), "--out", str(tmp_path / "out.png")])
    assert f"warning: {run / 'metrics.jsonl'}: 3 malformed lines skipped" in \
        capsys.readouterr().err
    assert (tmp_path / "out.png").is_file()


def run_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stopped:
        plot.main([*map(str, args)])
    assert isinstance(stopped.value.code, str) and "\n" not in stopped.value.code
    return stopped.value.code


def test_what_cannot_be_drawn_is_one_line(tmp_path, capsys):
    assert run_error(capsys, tmp_path / "nowhere") == \
        f"error: {tmp_path / 'nowhere'}: no such folder"
    (tmp_path / "bare").mkdir()
    assert run_error(capsys, tmp_path / "bare") == (
        f"error: {tmp_path / 'bare'} has no progress.jsonl or metrics.jsonl: not a train.py "
        f"--out folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert run_error(capsys, tmp_path / "empty") == (
        f"error: {tmp_path / 'empty'}: nothing to draw in metrics.jsonl (0 records with a step "
        f"and a split)")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "progress.jsonl").write_text("not json\n{\n")
    (tmp_path / "garbled" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00\n")
    assert run_error(capsys, tmp_path / "garbled") == (
        f"error: {tmp_path / 'garbled'}: nothing to draw in progress.jsonl and metrics.jsonl "
        f"(3 malformed lines, 0 records with a step and a split)")
    a = write_run(tmp_path / "a", ("contrastive",), ("cider",))
    b = write_run(tmp_path / "b", ("masked_lm",), ("vqa_acc",))
    assert run_error(capsys, a, b, "--out", tmp_path / "o.png") == \
        "error: a, b: no loss term or metric in common"
    assert run_error(capsys, a, "--out", tmp_path / "no_such_folder" / "o.png").startswith(
        f"error: could not write {tmp_path / 'no_such_folder' / 'o.png'}: ")


def test_without_matplotlib_one_line(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert run_error(capsys, run) == "error: plot.py needs matplotlib: pip install matplotlib"


def test_the_numbers_that_are_no_loss_term_are_the_progress_line_s():
    assert plot.NOT_LOSSES == set(THROUGHPUT) | {"lr"}


def test_plot_imports_neither_torch_nor_a_paper_file(tmp_path):
    run = write_run(tmp_path / "run")
    code = (f"import sys, plot\nplot.main([{str(run)!r}])\n"
            "loaded = {'torch', 'shared', 'coca', 'virtex', 'uniter', 'oscar'} & set(sys.modules)\n"
            "print(sorted(loaded))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_real_run_s_files_draw(tmp_path):
    """A few steps of a small CoCa and its final evaluation: its own files, drawn. (A periodic
    evaluation would add seconds of linear probe: the synthetic runs above have those.)"""
    small = ["--batch_size", "4", "--vision_width", "32", "--vision_heads", "2",
             "--vision_layers", "1", "--text_width", "32", "--text_heads", "2",
             "--unimodal_layers", "1", "--multimodal_layers", "1", "--n_caption_queries", "4",
             "--embed_dim", "16", "--max_text_len", "12", "--vocab_size", "200",
             "--image_size", "32", "--tokenizer_texts", "50", "--num_workers", "0",
             "--log_every_s", "0", "--final_n", "8", "--max_steps", "4",
             "--out", str(tmp_path / "run")]
    run, paper, overrides = train.parse_args(small)
    train.train(run, paper, overrides, log=lambda line: None)
    figure = plot.plot([tmp_path / "run"], tmp_path / "run.png")
    losses, evaluations = figure.axes
    assert {line.get_label() for line in losses.lines} == {"loss", "contrastive", "captioning"}
    assert list(losses.lines[0].get_xdata()) == [1, 2, 3, 4]
    names = {text.get_text() for text in evaluations.get_legend().get_texts()}
    assert {"zero_shot_acc", "cider", "linear_probe_acc"} <= names
    assert {tuple(line.get_xdata()) for line in evaluations.lines} == {(4,)}  # the test stars
    assert ink(tmp_path / "run.png") > 0.03
