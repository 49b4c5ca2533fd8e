"""From world examples to batches of tensors.

The world (shared/world.py) returns numpy arrays and strings; the models want tensors. This file
holds the conversions two papers share (VirTex and CoCa read pixels and one caption per image):

    image_to_tensor      uint8 (H, W, 3) -> normalised float (3, H, W)
    ImageTextDataset     item p = {"image": (3, H, W), "tokens": (T_i,)}: the p-th visit's
                         image and one of its captions
    collate_image_text   list of items -> {"images": (B, 3, H, W), "tokens": (B, T)} right-padded
    train_loader         the training DataLoader: batch k of the run is a pure function of k
                         (across N processes, each rank gets its slice of it)

and what the two region-based papers (Oscar, UNITER) share:

    pad_rows             [(n_b, ...)] -> (B, max n_b, ...) zero-padded (regions, masks)
    flat_targets         (B, T) labels -> flat positions and targets of the predicted tokens
    feature_statistics   per-dimension mean and std of the world's region features
    standardisation      the (mean, std) standardise_features applies: the config's (a run on
                         region files keeps its corpus's there), else the world's

and the order in which a run reads its data:

    Epochs               stream position p -> (example, text): a corpus on disk is read epoch
                         after epoch, each a fresh permutation of its images or of its (image,
                         text) pairs; the world in order (its examples are i.i.d. already)
    pick_text            the text a visit reads: the unit's own, or one drawn afresh

Determinism is the point of `train_loader`: batch k holds stream positions p = k·B .. k·B + B - 1,
Epochs maps p to an example, and every random choice of item p (which caption, the crop, the
masks, the negatives) comes from a generator seeded with (seed, p). So a run resumed at step k
sees exactly the batches an uninterrupted run would have seen, whatever the number of workers or
processes, and a second visit of an example (the next epoch) draws afresh.
"""

import signal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

# Per-channel mean and standard deviation of the images the model sees. ImageNet's values are
# the common choice for real photos (VirTex, CoCa implementations); we keep them so the same
# normalisation serves real data (train.py --data) and the world.
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)
# CLIP's statistics (of its training images), which open_clip's released models, CoCa's among
# them, were trained with [code: open_clip constants.py, OPENAI_DATASET_MEAN / _STD]; a model
# keeps the pair it was trained with in its config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalise_image(x: Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> Tensor:
    """float (3, H, W) in [0, 1] -> (x - mean) / std per channel (default: ImageNet's)."""
    mean = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x - mean) / std  # (3, H, W)


def image_to_tensor(image: np.ndarray, mean=IMAGE_MEAN, std=IMAGE_STD) -> Tensor:
    """uint8 (H, W, 3) in [0, 255] -> float32 (3, H, W), normalised per channel."""
    if not image.flags.writeable:  # np.asarray(PIL image) is read-only; torch warns on those
        image = image.copy()
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return normalise_image(x, mean, std)  # (3, H, W)


