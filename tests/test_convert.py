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
