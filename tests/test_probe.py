"""shared/probe.py: the linear probe reads what the features hold, and nothing else."""

import numpy as np
import pytest
import torch

from shared import probe


class FakeWorld:
    """A classification view whose image i has class i % 36, written into pixel (0, 0)."""

    def __init__(self, config, split):
        self.offset = {"train": 0, "val": 10_000, "test": 20_000}[split]

    def __len__(self):
        return 5000

    def item(self, i):
        label = (i * 7 + self.offset) % 36
        image = np.random.default_rng(i + self.offset).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image[0, 0, 0] = label
        return image, label


@pytest.fixture(autouse=True)
def fake_world(monkeypatch):
    import shared.world  # linear_probe imports the world where it reads it

    monkeypatch.setattr(shared.world, "ClassificationWorld", FakeWorld)


def test_features_that_hold_the_label_give_perfect_accuracy():
    def embed(images):  # one-hot of the class written in the image, plus a constant
        x = torch.zeros(len(images), 40)
        x[torch.arange(len(images)), torch.tensor([int(im[0, 0, 0]) for im in images])] = 1.0
        return x
    assert probe.linear_probe(embed, None, "test", 200) == 1.0


def test_features_unrelated_to_the_label_stay_near_chance():
    def embed(images):  # the random pixels, not the label pixel
        return torch.tensor(np.stack([im[1:, :, :].reshape(-1) for im in images]),
                            dtype=torch.float32)
    assert probe.linear_probe(embed, None, "test", 300) < 0.12  # chance 1/36 = 0.028


def test_feature_scale_does_not_matter():
    """Standardisation: tiny L2-normalised-like differences are read as well as large ones."""
    def embed(images, scale):
        x = torch.zeros(len(images), 40)
        x[torch.arange(len(images)), torch.tensor([int(im[0, 0, 0]) for im in images])] = scale
        return x + 1.0
    small = probe.linear_probe(lambda ims: embed(ims, 1e-4), None, "test", 200)
    assert small == probe.linear_probe(lambda ims: embed(ims, 1.0), None, "test", 200) == 1.0


def test_bad_n_is_a_clear_error():
    with pytest.raises(ValueError, match="n >= 1"):
        probe.linear_probe(lambda ims: torch.zeros(len(ims), 2), None, "test", 0)
