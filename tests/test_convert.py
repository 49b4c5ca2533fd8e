"""shared/convert.py: UNITER's npz and Oscar's TSV rows become our region files, which
shared.folders.RegionFolder reads back with the same numbers (the files are written here)."""

import base64
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from shared import convert
from shared.folders import RegionFolder


def test_uniter_npz_to_ours_and_back(tmp_path):
    rng = np.random.default_rng(0)
    n = 5
    boxes = np.sort(rng.random((n, 4)), axis=1).astype(np.float16)[:, [0, 2, 1, 3]]
    norm_bb = np.concatenate([boxes, boxes[:, 2:] - boxes[:, :2]], axis=1)  # (n, 6)
    conf = rng.random((n, 1)).astype(np.float16)
    src = {"features": rng.random((n, 8)).astype(np.float16), "norm_bb": norm_bb,
           "conf": conf, "soft_labels": rng.random((n, 4)).astype(np.float16)}
    (tmp_path / "src").mkdir()
    np.savez(tmp_path / "src" / "img1.npz", **src)
    assert convert.convert_uniter_dir(tmp_path / "src", tmp_path / "dst") == (1, 0)
    folder = RegionFolder([(tmp_path / "dst" / "img1.npz", ["a caption"])])
    example = folder.example(0)
    order = np.argsort(-conf[:, 0].astype(np.float32), kind="stable")
    assert np.array_equal(example["features"], src["features"][order].astype(np.float32))
    assert np.array_equal(example["boxes"], norm_bb[order, :4].astype(np.float32))
    assert np.array_equal(example["cls_prob"], src["soft_labels"][order].astype(np.float32))
    assert example["conf"].tolist() == sorted(example["conf"].tolist(), reverse=True)


def _oscar_row(rows: np.ndarray) -> str:
    return json.dumps({"num_boxes": len(rows),
                       "features": base64.b64encode(rows.astype(np.float32).tobytes()).decode()})


def test_oscar_tsv_to_ours(tmp_path):
    rng = np.random.default_rng(1)
    rows = rng.random((3, 10 + 6)).astype(np.float32)
    rows[:, 10:14] = np.sort(rows[:, 10:14].reshape(3, 2, 2), axis=1).reshape(3, 4)  # x2 >= x1
    labels = json.dumps([{"class": "dog", "conf": 0.9, "rect": [1, 2, 3, 4]},
                         {"class": "couch", "conf": 0.5, "rect": [0, 0, 5, 5]}])
    (tmp_path / "f.tsv").write_text(f"img7\t{_oscar_row(rows)}\n")
    (tmp_path / "l.tsv").write_text(f"img7\t{labels}\n")
    convert.main(["oscar-tsv", str(tmp_path / "f.tsv"), str(tmp_path / "dst"),
                  "--labels", str(tmp_path / "l.tsv"), "--feature_dim", "10"])
    example = RegionFolder([(tmp_path / "dst" / "img7.npz", ["x"])]).example(0)
    assert np.array_equal(example["features"], rows[:, :10].astype(np.float16).astype(np.float32))
    assert np.array_equal(example["boxes"], rows[:, 10:14])
    assert example["tags"] == ["dog", "couch"] and example["conf"].tolist() == [1.0] * 3


def test_a_float16_oscar_row_is_caught_by_its_width():
    rows = np.zeros((4, 2054), dtype=np.float16)  # written as float16, read as float32
    field = json.dumps({"num_boxes": 4, "features": base64.b64encode(rows.tobytes()).decode()})
    with pytest.raises(ValueError, match="rows of 1027 floats, expected 2048 \\+ 6"):
        convert.from_oscar_rows(field, None, feature_dim=2048)


def test_a_file_that_is_not_uniter_s_is_named():
    with pytest.raises(ValueError, match="the file: not UNITER's feature file \\(no 'norm_bb'\\)"):
        convert.from_uniter_npz({"features": np.zeros((1, 2)), "conf": np.ones(1)})


