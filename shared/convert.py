"""Convert the official region-feature files to our per-image .npz (shared.folders.RegionFolder).

Official code: github.com/ChenRocks/UNITER (its npz) and github.com/microsoft/Oscar (its TSV).

    python -m shared.convert uniter-npz SRC_DIR DST_DIR
    python -m shared.convert oscar-tsv FEATURES_TSV DST_DIR --labels LABELS_TSV

Our format (the one shared.folders.RegionFolder reads and shared.world.export_split writes),
one DST_DIR/<image>.npz per image:

    features (N, F) float16, rows sorted by conf, highest first
    boxes    (N, 4) float32, x1/W, y1/H, x2/W, y2/H in [0, 1]
    conf     (N,) float32
    cls_prob (N, C) float16, optional (UNITER's soft labels, background at column 0)
    tags     (K,) str, optional (Oscar's object tags, detection order)

UNITER's npz (its BUTD extraction script): features (N, 2048), norm_bb (N, 6) = x1/W, y1/H,
x2/W, y2/H, w/W, h/H, conf (N, 1), soft_labels (N, 1601); all float16. -> boxes = the first four
columns of norm_bb, conf flattened, cls_prob = soft_labels.

Oscar's TSV pair (its captioning layout): a feature row `img_key <TAB> {"num_boxes": N,
"features": base64 of float32 (N, F + 6)}`, the last six columns being x1, y1, x2, y2, w, h as
fractions; and a label row `img_key <TAB> [{"class": name, "conf": c, "rect": [...]}, ...]`.
-> features = all but the last six columns, boxes = the next four, tags = the label classes in
their order. The feature rows hold no confidence (and the labels may come from another detector,
not aligned with the boxes): conf is 1 for every region, which keeps the stored order.

Every file written lies in DST_DIR. UNITER's files keep their names (plain names, from listing
SRC_DIR). An Oscar img_key becomes the name <img_key>.npz, so a key that could name a file
elsewhere (one holding a path separator, / or \\, or "..", or an empty key) is refused: a
warning names it, the row is skipped and counted. A key seen before is a duplicate: its first
row is kept, the later ones are skipped with a warning and counted. A missing source (or one
with nothing to convert) is a one-line error and exit status 1.
"""

import argparse
import base64
import json
import warnings
from pathlib import Path

import numpy as np

from shared.folders import inside


def sort_by_conf(regions: dict) -> dict:
    """The region arrays with their rows sorted by conf, highest first (stable); tags untouched."""
    order = np.argsort(-regions["conf"], kind="stable")
    return {k: (v if k == "tags" else v[order]) for k, v in regions.items()}


def from_uniter_npz(npz) -> dict:
    """UNITER's per-image arrays -> ours (see the module docstring)."""
    for key in ("features", "norm_bb", "conf"):
        if key not in npz:
            raise ValueError(f"not a UNITER feature file: no {key!r}")
    regions = {"features": np.asarray(npz["features"], dtype=np.float16),
               "boxes": np.asarray(npz["norm_bb"], dtype=np.float32)[:, :4],
               "conf": np.asarray(npz["conf"], dtype=np.float32).reshape(-1)}
    if "soft_labels" in npz:
        regions["cls_prob"] = np.asarray(npz["soft_labels"], dtype=np.float16)
    return sort_by_conf(regions)


def from_oscar_rows(feature_field: str, label_field: str | None,
                    feature_dim: int | None = None) -> dict:
    """One image's Oscar TSV fields (the JSON after img_key) -> ours. feature_dim, if given, is
    checked against the row (F + 6 columns), which catches a float16/float32 mix-up (a row then
    decodes to half or twice the expected width)."""
    record = json.loads(feature_field)
    n = int(record["num_boxes"])
    flat = np.frombuffer(base64.b64decode(record["features"]), dtype=np.float32)
    if n == 0 or flat.size % n:
        raise ValueError(f"{flat.size} floats do not split into {n} boxes")
    rows = flat.reshape(n, -1)  # (N, F + 6)
    if feature_dim is not None and rows.shape[1] != feature_dim + 6:
        raise ValueError(f"rows of {rows.shape[1]} floats, expected {feature_dim} + 6: was the "
                         f"file written as float32?")
    regions = {"features": rows[:, :-6].astype(np.float16),
               "boxes": rows[:, -6:-2].astype(np.float32),
               "conf": np.ones(n, dtype=np.float32)}
    if label_field is not None:
        regions["tags"] = np.array([str(obj["class"]) for obj in json.loads(label_field)],
                                   dtype=np.str_).reshape(-1)
    return regions


