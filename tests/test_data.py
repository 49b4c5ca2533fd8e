"""shared/data.py: batches are a pure function of the step (what makes resume exact)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from shared.data import (IMAGE_MEAN, IMAGE_STD, RecentExamples, collate_image_text,
                         image_to_tensor, pad_sequences, train_loader)


ROOT = Path(__file__).resolve().parent.parent


class Squares(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.tensor([i * i])}


def collate(items):
    return {"x": torch.cat([it["x"] for it in items])}


@pytest.mark.parametrize("workers", [0, 1])
def test_batch_k_is_the_same_whether_started_at_0_or_at_k(workers):
    from_zero = iter(train_loader(Squares(), 4, 0, collate, num_workers=workers))
    batches = [next(from_zero)["x"].tolist() for _ in range(5)]
    # stream positions 0..19: they grow past the dataset's length (the dataset maps them to
    # its examples epoch by epoch, Epochs)
    assert batches[0] == [0, 1, 4, 9] and batches[2] == [64, 81, 100, 121]
    from_three = iter(train_loader(Squares(), 4, 3, collate, num_workers=workers))
    assert next(from_three)["x"].tolist() == batches[3]


def test_pad_sequences_and_collate_right_pad_with_zero():
    tokens = pad_sequences([torch.tensor([2, 5, 3]), torch.tensor([2, 3])])
    assert tokens.tolist() == [[2, 5, 3], [2, 3, 0]]
    batch = collate_image_text([{"image": torch.zeros(3, 4, 4), "tokens": torch.tensor([2, 3])},
                                {"image": torch.ones(3, 4, 4), "tokens": torch.tensor([2, 7, 3])}])
    assert batch["images"].shape == (2, 3, 4, 4) and batch["tokens"].tolist() == [[2, 3, 0], [2, 7, 3]]


def test_image_to_tensor_normalises_each_channel():
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[..., 0] = 255  # pure red
    x = image_to_tensor(image)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((2, 3), (1 - IMAGE_MEAN[0]) / IMAGE_STD[0]))
    assert torch.allclose(x[1], torch.full((2, 3), -IMAGE_MEAN[1] / IMAGE_STD[1]))


def test_image_to_tensor_takes_a_read_only_array_without_a_warning():
    # np.asarray of a PIL image is read-only; torch.from_numpy warns once per process on such
    # an array, so the check runs in a fresh interpreter with warnings as errors.
    code = ("import numpy as np; from shared.data import image_to_tensor; "
            "a = np.zeros((4, 5, 3), np.uint8); a.flags.writeable = False; "
            "x = image_to_tensor(a); assert x.shape == (3, 4, 5)")
    done = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_recent_examples_makes_each_kept_example_once_and_forgets_the_oldest():
    class Source:
        made = []

        def example(self, i):
            self.made.append(i)
            return {"i": i}

    source = Source()
    recent = RecentExamples(source, size=2)
    assert [recent(i)["i"] for i in (3, 4, 3, 4)] == [3, 4, 3, 4]
    assert source.made == [3, 4]  # kept: made once each
    recent(5)  # a third one: 3, the oldest, is forgotten
    assert recent(4) == {"i": 4} and source.made == [3, 4, 5]
    recent(3)
    assert source.made == [3, 4, 5, 3]
    with pytest.raises(ValueError, match="size must be >= 1"):
        RecentExamples(source, size=0)


def test_oscar_and_uniter_refuse_feature_statistics_of_another_size():
    import oscar
    import uniter

    for paper in (oscar, uniter):
        paper.Config(feature_dim=2, feature_mean=(0.0, 1.0), feature_std=(1.0, 2.0))  # fine
        with pytest.raises(ValueError, match=r"feature_dim \(2\) numbers each, or none; got 1 "):
            paper.Config(feature_dim=2, feature_mean=(0.0,), feature_std=(1.0,))