def test_an_oscar_key_that_could_leave_the_output_folder_is_skipped(tmp_path, capsys):
    rows = np.zeros((2, 4 + 6), dtype=np.float32)
    outside = tmp_path / "victim"
    keys = ["../victim", str(outside), "a/b", "a\\b", "..", "", "ok"]
    (tmp_path / "f.tsv").write_text("".join(f"{key}\t{_oscar_row(rows)}\n" for key in keys))
    with pytest.warns(UserWarning, match="img_key '../victim' could name a file outside"):
        convert.main(["oscar-tsv", str(tmp_path / "f.tsv"), str(tmp_path / "dst")])
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["ok.npz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "f.tsv"]
    assert "wrote 1 region files" in (out := capsys.readouterr().out) and "skipped 6 rows" in out
    assert convert.unsafe_key("COCO_val2014_000000000042") is False


def test_a_repeated_oscar_key_keeps_its_first_row_and_is_counted(tmp_path, capsys):
    first, second = np.zeros((2, 4 + 6), np.float32), np.ones((3, 4 + 6), np.float32)
    (tmp_path / "f.tsv").write_text(f"k\t{_oscar_row(first)}\nk\t{_oscar_row(second)}\n")
    with pytest.warns(UserWarning, match="line 2: img_key 'k' repeats an earlier row"):
        counts = convert.convert_oscar_tsv(tmp_path / "f.tsv", None, tmp_path / "dst")
    assert counts == (1, 0, 1, 0, 0, 0)
    with np.load(tmp_path / "dst" / "k.npz") as npz:
        assert len(npz["features"]) == 2


def test_a_missing_or_empty_source_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.tsv").write_text("\n")
    for argv, message in [(["uniter-npz", str(tmp_path / "absent"), str(tmp_path / "d")],
                           "no UNITER feature folder"),
                          (["uniter-npz", str(tmp_path / "empty"), str(tmp_path / "d")],
                           "no .npz file in"),
                          (["oscar-tsv", str(tmp_path / "absent.tsv"), str(tmp_path / "d")],
                           "no Oscar feature TSV"),
                          (["oscar-tsv", str(tmp_path / "blank.tsv"), str(tmp_path / "d")],
                           "no row converted")]:
        with pytest.raises(SystemExit) as stop:
            convert.main(argv)
        assert message in str(stop.value.code) and "\n" not in str(stop.value.code)
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


# --- hostile input: every bad row or file is named, skipped and counted, or one line ----------

def _boxes_rows(n: int, f: int = 4) -> np.ndarray:
    """(n, f + 6) float32 Oscar rows: features, then boxes inside the image, then w, h."""
    rows = np.full((n, f + 6), 0.5, np.float32)
    rows[:, f:f + 4] = [0.1, 0.2, 0.6, 0.7]
    return rows


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.astype(np.float32).tobytes()).decode()


