"""Image-caption corpora on disk, behind the world's interface (VirTex and CoCa train on them).

    folder = CaptionFolder.coco("annotations/captions_train2017.json", "train2017", 224)
    folder = CaptionFolder.jsonl("my_corpus.jsonl", 224)
    len(folder); folder.example(i) -> {"image": uint8 (S, S, 3), "captions": [str, ...]}

That is what the papers' datasets read from shared.world.World (`len`, `example(i,
regions=False)`), so `train.py --data coco:FILE` or `--data jsonl:FILE` swaps the corpus and
nothing else.

Formats:
    coco    the COCO captions annotation file: {"images": [{"id", "file_name"}, ...],
            "annotations": [{"image_id", "caption"}, ...]}; file names are relative to the image
            folder (default: `images/` beside the JSON, the layout shared.world.export_split
            writes)
    jsonl   one JSON object a line: {"image": path, "captions": [str, ...]}; a relative path is
            relative to the JSONL file's folder

Images are read with Pillow, converted to RGB whatever their mode (RGBA and LA on black,
grayscale, palette, CMYK), resized so the shorter side is `image_size` and centre-cropped to a
square. What is wrong with the corpus is dealt with as follows:
    * an annotation file without a needed key: ValueError at start, naming the key and file;
    * an empty caption (after stripping): dropped, counted in `dropped_captions`;
    * an image with no caption left, or whose file is missing: dropped, counted in
      `dropped_images`;
    * an image that cannot be decoded when it is read: a warning, and the next readable image
      of the corpus is returned in its place (`example` never raises for a bad file); the
      count is in `unreadable` (per process: DataLoader workers count their own), and the
      path is appended to the file `unreadable_log` if one is set (train.py sets it to
      <out>/unreadable.txt and reports the number of files in it, from every worker).
Overlong captions are the tokenizer's business: Tokenizer.encode(max_len) keeps the final [SEP].
"""

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> RGB. Transparency (RGBA, LA, a palette with transparency) is laid on
    black; CMYK, grayscale and palette images are converted by Pillow."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file -> uint8 (size, size, 3): RGB, shorter side resized to `size` (bicubic),
    centre crop. Raises OSError (or ValueError) when the file cannot be decoded."""
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, not later
        image = to_rgb(image)
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return np.array(image.crop((left, top, left + size, top + size)))  # (S, S, 3), writable


def _coco_records(annotation_file: Path) -> list[tuple[str, list[str]]]:
    """(file_name, captions) of every image of a COCO captions annotation file, in its order;
    a missing key is a ValueError naming the key and where it is missing."""
    if not annotation_file.is_file():
        raise FileNotFoundError(f"no annotation file {annotation_file}")
    data = json.loads(annotation_file.read_text())
    where = str(annotation_file)
    files = {}
    for k, image in enumerate(_need(data, "images", where)):
        files[_need(image, "id", f"{where}, images[{k}]")] = _need(
            image, "file_name", f"{where}, images[{k}]")
    captions = {image_id: [] for image_id in files}
    for k, note in enumerate(_need(data, "annotations", where)):
        image_id = _need(note, "image_id", f"{where}, annotations[{k}]")
        caption = _need(note, "caption", f"{where}, annotations[{k}]")
        if image_id not in captions:
            raise ValueError(f"{where}, annotations[{k}]: image_id {image_id} is not in 'images'")
        captions[image_id].append(caption)
    return [(files[i], captions[i]) for i in files]


def _keep(records: list[tuple[Path, list]]) -> tuple[list[tuple[Path, list[str]]], int, int]:
    """Drop empty captions, and images left without a caption or whose file is missing.
    Returns (kept records, dropped captions, dropped images)."""
    kept, dropped_captions, dropped_images = [], 0, 0
    for path, captions in records:
        good = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        dropped_captions += len(captions) - len(good)
        if good and Path(path).is_file():
            kept.append((Path(path), good))
        else:
            dropped_images += 1
    return kept, dropped_captions, dropped_images


def _note_unreadable(corpus, path: Path, what: str) -> None:
    """Count, warn, and append the path to corpus.unreadable_log (one line per file, appended
    by whichever process read it)."""
    corpus.unreadable += 1
    warnings.warn(f"skipping unreadable {what}; {corpus.unreadable} so far in this process")
    if corpus.unreadable_log is not None:
        with open(corpus.unreadable_log, "a") as f:
            f.write(f"{path}\n")


def unreadable_files(log: Path) -> int:
    """How many different files an unreadable_log names (0 when it does not exist)."""
    return len(set(Path(log).read_text().split("\n")) - {""}) if Path(log).exists() else 0


def _need(record: dict, key: str, where: str):
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r}")
    return record[key]


class CaptionFolder:
    """An image-caption corpus: a list of (image path, captions), read lazily."""

    def __init__(self, records: list[tuple[Path, list[str]]], image_size: int):
        self.records, self.dropped_captions, self.dropped_images = _keep(records)
        if not self.records:
            raise ValueError("no image with a caption and a file on disk is left in the corpus")
        self.image_size = image_size
        self.unreadable, self.unreadable_log = 0, None

    @classmethod
    def coco(cls, annotation_file: str | Path, image_dir: str | Path | None = None,
             image_size: int = 224) -> "CaptionFolder":
        """A COCO captions annotation file and its image folder (default: images/ beside it)."""
        annotation_file = Path(annotation_file)
        image_dir = annotation_file.parent / "images" if image_dir is None else Path(image_dir)
        return cls([(image_dir / name, captions)
                    for name, captions in _coco_records(annotation_file)], image_size)

    @classmethod
    def jsonl(cls, file: str | Path, image_size: int = 224) -> "CaptionFolder":
        """One {"image": path, "captions": [...]} object a line."""
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"no JSON-lines file {file}")
        records = []
        for n, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}, line {n}: not JSON ({e.msg})") from None
            path = Path(_need(record, "image", f"{file}, line {n}"))
            captions = _need(record, "captions", f"{file}, line {n}")
            if isinstance(captions, str):
                raise ValueError(f"{file}, line {n}: 'captions' must be a list of strings")
            records.append((path if path.is_absolute() else file.parent / path, captions))
        return cls(records, image_size)

    @classmethod
    def from_spec(cls, spec: str, image_size: int) -> "CaptionFolder":
        """train.py's --data for CoCa / VirTex: 'coco:ANNOTATION_JSON[,IMAGE_DIR]' or
        'jsonl:FILE'."""
        kind, _, rest = spec.partition(":")
        if kind == "coco" and rest:
            annotation, _, image_dir = rest.partition(",")
            return cls.coco(annotation, image_dir or None, image_size)
        if kind == "jsonl" and rest:
            return cls.jsonl(rest, image_size)
        raise ValueError(f"--data must be coco:ANNOTATION_JSON[,IMAGE_DIR] or jsonl:FILE, "
                         f"not {spec!r}")

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        """Every caption, for training a tokenizer on the corpus."""
        return [c for _, captions in self.records for c in captions]

    def example(self, i: int, regions: bool = False) -> dict:
        """{"image": uint8 (S, S, 3), "captions": [...]} of image i; an unreadable file gives
        the next readable image instead (with a warning)."""
        if regions:
            raise ValueError("a caption folder has no region features (Oscar and UNITER need a "
                             "region folder)")
        for k in range(len(self.records)):
            path, captions = self.records[(i + k) % len(self.records)]
            try:
                return {"image": load_image(path, self.image_size), "captions": captions}
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                _note_unreadable(self, path, f"image {path} ({type(e).__name__}: {e})")
        raise RuntimeError("no image of the corpus can be read")


# --- region features for Oscar and UNITER -------------------------------------------------------

REGION_KEYS = ("features", "boxes", "conf")  # needed in every npz; cls_prob, tags optional


class RegionFolder:
    """Captions (COCO format) and one region .npz per image (the layout that
    shared.world.export_split and shared.convert write):

        features (N, F) float, boxes (N, 4) x1/W, y1/H, x2/W, y2/H in [0, 1], conf (N,),
        optional cls_prob (N, C) (UNITER's MRC targets), tags (K,) str (Oscar), image_hw (2,)

    behind the world's interface: example(i) -> {"captions", "features" float32, "boxes",
    "conf", "cls_prob" (if stored), "tags" ([] if not stored)}, rows sorted by conf, highest
    first (the papers' models then keep their own number: UNITER, as its official code
    ChenRocks/UNITER does, conf > threshold within [min, max]; Oscar the first n_regions).
    The npz of image `file_name` is `<region_dir>/<file_name stem>.npz`. Images without an npz
    are dropped and counted; an npz that cannot be read, or lacks a key of REGION_KEYS, gives the
    next readable image with a warning (counted in `unreadable`)."""

    def __init__(self, records: list[tuple[Path, list[str]]]):
        self.records, self.dropped_captions, self.dropped_images = _keep(records)
        if not self.records:
            raise ValueError("no image with a caption and a region file is left in the corpus")
        self.unreadable, self.unreadable_log = 0, None
        self._statistics = None

    @classmethod
    def coco(cls, annotation_file: str | Path, region_dir: str | Path | None = None
             ) -> "RegionFolder":
        """A COCO captions file and the region folder (default: regions/ beside it)."""
        annotation_file = Path(annotation_file)
        region_dir = annotation_file.parent / "regions" if region_dir is None else Path(region_dir)
        records = _coco_records(annotation_file)
        return cls([(region_dir / (Path(name).stem + ".npz"), captions)
                    for name, captions in records])

    def __len__(self) -> int:
        return len(self.records)

    def _read(self, path: Path) -> dict:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in REGION_KEYS if k not in npz.files]
            if missing:
                raise ValueError(f"no {missing[0]!r} in the file")
            order = np.argsort(-npz["conf"].astype(np.float32), kind="stable")  # by conf, desc
            out = {"features": npz["features"].astype(np.float32)[order],
                   "boxes": npz["boxes"].astype(np.float32)[order],
                   "conf": npz["conf"].astype(np.float32)[order],
                   "tags": [str(t) for t in npz["tags"]] if "tags" in npz.files else []}
            if "cls_prob" in npz.files:
                out["cls_prob"] = npz["cls_prob"].astype(np.float32)[order]
        return out

    def example(self, i: int, regions: bool = True) -> dict:
        for k in range(len(self.records)):
            path, captions = self.records[(i + k) % len(self.records)]
            try:
                return {"captions": captions, **self._read(path)}
            except (OSError, ValueError, KeyError) as e:
                _note_unreadable(self, path, f"region file {path} ({type(e).__name__}: {e})")
        raise RuntimeError("no region file of the corpus can be read")

    def feature_statistics(self, n: int = 500):
        """Per-dimension mean and std of the region features of the first n images (the
        statistics of the tiny presets' standardise_features, computed on this corpus)."""
        import torch

        if self._statistics is None:
            features = np.concatenate([self.example(i)["features"]
                                       for i in range(min(n, len(self)))])
            self._statistics = (torch.from_numpy(features.mean(0)).float(),
                                torch.from_numpy(features.std(0)).float().clamp(min=1e-6))
        return self._statistics


def open_corpus(spec: str, inputs: str, image_size: int) -> CaptionFolder | RegionFolder:
    """train.py's --data: 'regions:ANNOTATION_JSON[,REGION_DIR]' for a model whose INPUTS are
    "regions", else 'coco:ANNOTATION_JSON[,IMAGE_DIR]' or 'jsonl:FILE' (CaptionFolder.from_spec).
    Raises ValueError (or OSError) naming what is wrong."""
    kind, _, rest = spec.partition(":")
    if inputs != "regions":
        return CaptionFolder.from_spec(spec, image_size)
    if kind != "regions" or not rest:
        raise ValueError(f"this model reads region features: give "
                         f"regions:ANNOTATION_JSON[,REGION_DIR], not {spec!r}")
    annotation, _, region_dir = rest.partition(",")
    return RegionFolder.coco(annotation, region_dir or None)
