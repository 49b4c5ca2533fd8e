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
            relative to the JSONL file's folder, and an absolute one must lie under it too
    karpathy  the split file of Karpathy & Fei-Fei (2015), dataset_coco.json / dataset_flickr30k
            .json: {"images": [{"filepath" (COCO only), "filename", "split", "sentences":
            [{"raw"}, ...], ...}]}; `split` is train, restval, val or test; images are at
            IMAGE_ROOT/filepath/filename (IMAGE_ROOT defaults to the JSON's folder). A run trains
            on train + restval (KARPATHY_TRAIN); `karpathy_split_counts` gives the counts, which
            the papers' splits fix (KARPATHY_COUNTS)

Images are read with Pillow, converted to RGB whatever their mode (RGBA and LA on black,
grayscale, palette, CMYK), resized so the shorter side is `image_size` and centre-cropped to a
square. What is wrong with the corpus is dealt with as follows:
    * an annotation file that is not UTF-8 JSON (a BOM is allowed), lacks a needed key, or holds
      a value of the wrong type (a list where an object belongs, a file name or a caption that
      is not a string, null included, an image id that is neither an integer nor a string, the
      same id twice): ValueError at start, naming the file and the record;
    * a file name that leads outside its root (a `..` that climbs out, an absolute path
      elsewhere; the root is the image folder, the region folder, IMAGE_ROOT, or the JSONL
      file's folder): ValueError at start naming the record (`inside`), never a read there;
    * an empty caption (after stripping), or one that is not valid UTF-8 (a lone surrogate
      from a "\\ud800" escape): dropped, counted in `dropped_captions`;
    * an image with no caption left, or whose file is missing or no regular file (a folder, a
      FIFO): dropped, counted in `dropped_images`;
    * a path that is no regular file when an image is read (a FIFO put there since, whose
      open() would wait for a writer forever): refused unopened by open_rgb, so unreadable;
    * an image that cannot be decoded when it is read: a warning, and the next readable image
      of the corpus is returned in its place (`example` never raises for a bad file); the
      count is in `unreadable` (per process: DataLoader workers count their own), and the
      path is appended to the file `unreadable_log` if one is set (train.py sets it to
      <out>/unreadable.txt and reports the number of files in it, from every worker);
    * no image left at all: ValueError naming the annotation file.
A JSON-lines file is split at "\\n" only, so a caption may hold U+2028 or other characters
Python's str.splitlines() would break at. Overlong captions are the tokenizer's business:
Tokenizer.encode(max_len) keeps the final [SEP].
"""

import dataclasses
import json
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> RGB. Transparency (RGBA, LA, a palette with transparency) is laid on
    black; 16- and 32-bit greyscale by its range (_grey_to_8_bits); CMYK, 8-bit grayscale and
    palette images are converted by Pillow."""
    if image.mode.startswith("I;16") or image.mode == "I":
        return _grey_to_8_bits(image).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGB", image.size)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def _grey_to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit ("I;16", "I;16B", ...) or 32-bit ("I") greyscale image -> "L". Pillow's own
    conversion clips every value above 255, which turns a 16-bit image almost white. 16-bit
    values keep their top 8 bits (value >> 8). Mode "I" is what some readers give a 16-bit
    file, so its values are read by their range: negatives are 0, values up to 255 are kept,
    up to 65535 are treated as 16-bit (>> 8), and anything larger is scaled by the image's
    maximum to 0..255."""
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I":
        values = values.clip(0, None)
        top = int(values.max()) if values.size else 0
        if top > 65535:
            values = values * 255 // top
        elif top > 255:
            values = values >> 8
    else:
        values = values >> 8
    return Image.fromarray(values.astype(np.uint8), mode="L")


# What a path that is not a regular file turns out to be, for open_regular's refusal.
_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: str | Path):
    """The file at `path` opened for binary reading, or an OSError "not a regular file (a
    FIFO)" when it is anything else (the message leaves the naming of the path to the caller).
    A reader must never block or run forever on a name a data file gave it: open() of a FIFO
    waits until another process opens it for writing, and a device such as /dev/zero never
    ends. The open itself does not block (O_NONBLOCK, which regular files ignore), and the kind
    is checked on the descriptor opened, so a file swapped after a check is refused too."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "of another kind")
            raise OSError(f"not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_rgb(path: Path) -> Image.Image:
    """An image file, decoded now, as RGB (to_rgb). Anything that stops the decoding is an
    OSError "cannot read PATH: reason", so that every reader that skips unreadable files skips
    this one too: Pillow raises many kinds on a damaged header (SyntaxError, struct.error,
    IndexError, OverflowError, ...), and DecompressionBombError is no OSError. A path that is
    not a regular file (a FIFO, a device, a folder) is refused before a byte is read
    (open_regular): opening a FIFO would wait for a writer forever.

    Images of more than Image.MAX_IMAGE_PIXELS pixels (Pillow's limit, 89,478,485 by default,
    about 9,500 x 9,500; read at each call and not changed here) are refused before they are
    decoded: a PNG of a few KB can declare 30,000 x 30,000 pixels, 2.7 GB as RGB. Pillow
    itself only warns up to twice that limit; here the warning is the refusal. Setting the
    limit to None lifts it, as for Pillow."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as f, Image.open(f) as image:
                image.load()  # decode now: a truncated file fails here, not later
                return to_rgb(image)
    except Exception as e:  # noqa: BLE001 -- any decoding failure is the file's fault
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OSError(f"cannot read {path}: {reason}") from None


# Resize + centre crop first scales the shorter side to `size`, so a 4000 x 1 image becomes
# 896,000 x 224 pixels (600 MB as RGB) of which a 224 x 224 square is kept. When the longer
# side would scale beyond MAX_RESIZED_SIDE times `size`, only the kept region is resampled
# (Pillow's resize with a source box), so the work is bounded by the output. Pixels there may
# differ from torchvision's by rounding at the crop's borders; below the bound load_image is
# torchvision's transform pixel for pixel.
MAX_RESIZED_SIDE = 8


def load_image(path: Path, size: int) -> np.ndarray:
    """An image file -> uint8 (size, size, 3): RGB (open_rgb), shorter side resized to `size`
    (bicubic), centre crop, pixel for pixel as torchvision's Resize(size) + CenterCrop(size) on
    a Pillow image, the evaluation transform of open_clip and of most released vision models:
    the longer side is size · long / short truncated, the crop's offset (excess / 2) rounded
    half to even. Beyond an aspect ratio of MAX_RESIZED_SIDE only the kept region is resampled
    (see there). Raises OSError naming the file when it cannot be decoded or is too large
    (open_rgb)."""
    image = open_rgb(path)
    w, h = image.size
    longer = int(size * max(w, h) / min(w, h))
    if longer > MAX_RESIZED_SIDE * size:
        # the crop of the resized image, in source pixels: the scale along each side is kept
        scale = max(w, h) / longer
        start = int(round((longer - size) / 2.0))
        kept = (start * scale, (start + size) * scale)
        box = (kept[0], 0, kept[1], h) if w > h else (0, kept[0], w, kept[1])
        return np.array(image.resize((size, size), Image.BICUBIC, box=box))
    w, h = (size, longer) if w <= h else (longer, size)
    image = image.resize((w, h), Image.BICUBIC)
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.array(image.crop((left, top, left + size, top + size)))  # (S, S, 3), writable


def _read_text(file: Path) -> str:
    """A text file that must be UTF-8 (JSON is, RFC 8259), whatever the locale; a leading BOM,
    which some editors write, is dropped. Bytes that are not UTF-8 are a ValueError naming the
    file and the offset."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 4]!r})"
                         ) from None


def _parse_json(text: str, where: str):
    """json.loads, with the place named in its errors (the decoder's own name neither the file
    nor the line, and deep nesting raises RecursionError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})"
                         ) from None
    except RecursionError:
        raise ValueError(f"{where}: not JSON we can read (nested too deeply)") from None


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {_json_type(value)}")
    return value


def _coco_records(annotation_file: Path) -> list[tuple[str, list]]:
    """(file_name, captions) of every image of a COCO captions annotation file, in its order;
    a missing key or a value of the wrong type (a caption that is not a string among them) is a
    ValueError naming the file and the record. Captions are returned as found (_keep drops the
    empty ones and those that are not valid UTF-8)."""
    if not annotation_file.is_file():
        raise FileNotFoundError(f"no annotation file {annotation_file}")
    where = str(annotation_file)
    data = _parse_json(_read_text(annotation_file), where)
    files = {}
    for k, image in enumerate(_list(_need(data, "images", where), f"{where}, 'images'")):
        at = f"{where}, images[{k}]"
        image_id, name = _need(image, "id", at), _need(image, "file_name", at)
        # bool is an int to Python, and 1.0 == 1: only true integers and strings are ids
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise ValueError(f"{at}: 'id' must be an integer or a string, got "
                             f"{_json_type(image_id)}")
        if not isinstance(name, str):
            raise ValueError(f"{at}: 'file_name' must be a string, got {_json_type(name)}")
        if image_id in files:
            raise ValueError(f"{at}: id {image_id!r} is used by an earlier image too")
        files[image_id] = name
    captions = {image_id: [] for image_id in files}
    for k, note in enumerate(_list(_need(data, "annotations", where), f"{where}, 'annotations'")):
        at = f"{where}, annotations[{k}]"
        image_id, caption = _need(note, "image_id", at), _need(note, "caption", at)
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)) \
                or image_id not in captions:
            raise ValueError(f"{at}: image_id {image_id!r} is not an id of 'images'")
        if not isinstance(caption, str):  # a damaged file, not an empty caption: refused
            raise ValueError(f"{at}: 'caption' must be a string, got {_json_type(caption)}")
        captions[image_id].append(caption)
    return [(files[i], captions[i]) for i in files]


KARPATHY_TRAIN = ("train", "restval")  # what the papers train on; val and test are held out
# images per split of the published files [Karpathy & Fei-Fei 2015]: (train + restval, val, test)
KARPATHY_COUNTS = {"coco": (113_287, 5_000, 5_000), "flickr30k": (29_000, 1_014, 1_000)}


def _karpathy_images(file: Path) -> tuple[str, list[dict]]:
    """(dataset name, the image records) of a Karpathy split file, each checked for the keys
    the reader needs and their types (a sentence's `raw` must be a string: training and
    evaluation both read it); a ValueError names the file and the record."""
    if not file.is_file():
        raise FileNotFoundError(f"no Karpathy split file {file}")
    where = str(file)
    data = _parse_json(_read_text(file), where)
    images = _list(_need(data, "images", where), f"{where}, 'images'")
    for k, image in enumerate(images):
        at = f"{where}, images[{k}]"
        for key in ("filename", "split"):
            if not isinstance(_need(image, key, at), str):
                raise ValueError(f"{at}: {key!r} must be a string, got {_json_type(image[key])}")
        if not isinstance(image.get("filepath", ""), str):
            raise ValueError(f"{at}: 'filepath' must be a string")
        for j, sentence in enumerate(_list(_need(image, "sentences", at), f"{at}, 'sentences'")):
            raw = _need(sentence, "raw", f"{at}, sentences[{j}]")
            if not isinstance(raw, str):  # else the evaluation fails after captioning every image
                raise ValueError(f"{at} ({image['filename']}), sentences[{j}]: 'raw' must be a "
                                 f"string, got {_json_type(raw)}")
    name = data.get("dataset", "") if isinstance(data, dict) else ""
    return (name if isinstance(name, str) else ""), images


def karpathy_split_counts(file: str | Path) -> dict[str, int]:
    """{split: images} of a Karpathy split file, as written in it (no image file is opened)."""
    _, images = _karpathy_images(Path(file))
    counts: dict[str, int] = {}
    for image in images:
        counts[image["split"]] = counts.get(image["split"], 0) + 1
    return counts


def karpathy_count_warning(file: str | Path) -> str | None:
    """A line when a coco / flickr30k split file does not hold the published counts (a
    different file version, or a file cut down by hand), else None."""
    name, _ = _karpathy_images(Path(file))
    if name not in KARPATHY_COUNTS:
        return None
    counts = karpathy_split_counts(file)
    found = (counts.get("train", 0) + counts.get("restval", 0), counts.get("val", 0),
             counts.get("test", 0))
    if found == KARPATHY_COUNTS[name]:
        return None
    return (f"warning: {file} holds {found[0]:,} / {found[1]:,} / {found[2]:,} train+restval / "
            f"val / test images; the published {name} split has "
            f"{' / '.join(f'{n:,}' for n in KARPATHY_COUNTS[name])}: numbers will not compare "
            f"with the papers'")


def _karpathy_path(root: Path, image: dict, where: str) -> Path:
    """root/filepath/filename of a Karpathy record; a ValueError naming it when that lies
    outside root."""
    return inside(root, Path(image.get("filepath", "")) / image["filename"], where)


def karpathy_split(file: str | Path, image_root: str | Path | None, split: str) -> list[dict]:
    """The images of one split of a Karpathy file, for evaluation: [{"image_id", "path",
    "captions"}], in file order; image_id is `cocoid` (COCO), else `imgid` (Flickr30k), else the
    position in the file; captions are the raw sentences (COCO has 5-7 an image)."""
    file = Path(file)
    root = file.parent if image_root is None else Path(image_root)
    _, images = _karpathy_images(file)
    chosen = [(k, image) for k, image in enumerate(images) if image["split"] == split]
    if not chosen:
        raise ValueError(f"{file}: no image of split {split!r}")
    return [{"image_id": image.get("cocoid", image.get("imgid", k)),
             "path": _karpathy_path(root, image, f"{file}, images[{k}]"),
             "captions": [sentence["raw"] for sentence in image["sentences"]]}
            for k, image in chosen]


def _usable(caption) -> bool:
    """A caption worth keeping: a string with something besides whitespace, and valid UTF-8
    (a JSON "\\ud800" escape gives a lone surrogate, which the tokenizer cannot encode)."""
    if not isinstance(caption, str) or not caption.strip():
        return False
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _keep(records: list[tuple[Path, list]]) -> tuple[list[tuple[Path, list[str]]], int, int]:
    """Drop unusable captions (empty, not strings, not UTF-8), and images left without a
    caption or whose file is missing. Returns (kept records, dropped captions, dropped images)."""
    kept, dropped_captions, dropped_images = [], 0, 0
    for path, captions in records:
        good = [c.strip() for c in captions if _usable(c)]
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
    """record[key], where record must be a JSON object: else a ValueError naming `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with {key!r}, got {_json_type(record)}")
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r}")
    return record[key]


def inside(root: str | Path, name: str | Path, where: str = "") -> Path:
    """root / name, refused with a ValueError naming `where` and the name when it lies outside
    root (a `..` that climbs out of it, an absolute path elsewhere): a data file may only name
    files under its own root. The check is on the path as written (normalised, symbolic links
    not followed), so a root whose images are links into another disk still reads."""
    path = Path(root) / name
    base = os.path.abspath(root)
    full = os.path.abspath(path)
    if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
        raise ValueError(f"{where + ': ' if where else ''}{str(name)!r} is outside {root}")
    return path


class CaptionFolder:
    """An image-caption corpus: a list of (image path, captions), read lazily."""

    def __init__(self, records: list[tuple[Path, list[str]]], image_size: int,
                 source: str | Path = "the corpus"):
        """records: (image path, captions); source: what they were read from, for errors."""
        self.records, self.dropped_captions, self.dropped_images = _keep(records)
        if not self.records:
            raise ValueError(f"{source}: no image with a caption and a file on disk is left "
                             f"({self.dropped_images} dropped)")
        self.image_size = image_size
        self.unreadable, self.unreadable_log = 0, None
        self.notes: list[str] = []  # lines for the run's log (karpathy: the split counts)

    @classmethod
    def coco(cls, annotation_file: str | Path, image_dir: str | Path | None = None,
             image_size: int = 224) -> "CaptionFolder":
        """A COCO captions annotation file and its image folder (default: images/ beside it)."""
        annotation_file = Path(annotation_file)
        image_dir = annotation_file.parent / "images" if image_dir is None else Path(image_dir)
        return cls([(inside(image_dir, name, f"{annotation_file}, images[{k}]"), captions)
                    for k, (name, captions) in enumerate(_coco_records(annotation_file))],
                   image_size, annotation_file)

    @classmethod
    def jsonl(cls, file: str | Path, image_size: int = 224) -> "CaptionFolder":
        """One {"image": path, "captions": [...]} object a line."""
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"no JSON-lines file {file}")
        records = []
        # "\n" only: str.splitlines() also breaks at U+2028, U+0085, ..., which JSON strings
        # may hold unescaped
        for n, line in enumerate(_read_text(file).split("\n"), start=1):
            if not line.strip():
                continue
            where = f"{file}, line {n}"
            record = _parse_json(line, where)
            image, captions = _need(record, "image", where), _need(record, "captions", where)
            if not isinstance(image, str):
                raise ValueError(f"{where}: 'image' must be a path string, got {_json_type(image)}")
            if not isinstance(captions, list):
                raise ValueError(f"{where}: 'captions' must be a list of strings, got "
                                 f"{_json_type(captions)}")
            wrong = [k for k, c in enumerate(captions) if not isinstance(c, str)]
            if wrong:
                raise ValueError(f"{where}: 'captions' must be a list of strings, item "
                                 f"{wrong[0]} is {_json_type(captions[wrong[0]])}")
            # an absolute path is kept as written when it lies under the file's folder
            records.append((inside(file.parent, image, where), captions))
        return cls(records, image_size, file)

    @classmethod
    def karpathy(cls, file: str | Path, image_root: str | Path | None = None,
                 image_size: int = 224, splits: tuple[str, ...] = KARPATHY_TRAIN
                 ) -> "CaptionFolder":
        """The images of `splits` of a Karpathy split file (training: train + restval), each
        with its raw sentences, at image_root/filepath/filename."""
        file = Path(file)
        root = file.parent if image_root is None else Path(image_root)
        _, images = _karpathy_images(file)
        unknown = sorted({image["split"] for image in images} - {"train", "restval", "val",
                                                                  "test"})
        if unknown:
            raise ValueError(f"{file}: unknown split {unknown[0]!r} (train, restval, val, test)")
        records = [(_karpathy_path(root, image, f"{file}, images[{k}]"),
                    [sentence["raw"] for sentence in image["sentences"]])
                   for k, image in enumerate(images) if image["split"] in splits]
        if not records:
            raise ValueError(f"{file}: no image of split {' + '.join(splits)}")
        folder = cls(records, image_size, file)
        counts = karpathy_split_counts(file)
        folder.notes = [f"{file}: " + ", ".join(f"{split} {counts.get(split, 0):,}" for split in
                                                ("train", "restval", "val", "test"))
                        + f" images; training on {' + '.join(splits)}"]
        folder.notes += [line for line in [karpathy_count_warning(file)] if line]
        return folder

    @classmethod
    def from_spec(cls, spec: str, image_size: int) -> "CaptionFolder":
        """train.py's --data for CoCa / VirTex: 'coco:ANNOTATION_JSON[,IMAGE_DIR]',
        'jsonl:FILE' or 'karpathy:SPLIT_JSON[,IMAGE_ROOT]' (its train + restval images)."""
        kind, _, rest = spec.partition(":")
        if kind == "coco" and rest:
            annotation, _, image_dir = rest.partition(",")
            return cls.coco(annotation, image_dir or None, image_size)
        if kind == "jsonl" and rest:
            return cls.jsonl(rest, image_size)
        if kind == "karpathy" and rest:
            split_file, _, image_root = rest.partition(",")
            return cls.karpathy(split_file, image_root or None, image_size)
        raise ValueError(f"--data must be coco:ANNOTATION_JSON[,IMAGE_DIR], jsonl:FILE or "
                         f"karpathy:SPLIT_JSON[,IMAGE_ROOT], not {spec!r}")

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> list[str]:
        """Every caption, for training a tokenizer on the corpus."""
        return [c for _, captions in self.records for c in captions]

    def text_counts(self) -> list[int]:
        """The captions of each image (shared.data.Epochs counts (image, caption) pairs)."""
        return [len(captions) for _, captions in self.records]

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

# Standardisation divides each feature dimension by its std over the first images. A dimension
# that is (nearly) constant there, e.g. a ReLU channel that stays 0 on those images, has std ~0,
# so a value it takes later would get a z-score of value / std ~ 1e4 (ResNet features). Its std
# is floored at STD_FLOOR times the median std over dimensions, the scale of a typical
# dimension: a near-constant dimension's z then stays within 1 / STD_FLOOR (10) times a typical
# dimension's for the same change, and every other dimension is unchanged.
STD_FLOOR = 0.1


def floored_std(std: np.ndarray) -> tuple[np.ndarray, float]:
    """(std (F,) with each entry below the floor raised to it, the floor): STD_FLOOR x the
    median std over dimensions (its mean when over half are constant, 1 when all are)."""
    typical = float(np.median(std)) or float(std.mean()) or 1.0
    floor = STD_FLOOR * typical
    return np.maximum(std, floor), floor


REGION_KEYS = ("features", "boxes", "conf")  # needed in every npz; cls_prob, tags optional
# Boxes this far outside [0, 1] are clipped: float rounding, and detectors that let a box run a
# pixel or two over the edge. Further out they are in another convention (pixels), refused.
BOX_SLACK = 0.01


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
    are dropped and counted; an npz that `_read` refuses gives the next readable image with a
    warning naming the file and the problem (counted in `unreadable`, as unreadable images are).
    `_read` refuses (ValueError naming the file):
        * a file numpy cannot read as an .npz without unpickling (empty, truncated, a .npy, a
          damaged zip, object arrays), or no regular file at all (a FIFO, a device);
        * a missing key of REGION_KEYS; an array that is not numbers (strings, complex) or not
          of its shape above: features (N, F), boxes (N, 4), conf (N,), cls_prob (N, C), tags
          a 1-D array of str (an empty array of any dtype is no tags); no regions (N = 0);
        * a NaN or infinite value (float64 values past float32's range included), which would
          reach training silently; a negative cls_prob;
        * boxes more than BOX_SLACK outside [0, 1] (pixels, most likely) or with x2 < x1 or
          y2 < y1; boxes within BOX_SLACK of the image are clipped to [0, 1]."""

    def __init__(self, records: list[tuple[Path, list[str]]], source: str | Path = "the corpus"):
        """records: (region .npz path, captions); source: what they were read from, for errors."""
        self.records, self.dropped_captions, self.dropped_images = _keep(records)
        if not self.records:
            raise ValueError(f"{source}: no image with a caption and a region file is left "
                             f"({self.dropped_images} dropped)")
        self.unreadable, self.unreadable_log = 0, None
        self.notes: list[str] = []  # lines for the run's log
        self._statistics, self._most_regions = None, None
        self.near_constant = None  # (dimensions, floor) once feature_statistics ran

    @classmethod
    def coco(cls, annotation_file: str | Path, region_dir: str | Path | None = None
             ) -> "RegionFolder":
        """A COCO captions file and the region folder (default: regions/ beside it)."""
        annotation_file = Path(annotation_file)
        region_dir = annotation_file.parent / "regions" if region_dir is None else Path(region_dir)
        # the stem alone never leaves region_dir, but a file_name that climbs out of its folder
        # is refused here too, as CaptionFolder.coco refuses it for the same annotation file
        records = []
        for k, (name, captions) in enumerate(_coco_records(annotation_file)):
            inside(region_dir, name, f"{annotation_file}, images[{k}]")
            records.append((region_dir / (Path(name).stem + ".npz"), captions))
        need_region_files(annotation_file, region_dir, [path for path, _ in records],
                          f"{region_dir}/<file_name stem>.npz")
        return cls(records, annotation_file)

    def __len__(self) -> int:
        return len(self.records)

    def text_counts(self) -> list[int]:
        """The captions of each image (shared.data.Epochs counts (image, caption) pairs)."""
        return [len(captions) for _, captions in self.records]

    def _read(self, path: Path) -> dict:
        """One region file -> features, boxes, conf, cls_prob (if stored) as float32 and tags,
        rows by conf, highest first; a ValueError naming the file for anything the class
        docstring lists."""
        return read_region_file(path)

    def read(self, path: Path) -> dict:
        """The region arrays of one .npz, checked as example(i) checks them; a ValueError
        naming the file where it would skip it (a tool given files by name reports them)."""
        return self._read(Path(path))

    def example(self, i: int, regions: bool = True) -> dict:
        for k in range(len(self.records)):
            path, captions = self.records[(i + k) % len(self.records)]
            try:
                return {"captions": captions, **self._read(path)}
            except ValueError as e:  # _read's messages name the file
                _note_unreadable(self, path, f"region file {e}")
        raise RuntimeError("no region file of the corpus can be read")

    def feature_statistics(self, n: int = 500):
        """Per-dimension mean and std of the region features of the first n images (the
        statistics of the tiny presets' standardise_features, computed on this corpus), the std
        floored (floored_std). Also sets `near_constant`: (dimensions floored, the floor)."""
        import torch

        if self._statistics is None:
            rows = [self.example(i)["features"] for i in range(min(n, len(self)))]  # (N_i, F_i)
            for i, f in enumerate(rows):
                if f.shape[1] != rows[0].shape[1]:
                    raise ValueError(f"{self.records[i][0]} has {f.shape[1]}-d features, the "
                                     f"files before it {rows[0].shape[1]}-d; one corpus, one "
                                     f"feature size")
            self._most_regions = max(len(f) for f in rows)
            features = np.concatenate(rows)  # (Σ N_i, F)
            raw = features.std(0)  # (F,)
            std, floor = floored_std(raw)
            self.near_constant = (int((raw < floor).sum()), floor)
            self._statistics = (torch.from_numpy(features.mean(0)).float(),
                                torch.from_numpy(std).float())
        return self._statistics

    def most_regions(self, n: int = 500) -> int:
        """The most regions one of the first n region files holds (those feature_statistics
        reads), against which a model's n_regions is checked."""
        if self._most_regions is None:
            self._most_regions = max(len(self.example(i)["features"])
                                     for i in range(min(n, len(self))))
        return self._most_regions


def need_region_files(source, region_dir: Path, paths: list[Path], expected: str) -> None:
    """A ValueError naming the folder when not one of the images has its region file in it (a
    wrong or missing REGION_DIR), rather than every image dropped. expected: the names looked
    for, e.g. "regions/<file_name stem>.npz"."""
    if not paths or any(path.is_file() for path in paths):
        return
    absent = "" if region_dir.is_dir() else f"; there is no folder {region_dir}"
    raise ValueError(f"{source}: no region file in {region_dir}/ for any of its {len(paths):,} "
                     f"images (expected {expected}){absent}")


def read_region_file(path: str | Path) -> dict:
    """The region arrays of one .npz as RegionFolder's examples hold them (region_arrays); a
    ValueError naming the file where RegionFolder would skip it: a tool given files by name
    (infer.py caption --regions) reports them, whatever they are (a FIFO included)."""
    return region_arrays(_load_npz(Path(path), REGION_KEYS + ("cls_prob", "tags")), path)


def region_arrays(arrays: dict, where: str | Path) -> dict:
    """The arrays of one region file as RegionFolder's examples hold them (features, boxes,
    conf, cls_prob if stored, as float32, and tags; rows by conf, highest first), checked as
    the RegionFolder docstring lists; a ValueError naming `where` otherwise. shared.convert
    checks what it writes here, so that it never writes a file the reader would refuse."""
    missing = [k for k in REGION_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"{where}: no {missing[0]!r} in the file")
    features = _numbers(arrays, "features", where, ("N", "F"))  # (N, F)
    N = len(features)
    if N == 0 or features.shape[1] == 0:
        raise ValueError(f"{where}: no regions (features of shape {features.shape})")
    boxes = _numbers(arrays, "boxes", where, (N, 4))  # (N, 4)
    conf = _numbers(arrays, "conf", where, (N,))  # (N,)
    if boxes.min() < -BOX_SLACK or boxes.max() > 1 + BOX_SLACK:
        raise ValueError(f"{where}: boxes must be fractions of the image side in [0, 1] "
                         f"(x1/W, y1/H, x2/W, y2/H), found values in "
                         f"[{boxes.min():g}, {boxes.max():g}]")
    if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
        raise ValueError(f"{where}: a box has x2 < x1 or y2 < y1; boxes are (x1, y1, x2, y2)")
    order = np.argsort(-conf, kind="stable")  # (N,) by conf, highest first
    out = {"features": features[order], "boxes": boxes.clip(0, 1)[order],
           "conf": conf[order], "tags": _tags(arrays, where)}
    if "cls_prob" in arrays:
        cls_prob = _numbers(arrays, "cls_prob", where, (N, "C"))  # (N, C)
        if cls_prob.shape[1] == 0 or (cls_prob < 0).any():
            raise ValueError(f"{where}: cls_prob must be (N, C >= 1) probabilities >= 0")
        out["cls_prob"] = cls_prob[order]
    return out


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz that has them, read now, never unpickled. Anything else is
    a ValueError naming the file: a path that is no regular file (open_regular: a FIFO would
    block), a file that is no zip archive (numpy would take it for a pickle and suggest
    loading it unsafely), a .npy (one array), and whatever stops numpy on a damaged archive,
    which raises many kinds from inside numpy and zipfile (EOFError, BadZipFile, zlib.error,
    NotImplementedError, ...)."""
    try:  # ours: np.load(path) leaves its own open on a bad zip; a FIFO must not block
        f = open_regular(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot be opened ({e.strerror or e})") from None
    with f:
        head = f.read(6)
        if head.startswith(b"\x93NUMPY"):
            raise ValueError(f"{path}: one array (.npy), not an .npz of named arrays")
        if not head.startswith(b"PK"):
            raise ValueError(f"{path}: not an .npz (a zip archive): "
                             f"{'empty' if not head else f'starts with {head!r}'}")
        f.seek(0)
        what = "the archive"
        try:
            with np.load(f, allow_pickle=False) as npz:
                arrays = {}
                for key in (k for k in keys if k in npz.files):
                    what = f"array {key!r}"  # object arrays (pickles), damaged members
                    arrays[key] = npz[key]
        except Exception as e:  # see the docstring: any decoder error means "cannot be read"
            raise ValueError(f"{path}: {what} cannot be read ({type(e).__name__}: {e})"
                             ) from None
    return arrays


def _numbers(arrays: dict, key: str, path: Path, shape: tuple) -> np.ndarray:
    """arrays[key] as finite float32 of `shape`, whose entries are sizes or names that allow
    any size, e.g. (N, "F"); a ValueError naming the file and the key otherwise."""
    a = arrays[key]
    if a.dtype.kind not in "iuf":  # not bool, complex, strings or objects
        raise ValueError(f"{path}: {key!r} must hold numbers, not {a.dtype}")
    if a.ndim != len(shape) or any(isinstance(s, int) and s != m for s, m in zip(shape, a.shape)):
        expected = "(" + ", ".join(map(str, shape)) + (",)" if len(shape) == 1 else ")")
        raise ValueError(f"{path}: {key!r} must be of shape {expected}, got {a.shape}")
    with np.errstate(over="ignore"):  # float64 past float32's range becomes inf here...
        a = a.astype(np.float32)
    if not np.isfinite(a).all():  # ... and is refused here, with NaN
        raise ValueError(f"{path}: {key!r} has NaN or infinite values")
    return a


def _tags(arrays: dict, path: Path) -> list[str]:
    """The object tags (Oscar) as a list of str; [] when not stored or empty."""
    tags = arrays.get("tags")
    if tags is None or tags.size == 0:  # np.array([]) is float64: no tags, whatever the dtype
        return []
    if tags.dtype.kind != "U" or tags.ndim != 1:
        raise ValueError(f"{path}: 'tags' must be a 1-D array of str, got {tags.dtype} of "
                         f"shape {tags.shape}")
    return [str(t) for t in tags]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolder:
    """A classification set laid out as root/<class name>/<image file>, the layout of
    torchvision's ImageFolder and of ImageNet's validation folders: classes are the sorted
    subfolder names, read as text with "_" for a space ("red_circle" -> "red circle"). Images
    are read as everywhere else here (load_image); one that cannot be decoded, or a name that
    is no regular file (a FIFO, which would block the read), is an OSError naming it when
    item(i) reads it. The folder does not skip it itself: an evaluation that does (infer.py
    zeroshot and probe) changes its denominator, and says how many it left out."""

    def __init__(self, root: str | Path, image_size: int):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no image folder {root}")
        folders = sorted(d for d in root.iterdir() if d.is_dir())
        if not folders:
            raise ValueError(f"{root}: no class subfolder (root/<class name>/<image>)")
        self.root, self.image_size = root, image_size
        self.classes = [d.name.replace("_", " ") for d in folders]
        self.items = [(f, label) for label, d in enumerate(folders) for f in sorted(d.iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES]
        empty = [d.name for label, d in enumerate(folders)
                 if not any(lab == label for _, lab in self.items)]
        if empty:
            raise ValueError(f"{root}: class folder {empty[0]!r} holds no image "
                             f"({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.items)

    def item(self, i: int) -> tuple[np.ndarray, int]:
        """(uint8 (S, S, 3), class index); an OSError "cannot read PATH: reason" when the
        image cannot be read."""
        path, label = self.items[i]
        try:
            return load_image(path, self.image_size), label
        except ValueError as e:  # load_image's OSError names the file already
            raise OSError(f"cannot read {path}: {e}") from None


def open_corpus(spec: str, inputs: str, image_size: int, task: str = "pretrain"):
    """train.py's --data: 'regions:ANNOTATION_JSON[,REGION_DIR]' for a model whose INPUTS are
    "regions" ('vqa:QUESTIONS,ANNOTATIONS[,REGION_DIR]' for its --task vqa: shared.vqa), else
    'coco:ANNOTATION_JSON[,IMAGE_DIR]', 'jsonl:FILE' or 'karpathy:SPLIT_JSON[,IMAGE_ROOT]'
    (CaptionFolder.from_spec). Raises ValueError (or OSError) naming what is wrong."""
    kind, _, rest = spec.partition(":")
    if kind == "vqa":  # VQA v2 questions, annotations and region files
        from shared.vqa import VQAFolder  # shared.vqa builds on this file
        if inputs != "regions" or task != "vqa":
            raise ValueError("VQA data trains --task vqa of a region model (uniter, oscar)")
        corpus = VQAFolder.from_spec(spec)
        corpus.notes.append(f"{corpus.n_questions} questions; {len(corpus.missing)} questions "
                            f"dropped: their image has no region file")
        return corpus
    if inputs != "regions":
        return CaptionFolder.from_spec(spec, image_size)
    if kind != "regions" or not rest:
        raise ValueError(f"this model reads region features: give "
                         f"regions:ANNOTATION_JSON[,REGION_DIR], not {spec!r}")
    annotation, _, region_dir = rest.partition(",")
    return RegionFolder.coco(annotation, region_dir or None)


def training_corpus(spec: str, inputs: str, config, starts: bool, min_answer_count: int,
                    out: Path, log):
    """train.py's --data: (the corpus, the config with what the corpus decides). The corpus is
    open_corpus's; its counts and notes are logged, and what its workers cannot read is listed
    in <out>/unreadable.txt. A run that `starts` here (not a resumed one) takes the VQA head's
    classes from VQA data (shared.vqa.answer_classes). A ValueError or OSError names what is
    wrong."""
    corpus = open_corpus(spec, inputs, config.image_size, config.task)
    corpus.unreadable_log = Path(out) / "unreadable.txt"  # every worker appends what it skips
    log(f"--data {spec}: {len(corpus)} images; dropped {corpus.dropped_images} images (no caption "
        f"or no file) and {corpus.dropped_captions} empty captions")
    for line in corpus.notes:  # e.g. a Karpathy file's split counts
        log(line)
    if starts and spec.startswith("vqa:"):
        from shared.vqa import answer_classes  # shared.vqa builds on this file
        config = dataclasses.replace(config, answers=answer_classes(corpus, min_answer_count, log))
    if isinstance(corpus, RegionFolder) and corpus.most_regions() > config.n_regions:
        log(f"the region files hold up to {corpus.most_regions()} regions (first "
            f"{min(500, len(corpus))} files); the model keeps n_regions = {config.n_regions}: "
            f"raise --n_regions to use them all")
    return corpus, config


def corpus_counts(corpus, unreadable_log: Path) -> dict:
    """What final.json records of a training corpus: its images, what was dropped reading its
    index, the files its workers could not read (unreadable_log), its notes."""
    return dict(images=len(corpus), dropped_images=corpus.dropped_images,
                dropped_captions=corpus.dropped_captions,
                unreadable_files=unreadable_files(unreadable_log), corpus_notes=corpus.notes)


def kept_statistics(config, init_config: dict | None, corpus, log):
    """The config of a region model with standardise_features, with the (mean, std) (F,) its
    run standardises region features with (shared.data.standardisation), kept in it and so in
    its checkpoints: those of --init's config where it kept some (fine-tuning goes on with the
    numbers its encoder learned with), else those of the region folder `corpus`, whose
    near-constant dimensions are logged (their std is floored: floored_std). On the world
    (corpus None) the config keeps none: the world's config gives them."""
    kept = (init_config or {}).get("feature_mean", ())
    if kept:
        return dataclasses.replace(config, feature_mean=tuple(kept),
                                   feature_std=tuple(init_config["feature_std"]))
    if corpus is None:
        return config
    mean, std = corpus.feature_statistics()  # (F,) each, of its first images
    if len(mean) != config.feature_dim:
        raise ValueError(f"the region files have {len(mean)}-d features but feature_dim is "
                         f"{config.feature_dim} (--feature_dim)")
    floored, floor = corpus.near_constant
    log(f"feature standardisation: {floored} of {len(std)} dimensions near-constant (std < "
        f"{floor:.3g}) on the first {min(500, len(corpus))} images; their std is floored at "
        f"{floor:.3g}")
    return dataclasses.replace(config, feature_mean=tuple(mean.tolist()),
                               feature_std=tuple(std.tolist()))