def _main(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the one-line error of convert.main, or None when it finished; the warnings' texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            convert.main(argv)
            error = None
        except SystemExit as stop:
            error = stop.code
    return error, [str(w.message) for w in caught]


def _reads_back(dst: Path) -> None:
    """Every file the converter wrote is one RegionFolder reads without refusing it."""
    folder = RegionFolder([(p, ["x"]) for p in sorted(dst.glob("*.npz"))])
    for path in sorted(dst.glob("*.npz")):
        folder.read(path)
    assert not list(dst.glob("*.tmp.npz"))


OSCAR_BAD_ROWS = [  # (feature field, the reason its warning gives)
    (None, "no tab after the img_key"),
    ("{not json", "the feature field is not JSON"),
    ("[1, 2]", "the feature field is a list, not an object"),
    ("17", "the feature field is a number, not an object"),
    (json.dumps({"features": _b64(_boxes_rows(2))}), "has no 'num_boxes'"),
    (json.dumps({"num_boxes": 2}), "has no 'features'"),
    (json.dumps({"num_boxes": "2", "features": _b64(_boxes_rows(2))}),
     "num_boxes must be an integer >= 1, got a string"),
    (json.dumps({"num_boxes": 2.5, "features": _b64(_boxes_rows(2))}),
     "num_boxes must be an integer >= 1, got a number"),
    (json.dumps({"num_boxes": None, "features": _b64(_boxes_rows(2))}),
     "num_boxes must be an integer >= 1, got null"),
    (json.dumps({"num_boxes": True, "features": _b64(_boxes_rows(1))}),
     "num_boxes must be an integer >= 1, got a boolean"),
    (json.dumps({"num_boxes": -2, "features": _b64(_boxes_rows(2))}),
     "num_boxes must be an integer >= 1, got -2"),
    (json.dumps({"num_boxes": 0, "features": ""}), "num_boxes must be an integer >= 1, got 0"),
    (json.dumps({"num_boxes": 3, "features": _b64(_boxes_rows(2))}),
     "20 floats do not split into 3 boxes"),
    (json.dumps({"num_boxes": 2, "features": "!!!!"}), "features is not base64"),
    (json.dumps({"num_boxes": 2, "features": "AAAAAAA="}), "5 bytes, not a whole number"),
    (json.dumps({"num_boxes": 2, "features": 5}), "features must be a base64 string"),
    (json.dumps({"num_boxes": 2, "features": _b64(np.zeros((2, 6)))}),
     "rows of 6 floats: at least 1 feature"),
    (json.dumps({"num_boxes": 1, "features": _b64(np.full((1, 10), np.nan))}),
     "'features' has NaN or infinite values"),
    (json.dumps({"num_boxes": 1, "features": _b64(np.full((1, 10), 1e6))}),
     "features exceed float16's range"),
    (json.dumps({"num_boxes": 1, "features": _b64(np.full((1, 10), 40.0))}),
     "boxes must be fractions of the image side"),
    ("[" * 100_000, "nested too deeply"),
]


def test_each_malformed_oscar_row_is_named_skipped_and_counted(tmp_path, capsys):
    lines = [f"good\t{_oscar_row(_boxes_rows(2))}"]
    lines += [f"bad{k}" if field is None else f"bad{k}\t{field}"
              for k, (field, _) in enumerate(OSCAR_BAD_ROWS)]
    data = ("\n".join(lines) + "\n").encode() + b"latin\t\xe9t\xe9\n"
    (tmp_path / "f.tsv").write_bytes(data)
    error, warned = _main(["oscar-tsv", str(tmp_path / "f.tsv"), str(tmp_path / "dst")])
    assert error is None
    for k, (_, reason) in enumerate(OSCAR_BAD_ROWS):  # row k is on line k + 2
        assert any(w.startswith(f"{tmp_path / 'f.tsv'}, line {k + 2}: ") and reason in w
                   and "row skipped" in w for w in warned), (k, reason, warned)
    assert any(f"line {len(lines) + 1}: not UTF-8 text" in w for w in warned)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["good.npz"]
    assert f"{len(OSCAR_BAD_ROWS) + 1} malformed rows" in capsys.readouterr().out
    _reads_back(tmp_path / "dst")


def test_a_malformed_label_row_skips_its_image_and_is_counted(tmp_path, capsys):
    keys = ["ok", "dict", "noclass", "intclass", "surrogate", "notjson", "nolabel"]
    (tmp_path / "f.tsv").write_text("".join(f"{k}\t{_oscar_row(_boxes_rows(1))}\r\n"
                                            for k in keys))
    labels = {"ok": [{"class": "dog"}], "dict": {"class": "dog"}, "noclass": [{"conf": 1}],
              "intclass": [{"class": 12}], "surrogate": [{"class": "\ud800"}]}
    rows = [f"{k}\t{json.dumps(v)}" for k, v in labels.items()]
    rows += ["notjson\t[{", "no tab on this line", "ok\t[]"]  # the last repeats a key
    (tmp_path / "l.tsv").write_text("\ufeff" + "\n".join(rows) + "\n")
    error, warned = _main(["oscar-tsv", str(tmp_path / "f.tsv"), str(tmp_path / "dst"),
                           "--labels", str(tmp_path / "l.tsv")])
    assert error is None
    for line, reason in [(2, "label row (.*l.tsv, line 2): the label field is an object, not"),
                         (3, "label row (.*l.tsv, line 3): label 0 is an object without"),
                         (4, 'label row (.*l.tsv, line 4): label 0: "class" must be a string'),
                         (5, "label row (.*l.tsv, line 5): label 0: \"class\" is not valid"),
                         (6, "label row (.*l.tsv, line 6): the label field is not JSON")]:
        assert any(w.startswith(f"{tmp_path / 'f.tsv'}, line {line}: its ") and reason.split(
            "): ")[1] in w and "row skipped" in w for w in warned), (line, warned)
    assert any("l.tsv, line 7: no tab after the img_key; label row skipped" in w for w in warned)
    assert any("l.tsv, line 8: img_key 'ok' repeats line 1" in w for w in warned)
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["nolabel.npz", "ok.npz"]
    out = capsys.readouterr().out
    assert "5 malformed rows" in out and "2 label rows skipped, 1 files written without tags" \
        in out
    assert RegionFolder([(tmp_path / "dst" / "ok.npz", ["x"])]).example(0)["tags"] == ["dog"]
    _reads_back(tmp_path / "dst")


def _uniter(n: int = 3, **change) -> dict:
    arrays = {"features": np.ones((n, 8), np.float16),
              "norm_bb": np.tile(np.array([.1, .1, .5, .5, .4, .4], np.float16), (n, 1)),
              "conf": np.linspace(.9, .1, n, dtype=np.float16).reshape(n, 1),
              "soft_labels": np.full((n, 5), .2, np.float16)}
    arrays.update(change)
    return {k: v for k, v in arrays.items() if v is not None}


UNITER_BAD_FILES = {  # name -> (arrays or the file's bytes, the reason its warning gives)
    "notzip": (b"plain text", "not an .npz (a zip archive)"),
    "nofeatures": (_uniter(features=None), "not UNITER's feature file (no 'features')"),
    "noconf": (_uniter(conf=None), "not UNITER's feature file (no 'conf')"),
    "rows": (_uniter(norm_bb=np.zeros((2, 6))), "'norm_bb' must be of shape (3, C), got (2, 6)"),
    "narrow": (_uniter(norm_bb=np.zeros((3, 3))), "'norm_bb' has 3 columns"),
    "conf": (_uniter(conf=np.ones((4, 1))), "'conf' of shape (4, 1) is not one value for each"),
    "soft": (_uniter(soft_labels=np.ones((2, 5))), "'soft_labels' must be of shape (3, C)"),
    "text": (_uniter(features=np.array([["a"] * 8] * 3)), "'features' must hold numbers"),
    "empty": (_uniter(0), "no regions"),
    "pixels": (_uniter(norm_bb=np.full((3, 6), 50.0)), "boxes must be fractions"),
}


def _timeout(seconds: int):
    """signal.alarm for a test that could hang (a FIFO opened for reading): TimeoutError."""
    def stop(*_):
        raise TimeoutError(f"still blocked after {seconds} s")
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)


