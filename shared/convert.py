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
elsewhere (one holding a path separator, / or \\, or "..", a NUL, an empty key, or one too long
for a file name) is refused: a warning names it, the row is skipped and counted. A key seen
before is a duplicate: its first converted row is kept, the later ones are skipped with a
warning and counted.

Every file written is first checked as shared.folders.RegionFolder reads it
(shared.folders.region_arrays: finite numbers, boxes in [0, 1] with x1 <= x2, y1 <= y2, at
least one region and one feature), so the converter never writes a file training would skip.
What is wrong with the input is dealt with as follows:
    * one item that cannot be converted, an Oscar feature row (no tab after the key, not UTF-8,
      not a JSON object, num_boxes missing or not an integer >= 1, features not base64 or not
      a whole number of float32 rows of num_boxes, rows of fewer than 1 + 6 columns, values
      past float16's range) or a UNITER file (no .npz, a missing key, arrays of the wrong
      shape or type: norm_bb of fewer than 4 columns, conf or soft_labels not one per
      region): a warning naming the file (and the line) and what is wrong; the item is
      skipped and counted in the summary line. An Oscar label row is checked when its
      feature row is converted (a JSON list of objects, each with a string "class"): a bad
      one skips that row the same way; a label row that cannot be split into key and field,
      or that repeats a key, is warned about and counted;
    * the source as a whole (a missing SRC_DIR or TSV, a file where a folder belongs or the
      other way round, DST_DIR a file or the same folder as SRC_DIR, nothing to convert, or
      nothing converted): one line "error: ..." and exit status 1.
"""

import argparse
import base64
import binascii
import json
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from shared.folders import _json_type, _load_npz, _numbers, inside, region_arrays

# float16's largest finite value: features past it would be stored as infinity
HALF_MAX = float(np.finfo(np.float16).max)
# The longest img_key whose file name fits a file system's 255 bytes, with the suffix of the
# temporary file write_npz writes first
MAX_KEY_BYTES = 255 - len(".npz.tmp.npz")


def sort_by_conf(regions: dict) -> dict:
    """The region arrays with their rows sorted by conf, highest first (stable); tags untouched."""
    order = np.argsort(-regions["conf"], kind="stable")
    return {k: (v if k == "tags" else v[order]) for k, v in regions.items()}


UNITER_KEYS = ("features", "norm_bb", "conf", "soft_labels")


def _half(values: np.ndarray, where: str, name: str = "features") -> np.ndarray:
    """values as float16, refused (ValueError naming `where` and `name`) where one lies past
    float16's range: the cast would store it as infinity."""
    with np.errstate(invalid="ignore"):  # NaN compares False here; region_arrays refuses it
        if values.size and np.abs(values).max() > HALF_MAX:
            raise ValueError(f"{where}: {name} exceed float16's range (|x| up to "
                             f"{np.abs(values).max():g} > {HALF_MAX:g})")
    return values.astype(np.float16)


def from_uniter_npz(npz, where: str = "the file") -> dict:
    """UNITER's per-image arrays (an opened npz or a dict) -> ours (see the module docstring);
    a ValueError naming `where` when they are not UNITER's: a missing key, arrays that are not
    finite numbers, features not (N >= 1, F >= 1), norm_bb not (N, >= 4), conf not N values
    ((N, 1) or (N,)), soft_labels not (N, C)."""
    for key in ("features", "norm_bb", "conf"):
        if key not in npz:
            raise ValueError(f"{where}: not UNITER's feature file (no {key!r})")
    features = _numbers(npz, "features", where, ("N", "F"))  # (N, F)
    n = len(features)
    if n == 0 or features.shape[1] == 0:
        raise ValueError(f"{where}: no regions ('features' of shape {features.shape})")
    norm_bb = _numbers(npz, "norm_bb", where, (n, "C"))  # (N, 6)
    if norm_bb.shape[1] < 4:
        raise ValueError(f"{where}: 'norm_bb' has {norm_bb.shape[1]} columns; the first 4 are "
                         f"the box (x1, y1, x2, y2)")
    conf = np.asarray(npz["conf"])
    if conf.ndim > 2 or conf.size != n or (conf.ndim == 2 and conf.shape[1] != 1):
        raise ValueError(f"{where}: 'conf' of shape {conf.shape} is not one value for each of "
                         f"the {n} regions")
    regions = {"features": _half(features, where), "boxes": norm_bb[:, :4],
               "conf": _numbers({"conf": conf.reshape(-1)}, "conf", where, (n,))}
    if "soft_labels" in npz:
        soft = _numbers(npz, "soft_labels", where, (n, "C"))  # (N, C)
        regions["cls_prob"] = _half(soft, where, "soft_labels")
    return sort_by_conf(regions)