class Epochs:
    """Which example the p-th item of a training stream reads (p = 0, 1, 2, ...; train_loader's
    batch k of B holds p = k·B .. k·B + B - 1): epochs(p) -> (example index, text index or None).

    A corpus on disk is a few thousand images read many times over, so the stream is cut into
    epochs of U units, and epoch e = p // U visits every unit once, in a permutation seeded by
    (seed, e): a new order, new batch neighbours (contrastive and ITM negatives) every epoch.
    A unit is an image (per_text False: the visit draws one of its captions afresh, text None)
    or one (image, text) pair (per_text True: each caption, or each VQA question, is a unit, as
    UNITER and Oscar count their data). A corpus is a source with text_counts() (shared.folders,
    shared.vqa); any other source is the world (shared.world), whose train split is a million
    i.i.d. examples: it is read in order, example p mod its length, per image.

    A pure function of (seed, p), in every process: resume, DataLoader workers and torchrun's
    slices all read the same stream."""

    def __init__(self, source, seed: int = 0, per_text: bool = False):
        self.seed, self.shuffle = seed, hasattr(source, "text_counts")
        self.images = len(source)
        self.image_of = self.text_of = None  # (U,) each, per_text on a corpus
        if per_text and self.shuffle:
            counts = np.asarray(source.text_counts())  # (images,) texts of each image
            self.image_of = np.repeat(np.arange(len(counts)), counts)  # (U,)
            self.text_of = np.arange(len(self.image_of)) - np.repeat(np.cumsum(counts) - counts,
                                                                     counts)  # (U,)
        self.units = self.images if self.image_of is None else len(self.image_of)
        if self.units == 0:
            raise ValueError("the training data holds no example")
        self._orders: dict[int, np.ndarray] = {}  # the last two epochs' permutations

    def __len__(self) -> int:
        """Units an epoch."""
        return self.units

    def order(self, epoch: int) -> np.ndarray:
        """(U,) the units in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # a batch straddles at most two epochs
                del self._orders[min(self._orders)]
            self._orders[epoch] = np.random.default_rng([self.seed, 29, epoch]).permutation(
                self.units)
        return self._orders[epoch]

    def __call__(self, p: int) -> tuple[int, int | None]:
        epoch, r = divmod(p, self.units)
        unit = int(self.order(epoch)[r]) if self.shuffle else r
        if self.image_of is None:
            return unit, None
        return int(self.image_of[unit]), int(self.text_of[unit])

    def describe(self) -> str:
        """What one epoch is, for the run's log."""
        if not self.shuffle:
            return f"{self.units:,} examples of the world, in order"
        if self.image_of is None:
            return (f"{self.units:,} images an epoch, in a new order each epoch (a caption drawn "
                    f"at each visit)")
        return (f"{self.units:,} (image, text) pairs of {self.images:,} images an epoch, in a "
                f"new order each epoch")


def pick_text(texts: list, text: int | None, rng: np.random.Generator):
    """texts[text], the text of the visited unit; one drawn with `rng` when the unit is a whole
    image (text None), or when the example read is not the one asked for (a corpus replaces an
    unreadable file by the next readable one, which may have fewer texts)."""
    if text is not None and text < len(texts):
        return texts[text]
    return texts[rng.integers(len(texts))]


