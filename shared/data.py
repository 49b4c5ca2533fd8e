"""From world examples to batches of tensors.

The world (shared/world.py) returns numpy arrays and strings; the models want tensors. This file
holds the conversions two papers share (VirTex and CoCa read pixels and one caption per image):

    image_to_tensor      uint8 (H, W, 3) -> normalised float (3, H, W)
    ImageTextDataset     item i = {"image": (3, H, W), "tokens": (T_i,)}, one caption of example i
    collate_image_text   list of items -> {"images": (B, 3, H, W), "tokens": (B, T)} right-padded
    train_loader         the training DataLoader: batch k of the run is a pure function of k

Determinism is the point of `train_loader`: the batch of step k holds world examples
k·B .. k·B + B - 1 and the caption of example i is chosen by a generator seeded with (seed, i),
so a run resumed at step k sees exactly the batches an uninterrupted run would have seen,
whatever the number of workers.
"""

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# Per-channel mean and standard deviation of the images the model sees. ImageNet's values are
# the common choice for real photos (VirTex, CoCa implementations); we keep them so the same
# normalisation serves real data (issue 7) and the world.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def normalise_image(x: Tensor) -> Tensor:
    """float (3, H, W) in [0, 1] -> normalised per channel with the ImageNet mean and std."""
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std  # (3, H, W)


def image_to_tensor(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) in [0, 255] -> float32 (3, H, W), normalised per channel."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return normalise_image(x)  # (3, H, W)


class ImageTextDataset(Dataset):
    """Item i: the image of world example i and one of its captions, tokenised.

    Which caption is a pure function of (seed, i), so the data order never depends on workers
    or on where a run was resumed.
    """

    def __init__(self, world, tokenizer, max_len: int, seed: int = 0):
        self.world, self.tokenizer, self.max_len, self.seed = world, tokenizer, max_len, seed

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> dict:
        example = self.world.example(i, regions=False)
        pick = np.random.default_rng([self.seed, 7, i]).integers(len(example["captions"]))
        tokens = self.tokenizer.encode(example["captions"][pick], max_len=self.max_len)
        return {"image": image_to_tensor(example["image"]),  # (3, H, W)
                "tokens": torch.tensor(tokens, dtype=torch.long)}  # (T_i,)


def pad_sequences(sequences: list[Tensor], pad_id: int = 0) -> Tensor:
    """Right-pad 1-D tensors of different lengths into one (B, T) tensor."""
    T = max(len(s) for s in sequences)
    out = torch.full((len(sequences), T), pad_id, dtype=sequences[0].dtype)  # (B, T)
    for b, s in enumerate(sequences):
        out[b, : len(s)] = s
    return out


def collate_image_text(items: list[dict]) -> dict:
    """[{"image": (3, H, W), "tokens": (T_i,)}] -> {"images": (B, 3, H, W), "tokens": (B, T)}."""
    return {"images": torch.stack([it["image"] for it in items]),  # (B, 3, H, W)
            "tokens": pad_sequences([it["tokens"] for it in items])}  # (B, T), [PAD] = 0


class _StepRange(torch.utils.data.Sampler):
    """Indices start, start + 1, ... wrapping around the dataset length (never ends)."""

    def __init__(self, start: int, length: int):
        self.start, self.length = start, length

    def __iter__(self):
        i = self.start
        while True:
            yield i % self.length
            i += 1


def train_loader(dataset: Dataset, batch_size: int, start_step: int, collate_fn,
                 num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """An endless DataLoader whose k-th batch (counting from step 0) holds examples
    k·B .. k·B + B - 1 of `dataset` (modulo its length); it starts at `start_step`."""
    sampler = _StepRange(start_step * batch_size, len(dataset))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, drop_last=True)