def _parse(text: str, what: str):
    """json.loads of an Oscar TSV field; a ValueError saying which field and where the decoder
    stopped (RecursionError on deep nesting included)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{what} is not JSON we can read (nested too deeply)") from None


def oscar_tags(label_field: str) -> np.ndarray:
    """The object tags (K,) str of an Oscar label field, in detection order: a JSON list of
    objects, each with a string "class" (valid UTF-8: a "\\ud800" escape is refused); a
    ValueError otherwise."""
    objects = _parse(label_field, "the label field")
    if not isinstance(objects, list):
        raise ValueError(f"the label field is {_json_type(objects)}, not a list of objects")
    tags = []
    for k, obj in enumerate(objects):
        if not isinstance(obj, dict) or "class" not in obj:
            raise ValueError(f"label {k} is {_json_type(obj)} without a \"class\"")
        name = obj["class"]
        if not isinstance(name, str):
            raise ValueError(f"label {k}: \"class\" must be a string, got {_json_type(name)}")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"label {k}: \"class\" is not valid UTF-8 text") from None
        tags.append(name)
    return np.array(tags, dtype=np.str_).reshape(-1)


def from_oscar_rows(feature_field: str, label_field: str | None,
                    feature_dim: int | None = None) -> dict:
    """One image's Oscar TSV fields (the JSON after img_key) -> ours. feature_dim, if given, is
    checked against the row (F + 6 columns), which catches a float16/float32 mix-up (a row then
    decodes to half or twice the expected width). A field that is not what the module
    docstring describes is a ValueError saying what is wrong (the caller names the row)."""
    record = _parse(feature_field, "the feature field")
    if not isinstance(record, dict):
        raise ValueError(f"the feature field is {_json_type(record)}, not an object with "
                         f"num_boxes and features")
    for key in ("num_boxes", "features"):
        if key not in record:
            raise ValueError(f"the feature field has no {key!r}")
    n, encoded = record["num_boxes"], record["features"]
    # bool is an int to Python and int(2.5) is 2: only true integers count boxes
    integer = isinstance(n, int) and not isinstance(n, bool)
    if not integer or n < 1:
        raise ValueError(f"num_boxes must be an integer >= 1, got "
                         f"{n if integer else _json_type(n)}")
    if not isinstance(encoded, str):
        raise ValueError(f"features must be a base64 string, got {_json_type(encoded)}")
    try:  # validate: b64decode would otherwise drop every character outside the alphabet
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"features is not base64 ({e})") from None
    if len(raw) % 4:
        raise ValueError(f"features decodes to {len(raw)} bytes, not a whole number of float32")
    flat = np.frombuffer(raw, dtype=np.float32)
    if flat.size == 0 or flat.size % n:
        raise ValueError(f"{flat.size} floats do not split into {n} boxes")
    rows = flat.reshape(n, -1)  # (N, F + 6)
    if feature_dim is not None and rows.shape[1] != feature_dim + 6:
        raise ValueError(f"rows of {rows.shape[1]} floats, expected {feature_dim} + 6: was the "
                         f"file written as float32?")
    if rows.shape[1] < 7:
        raise ValueError(f"rows of {rows.shape[1]} floats: at least 1 feature and the 6 box "
                         f"columns are needed")
    regions = {"features": _half(rows[:, :-6], "the feature field"),
               "boxes": rows[:, -6:-2].astype(np.float32),
               "conf": np.ones(n, dtype=np.float32)}
    if label_field is not None:
        regions["tags"] = oscar_tags(label_field)
    return regions


def write_npz(path: Path, regions: dict) -> None:
    """Write atomically (a temporary file, then a rename): a stopped conversion (a full disk
    included) leaves no half file that the loader would have to skip."""
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, **regions)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _source(path: Path, what: str, folder: bool) -> None:
    """A FileNotFoundError when the source `path` is missing, a ValueError when it is not the
    kind asked for (a folder, or else a regular file: a FIFO would block the read)."""
    if not path.exists():
        raise FileNotFoundError(f"no {what} {path}")
    if folder and not path.is_dir():
        raise ValueError(f"{path} is a file, not a folder ({what})")
    if not folder and not path.is_file():
        raise ValueError(f"{path} is {'a folder' if path.is_dir() else 'a FIFO or a device'}, "
                         f"not a regular file ({what})")


def _output_folder(dst: Path, src: Path) -> None:
    """Create DST_DIR; a ValueError when it is a file, or the source folder itself (the
    conversion would replace the files it reads)."""
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"DST_DIR {dst} is a file, not a folder")
    if src.is_dir() and dst.resolve() == src.resolve():
        raise ValueError(f"DST_DIR {dst} is SRC_DIR: the conversion would replace its files")
    dst.mkdir(parents=True, exist_ok=True)


def convert_uniter_dir(src: Path, dst: Path) -> tuple[int, int]:
    """Every SRC/*.npz -> DST/<same name>; (files written, files skipped: see the module
    docstring)."""
    _source(src, "UNITER feature folder", folder=True)
    files = sorted(src.glob("*.npz"))
    if not files:
        raise FileNotFoundError(f"no .npz file in {src}")
    _output_folder(dst, src)
    written = skipped = 0
    for file in files:
        try:
            regions = from_uniter_npz(_load_npz(file, UNITER_KEYS), str(file))
            region_arrays(regions, file)  # what RegionFolder would refuse, refused now
        except ValueError as e:  # the messages name the file
            skipped += 1
            warnings.warn(f"{e}; file skipped ({skipped} so far)")
            continue
        write_npz(dst / file.name, regions)
        written += 1
    return written, skipped


def unsafe_key(key: str) -> bool:
    """An Oscar img_key that may not become a file name: empty, or holding a path separator
    (/ or \\, whatever the system) or "..", which could name a file outside the output
    folder, a NUL (no file name holds one), or longer than a file name may be
    (MAX_KEY_BYTES)."""
    return (not key or "/" in key or "\\" in key or ".." in key or "\0" in key
            or len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES)


def _tsv_rows(path: Path):
    """(line number, img_key, field, problem) of each non-blank line of a TSV: problem is None,
    or says why the line cannot be split (not UTF-8, no tab after the key). Lines are decoded
    one at a time, so one bad line spoils only itself; a BOM before the first key is dropped
    and a Windows line end ("\\r\\n") taken off."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield n, "", "", f"not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 4]!r})"
                continue
            if not line.strip():
                continue  # a blank line
            key, tab, field = line.partition("\t")
            yield n, key, field, None if tab else "no tab after the img_key"


class OscarCounts(NamedTuple):
    """What convert_oscar_tsv did with the rows of the feature TSV (and the label TSV)."""
    written: int  # region files written
    refused: int  # feature rows whose img_key could name a file outside DST_DIR
    duplicates: int  # feature rows repeating the img_key of a converted row
    malformed: int  # feature rows that could not be converted (their label row's fault too)
    bad_labels: int = 0  # label rows that could not be split, or repeating a key
    untagged: int = 0  # rows written without tags: no label row has their key


def _label_rows(labels_tsv: Path) -> tuple[dict[str, tuple[int, str]], int]:
    """({img_key: (line number, label field)}, label rows skipped) of a label TSV: a row that
    cannot be split, or that repeats a key (the first is kept), is warned about and counted."""
    labels, bad = {}, 0
    for n, key, field, problem in _tsv_rows(labels_tsv):
        if problem is None and key in labels:
            problem = f"img_key {key!r} repeats line {labels[key][0]}; the first is kept"
        if problem is not None:
            bad += 1
            warnings.warn(f"{labels_tsv}, line {n}: {problem}; label row skipped")
            continue
        labels[key] = (n, field)
    return labels, bad


def convert_oscar_tsv(features_tsv: Path, labels_tsv: Path | None, dst: Path,
                      feature_dim: int | None = None) -> OscarCounts:
    """Each feature row -> DST/<img_key>.npz; what was written and skipped (OscarCounts). See
    the module docstring."""
    _source(features_tsv, "Oscar feature TSV", folder=False)
    if labels_tsv is not None:
        _source(labels_tsv, "Oscar label TSV", folder=False)
    _output_folder(dst, features_tsv)
    labels, bad_labels = _label_rows(labels_tsv) if labels_tsv is not None else ({}, 0)
    written = refused = duplicates = malformed = untagged = 0
    seen: set[str] = set()

    def skip(message: str) -> None:  # message: the row's place, then what is wrong
        nonlocal malformed
        malformed += 1
        warnings.warn(f"{message}; row skipped ({malformed} malformed so far)")

    for n, key, field, problem in _tsv_rows(features_tsv):
        where = f"{features_tsv}, line {n}"
        if problem is not None:
            skip(f"{where}: {problem}")
            continue
        if unsafe_key(key):
            refused += 1
            warnings.warn(f"{where}: img_key {key!r} could name a file outside {dst}; row "
                          f"skipped")
            continue
        if key in seen:
            duplicates += 1
            warnings.warn(f"{where}: img_key {key!r} repeats an earlier row; the first is kept")
            continue
        label = labels.get(key)
        try:
            tags = None if label is None else oscar_tags(label[1])
        except ValueError as e:
            skip(f"{where}: its label row ({labels_tsv}, line {label[0]}): {e}")
            continue
        try:
            regions = from_oscar_rows(field, None, feature_dim)
        except ValueError as e:
            skip(f"{where}: {e}")
            continue
        try:
            region_arrays(regions, where)  # what RegionFolder would refuse, refused now
        except ValueError as e:  # its message begins with `where`
            skip(str(e))
            continue
        if tags is not None:
            regions["tags"] = tags
        untagged += labels_tsv is not None and label is None
        seen.add(key)
        write_npz(inside(dst, f"{key}.npz", where), regions)
        written += 1
    return OscarCounts(written, refused, duplicates, malformed, bad_labels, untagged)


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
        if args.kind == "uniter-npz":
            n, bad = convert_uniter_dir(args.src, args.dst)
            skipped = f"; skipped {bad} files that cannot be converted (named in the warnings)"
            if not n:
                raise ValueError(f"{args.src}: no file converted{skipped}")
        else:
            counts = convert_oscar_tsv(args.features, args.labels, args.dst, args.feature_dim)
            n = counts.written
            skipped = (f"; skipped {counts.refused} rows whose img_key could name a file "
                       f"outside it, {counts.duplicates} rows repeating an earlier img_key and "
                       f"{counts.malformed} malformed rows (named in the warnings)")
            if args.labels is not None:
                skipped += (f"; {counts.bad_labels} label rows skipped, {counts.untagged} "
                            f"files written without tags (no label row)")
            if not n:
                raise ValueError(f"{args.features}: no row converted{skipped}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {type(e).__name__}: {e}") from None
    print(f"wrote {n} region files to {args.dst}{skipped}")


if __name__ == "__main__":
    main()
