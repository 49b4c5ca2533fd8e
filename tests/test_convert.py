"""shared/convert.py: UNITER's npz and Oscar's TSV rows become our region files, which
shared.folders.RegionFolder reads back with the same numbers (the files are written here)."""

import base64
import json

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
    assert convert.convert_uniter_dir(tmp_path / "src", tmp_path / "dst") == 1
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
    with pytest.raises(ValueError, match="no 'norm_bb'"):
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
    assert counts == (1, 0, 1)
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