def write_npz(path: Path, regions: dict) -> None:
    """Write atomically (a temporary file, then a rename): a stopped conversion leaves no half
    file that the loader would have to skip."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **regions)
    tmp.replace(path)


def convert_uniter_dir(src: Path, dst: Path) -> int:
    """Every SRC/*.npz -> DST/<same name>; the number written."""
    if not src.is_dir():
        raise FileNotFoundError(f"no UNITER feature folder {src}")
    files = sorted(src.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz file in {src}")
    dst.mkdir(parents=True, exist_ok=True)
    n = 0
    for file in files:
        with np.load(file) as npz:
            write_npz(dst / file.name, from_uniter_npz(npz))
        n += 1
    return n


def unsafe_key(key: str) -> bool:
    """An Oscar img_key that may not become a file name: empty, or holding a path separator
    (/ or \\, whatever the system) or "..", which could name a file outside the output
    folder."""
    return not key or "/" in key or "\\" in key or ".." in key


def convert_oscar_tsv(features_tsv: Path, labels_tsv: Path | None, dst: Path,
                      feature_dim: int | None = None) -> tuple[int, int, int]:
    """Each feature row -> DST/<img_key>.npz. Returns (files written, rows refused for their
    key, rows skipped as a repeated key); see the module docstring."""
    if not features_tsv.is_file():
        raise FileNotFoundError(f"no Oscar feature TSV {features_tsv}")
    if labels_tsv is not None and not labels_tsv.is_file():
        raise FileNotFoundError(f"no Oscar label TSV {labels_tsv}")
    dst.mkdir(parents=True, exist_ok=True)
    labels = {}
    if labels_tsv is not None:
        for line in labels_tsv.read_text().splitlines():
            key, _, field = line.partition("\t")
            labels[key] = field
    written, refused, duplicates, seen = 0, 0, 0, set()
    with open(features_tsv) as f:
        for n, line in enumerate(f, start=1):
            key, _, field = line.rstrip("\n").partition("\t")
            if not key and not field:
                continue  # a blank line
            if unsafe_key(key):
                refused += 1
                warnings.warn(f"{features_tsv}, line {n}: img_key {key!r} could name a file "
                              f"outside {dst}; row skipped")
                continue
            if key in seen:
                duplicates += 1
                warnings.warn(f"{features_tsv}, line {n}: img_key {key!r} repeats an earlier "
                              f"row; the first is kept")
                continue
            seen.add(key)
            path = inside(dst, f"{key}.npz", f"{features_tsv}, line {n}")
            write_npz(path, from_oscar_rows(field, labels.get(key), feature_dim))
            written += 1
    return written, refused, duplicates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    u = sub.add_parser("uniter-npz", help="a folder of UNITER's per-image npz")
    u.add_argument("src", type=Path)
    u.add_argument("dst", type=Path)
    o = sub.add_parser("oscar-tsv", help="Oscar's feature TSV and label TSV")
    o.add_argument("features", type=Path)
    o.add_argument("dst", type=Path)
    o.add_argument("--labels", type=Path, default=None, help="the label TSV (the tags)")
    o.add_argument("--feature_dim", type=int, default=None, help="check the rows' width (2048)")
    args = parser.parse_args(argv)
    try:
        skipped = ""
        if args.kind == "uniter-npz":
            n = convert_uniter_dir(args.src, args.dst)
        else:
            n, refused, duplicates = convert_oscar_tsv(args.features, args.labels, args.dst,
                                                       args.feature_dim)
            skipped = (f"; skipped {refused} rows whose img_key could name a file outside it "
                       f"and {duplicates} rows repeating an earlier img_key")
            if not n:
                raise ValueError(f"{args.features}: no row converted{skipped}")
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {type(e).__name__}: {e}") from None
    print(f"wrote {n} region files to {args.dst}{skipped}")


if __name__ == "__main__":
    main()