def test_each_bad_uniter_file_is_named_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    np.savez(src / "good.npz", **_uniter())
    for name, (content, _) in UNITER_BAD_FILES.items():
        if isinstance(content, bytes):
            (src / f"{name}.npz").write_bytes(content)
        else:
            np.savez(src / f"{name}.npz", **content)
    os.mkfifo(src / "fifo.npz")  # would block np.load until a writer came
    (src / "folder.npz").mkdir()
    _timeout(20)
    try:
        error, warned = _main(["uniter-npz", str(src), str(tmp_path / "dst")])
    finally:
        signal.alarm(0)
    assert error is None
    reasons = {name: reason for name, (_, reason) in UNITER_BAD_FILES.items()}
    reasons |= {"fifo": "not a regular file (a FIFO)", "folder": "not a regular file (a folder)"}
    for name, reason in reasons.items():
        assert any(w.startswith(f"{src / name}.npz: ") and reason in w and "file skipped" in w
                   for w in warned), (name, warned)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["good.npz"]
    assert f"skipped {len(reasons)} files that cannot be converted" in capsys.readouterr().out
    _reads_back(tmp_path / "dst")


def test_a_source_or_destination_of_the_wrong_kind_is_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    np.savez(tmp_path / "src" / "a.npz", **_uniter())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.npz").write_bytes(b"not a zip")
    (tmp_path / "file").write_text("x")
    (tmp_path / "f.tsv").write_text(f"k\t{_oscar_row(_boxes_rows(1))}\n")
    os.mkfifo(tmp_path / "fifo.tsv")
    src, file, tsv = str(tmp_path / "src"), str(tmp_path / "file"), str(tmp_path / "f.tsv")
    for argv, message in [
            (["uniter-npz", file, str(tmp_path / "d")], f"{file} is a file, not a folder"),
            (["uniter-npz", src, file], f"DST_DIR {file} is a file, not a folder"),
            (["uniter-npz", src, src], "is SRC_DIR: the conversion would replace its files"),
            (["uniter-npz", str(tmp_path / "bad"), str(tmp_path / "d")], "no file converted"),
            (["oscar-tsv", src, str(tmp_path / "d")], f"{src} is a folder, not a regular file"),
            (["oscar-tsv", str(tmp_path / "fifo.tsv"), str(tmp_path / "d")],
             "is a FIFO or a device, not a regular file"),
            (["oscar-tsv", tsv, file], f"DST_DIR {file} is a file"),
            (["oscar-tsv", tsv, str(tmp_path / "d"), "--labels", src], "is a folder")]:
        _timeout(20)
        try:
            error, _ = _main(argv)
        finally:
            signal.alarm(0)
        assert error is not None and error.startswith("error: ") and message in error, error
        assert "\n" not in error
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["a.npz"]  # untouched
    done = subprocess.run([sys.executable, "-m", "shared.convert", "uniter-npz", file,
                           str(tmp_path / "d")], capture_output=True, text=True,
                          cwd=Path(convert.__file__).parents[1])
    assert done.returncode == 1 and done.stderr.startswith("error: ")
    assert len(done.stderr.strip().splitlines()) == 1