class ImageTextDataset(Dataset):
    """Item p: the p-th visit of the stream (Epochs, per image): the image and one of its
    captions, drawn afresh at every visit, tokenised.

    Which example and which caption are pure functions of (seed, p), so the data order never
    depends on workers or on where a run was resumed.
    """

    def __init__(self, source, tokenizer, max_len: int, seed: int = 0, mean=IMAGE_MEAN,
                 std=IMAGE_STD):
        self.source, self.tokenizer, self.max_len, self.seed = source, tokenizer, max_len, seed
        self.mean, self.std = mean, std  # the per-channel statistics the model was trained with
        self.epochs = Epochs(source, seed)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, p: int) -> dict:
        index, text = self.epochs(p)
        example = self.source.example(index, regions=False)
        caption = pick_text(example["captions"], text, np.random.default_rng([self.seed, 7, p]))
        tokens = self.tokenizer.encode(caption, max_len=self.max_len)
        return {"image": image_to_tensor(example["image"], self.mean, self.std),  # (3, H, W)
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
    """Batch k (k = first, first + 1, ...) of size B is stream positions k·B .. k·B + B - 1, of
    which this sampler yields a rank's share: the b = B / N positions k·B + r·b .. k·B + r·b +
    b - 1 (never ends; the dataset maps a position to its example, see Epochs)."""

    def __init__(self, first: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.first, self.batch_size = first, batch_size
        self.share = batch_size // world_size
        self.offset = rank * self.share

    def __iter__(self):
        k = self.first
        while True:
            start = k * self.batch_size + self.offset
            yield from range(start, start + self.share)
            k += 1


def micro_batch_size(batch_size: int, grad_accum_steps: int, world_size: int) -> int:
    """The examples of one forward of all processes together, batch_size / grad_accum_steps,
    which the world_size processes split evenly. A ValueError when either does not divide."""
    if batch_size % grad_accum_steps:
        raise ValueError(f"batch_size {batch_size} is not divisible by grad_accum_steps "
                         f"{grad_accum_steps}")
    micro = batch_size // grad_accum_steps
    if micro % world_size:
        raise ValueError(f"the micro-batch of {micro} examples (batch_size / grad_accum_steps) "
                         f"cannot be split over {world_size} processes")
    return micro


def train_batches(paper, source, tokenizer, config, seed: int, step: int, num_workers: int,
                  pin_memory: bool, rank: int = 0, world_size: int = 1, log=print):
    """train.py's endless iterator of micro-batches of the paper's train_dataset on `source` (the
    world or a corpus on disk), started at optimizer step `step` (a resumed run continues the
    same stream); this rank's slice of each. The epochs it makes are logged. The loader draws
    a worker seed from torch's RNG when it starts. A ValueError names a bad batch size."""
    micro = micro_batch_size(config.batch_size, config.grad_accum_steps, world_size)
    dataset = paper.train_dataset(source, tokenizer, config, seed=seed)
    epochs = config.max_steps * config.batch_size / len(dataset)
    log(f"training data: {dataset.epochs.describe()}; {config.max_steps:,} steps of "
        f"{config.batch_size} items make {epochs:.2f} epochs")
    return iter(train_loader(dataset, micro, step * config.grad_accum_steps, paper.collate_fn,
                             num_workers=num_workers, pin_memory=pin_memory, rank=rank,
                             world_size=world_size))


def image_captions(source, n: int) -> list[list[str]]:
    """The captions of each of the first n images (all of a smaller corpus) of a corpus on disk
    (its records) or of the world (shared.world.World): what a tokenizer is trained on, and
    SCST's CIDEr-D counts its document frequencies over."""
    if hasattr(source, "records"):
        return [list(captions) for _, captions in source.records[:n]]
    return [source.example(i, regions=False)["captions"] for i in range(min(n, len(source)))]


def caption_texts(source, n: int) -> list[str]:
    """The captions of the first n images, one list (image_captions)."""
    return [c for captions in image_captions(source, n) for c in captions]


def train_loader(dataset: Dataset, batch_size: int, start_step: int, collate_fn,
                 num_workers: int = 0, pin_memory: bool = False, rank: int = 0,
                 world_size: int = 1) -> DataLoader:
    """An endless DataLoader whose k-th batch (counting from step 0) holds items
    k·B .. k·B + B - 1 of `dataset`, stream positions that grow without end (the papers'
    datasets map them to examples epoch by epoch: Epochs); it starts at `start_step`. Across N
    processes (torchrun), rank r's loader yields its slice of each of those batches, B / N
    examples (B must be divisible by N): together the ranks see the one-process batches."""
    if batch_size % world_size:
        raise ValueError(f"the batch of {batch_size} cannot be split over {world_size} "
                         f"processes")
    sampler = _StepRange(start_step, batch_size, rank, world_size)
    return DataLoader(dataset, batch_size=batch_size // world_size, sampler=sampler,
                      collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0, drop_last=True,
                      worker_init_fn=ignore_stop_signals if num_workers else None)


def ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: leave SIGINT and SIGTERM to the training process. Ctrl-C reaches
    every process of the terminal's group, and a worker that died of it would take the step in
    progress down with it; the main process decides when to stop (train.py), and a worker still
    exits when its parent does (the DataLoader watches for that)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def close_loader(batches) -> None:
    """Stop the worker processes of a DataLoader iterator now, as its destructor would. The
    workers ignore SIGTERM (ignore_stop_signals), so when a run ends in an exception, whose
    traceback keeps the iterator alive, multiprocessing's exit handler would send them SIGTERM in
    vain and then wait for them forever. A single-process iterator has nothing to stop."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # the multi-process iterator's own
    if shutdown is not None:
        shutdown()


def worker_message(error: Exception) -> str:
    """The message of an exception raised in a loader worker (the DataLoader re-raises it with
    the worker's whole traceback as its text): the last line, without the type name."""
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    return lines[-1].removeprefix(f"{type(error).__name__}: ")


# --- regions (Oscar, UNITER) ---------------------------------------------------------------------

def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (the four models keep all of them on one)."""
    return next(model.parameters()).device


class RecentExamples:
    """source.example(i), keeping the last `size` examples made (this process; every DataLoader
    worker has its own). World and corpus examples are pure functions of their index, so keeping
    one changes nothing but its cost: a dataset that reuses an image of its own micro-batch
    (UNITER's ITM negatives) makes it once."""

    def __init__(self, source, size: int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.source, self.size, self.kept = source, size, {}

    def __call__(self, index: int) -> dict:
        if index not in self.kept:
            if len(self.kept) >= self.size:
                del self.kept[next(iter(self.kept))]  # the oldest (dicts keep insertion order)
            self.kept[index] = self.source.example(index)
        return self.kept[index]


def pad_rows(rows: list[Tensor]) -> Tensor:
    """[(n_b, ...)] -> (B, max n_b, ...), zero-padded: a batch of per-image regions."""
    out = rows[0].new_zeros((len(rows), max(len(r) for r in rows)) + rows[0].shape[1:])
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out


def flat_targets(labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(B, T) labels (ignore_index = not predicted) -> (positions (M,) into the flattened B·T
    tokens, targets (M,)). Computed on the CPU by the collate, so the model gathers its M
    masked outputs with index_select: no data-dependent shape and no host-device sync in the
    step."""
    positions = (labels.flatten() != ignore_index).nonzero().squeeze(1)  # (M,)
    return positions, labels.flatten()[positions]


_STATISTICS_EXAMPLES = 500  # training examples whose regions give feature_statistics
_statistics_cache: dict = {}


def feature_statistics(world_config) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std (F,) of the regions of the first 500 training examples (the
    std floored, shared.folders.floored_std; the world's dimensions are all above it): the
    statistics of the `standardise_features` switch of Oscar's and UNITER's tiny presets. A pure
    function of the world's config, so training and evaluation (and a fine-tuning run) compute
    the same numbers without storing them.

    Why (OURS, tiny presets): the world's features share a large constant component (the norm of
    their mean is 1.5x their spread), which a Linear + LayerNorm keeps, so the part that tells
    regions apart starts small; trained from scratch, a model can then learn to ignore the image
    for hundreds of updates, and standardising removes that start-up delay (see RESULTS.md).
    The papers read raw detector features, from a BERT initialisation."""
    from shared.folders import floored_std  # near-constant dimensions: floored there
    from shared.world import World  # imported where read: importing a paper skips the world

    key = tuple(sorted(vars(world_config).items()))
    if key not in _statistics_cache:
        world = World(world_config, "train")
        features = np.concatenate([world.example(i)["features"]
                                   for i in range(min(_STATISTICS_EXAMPLES, len(world)))])
        _statistics_cache[key] = (torch.from_numpy(features.mean(0)).float(),
                                  torch.from_numpy(floored_std(features.std(0))[0]).float())
    return _statistics_cache[key]


def check_feature_size(features, feature_dim: int) -> None:
    """A ValueError when an example's region features (N, F) are not feature_dim wide."""
    if features.shape[1] != feature_dim:
        raise ValueError(f"the regions have {features.shape[1]}-d features but feature_dim is "
                         f"{feature_dim}")


def statistics_problems(config) -> list[str]:
    """Config checks shared by Oscar and UNITER: feature_mean and feature_std (standardisation)
    hold feature_dim numbers each, or none."""
    m, s = len(config.feature_mean), len(config.feature_std)
    if m == s and m in (0, config.feature_dim):
        return []
    return [f"feature_mean and feature_std hold feature_dim ({config.feature_dim}) numbers each, "
            f"or none; got {m} and {s}"]


def standardisation(config, source) -> tuple[Tensor, Tensor] | None:
    """The (mean, std) (F,) that Oscar's and UNITER's `standardise_features` subtracts and
    divides by, or None when it is off. A run on region files on disk keeps its corpus's
    statistics in the config (feature_mean, feature_std), so its checkpoint is evaluated, and
    fine-tuned, with the numbers it was trained with; a run on the world computes them from the
    world's config (feature_statistics). source: a World, a WorldConfig, or a region folder
    (shared.folders.RegionFolder: the statistics of its own first images)."""
    if not config.standardise_features:
        return None
    if config.feature_mean:
        return (torch.tensor(config.feature_mean, dtype=torch.float32),
                torch.tensor(config.feature_std, dtype=torch.float32))
    if source is None:
        raise ValueError("standardise_features needs the world_config of the examples (or the "
                         "feature_mean and feature_std of the config)")
    if hasattr(source, "feature_statistics"):  # a region folder
        return source.feature_statistics()
    return feature_statistics(getattr(source, "config", source))  # a World, or its config