def _mutate(rng: np.random.Generator, text: str) -> str:
    """One random fault in a row's text: a cut, a character dropped, replaced or repeated, or
    a piece of another JSON type spliced in."""
    at = int(rng.integers(0, len(text) + 1))
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return text[:at]
    if kind == 1:
        return text[:at] + text[at + 1:]
    if kind == 2:
        return text[:at] + str(rng.choice(list('{}[]",:\t\\ 0-e.xA=\n'))) + text[at + 1:]
    if kind == 3:
        return text[:at] + text[at:at + 8] * 3 + text[at + 8:]
    return text[:at] + str(rng.choice(["null", "-1", "1e999", "[]", "{}", '"', "true"])) \
        + text[at:]


def test_fuzzed_rows_and_files_are_converted_or_named_never_a_traceback(tmp_path):
    """Seeded faults in Oscar rows (as text and as fields), label rows and UNITER arrays and
    bytes: every call either finishes, every file it wrote reading back through RegionFolder,
    or ends in one line "error: ..."; no other exception gets out."""
    rng = np.random.default_rng(0)
    values = [None, True, -3, 0, 2, 2.5, 10**30, "x", "", [], {}, [1], {"a": 1}]
    for k in range(24):
        rows = []
        for j in range(4):
            n = int(rng.integers(1, 4))
            record = {"num_boxes": n, "features": _b64(_boxes_rows(n))}
            if rng.random() < 0.3:
                record[str(rng.choice(["num_boxes", "features"]))] = \
                    values[int(rng.integers(len(values)))]
            line = f"key{j}\t{json.dumps(record)}"
            rows.append(_mutate(rng, line) if rng.random() < 0.3 else line)
        label = json.dumps([{"class": "dog", "conf": 0.5}])
        labels = [f"key{j}\t" + (_mutate(rng, label) if rng.random() < 0.3 else label)
                  for j in range(4)]
        (tmp_path / f"f{k}.tsv").write_text("\n".join(rows) + "\n")
        (tmp_path / f"l{k}.tsv").write_text("\n".join(labels) + "\n")
        dst = tmp_path / f"oscar{k}"
        error, _ = _main(["oscar-tsv", str(tmp_path / f"f{k}.tsv"), str(dst), "--labels",
                          str(tmp_path / f"l{k}.tsv")])
        assert error is None or (error.startswith("error: ") and "\n" not in error), error
        if error is None:
            _reads_back(dst)
    good = tmp_path / "good.npz"
    np.savez(good, **_uniter())
    for k in range(24):
        src = tmp_path / f"src{k}"
        src.mkdir()
        if k % 2:  # beside a good file: the run goes on past the bad one
            np.savez(src / "b.npz", **_uniter())
        if k % 3 == 0:  # damaged bytes of a good file
            data = bytearray(good.read_bytes())
            for at in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
                data[at] = int(rng.integers(0, 256))
            (src / "a.npz").write_bytes(bytes(data[:int(rng.integers(len(data) // 2,
                                                                      len(data) + 1))]))
        else:  # arrays of another shape, type or value
            arrays = _uniter()
            key = str(rng.choice(list(arrays)))
            choices = [np.zeros((int(rng.integers(0, 5)), int(rng.integers(0, 8))), np.float32),
                       np.zeros(int(rng.integers(0, 5))), np.full((3, 6), np.inf),
                       np.array([["a"] * 6] * 3), np.zeros((3, 2, 2)), np.array(5.0),
                       np.full((3, 8), -1e9), np.ones((3, 6), np.complex64)]
            arrays[key] = choices[int(rng.integers(len(choices)))]
            np.savez(src / "a.npz", **arrays)
        dst = tmp_path / f"uniter{k}"
        error, _ = _main(["uniter-npz", str(src), str(dst)])
        assert error is None or (error.startswith("error: ") and "\n" not in error), error
        if error is None:
            _reads_back(dst)
