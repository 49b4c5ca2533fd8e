"""Region features for Oscar and UNITER from images, with no detector framework: a ResNet-50's
last grid, RoIAligned (shared/roi.py) in boxes from annotations, a grid, or your own detector.

    python extract.py regions IMAGE_DIR OUT_DIR --backbone_weights resnet50.pth
    python extract.py regions captions_train2017.json regions/ --image_dir train2017 \\
        --boxes instances:instances_train2017.json --backbone_weights resnet50.pth
    python extract.py regions images/ regions/ --boxes json:detections.json --virtex best.pt

writes OUT_DIR/<image file stem>.npz, the layout `train.py --data regions:` and `vqa:` read
(shared.folders.RegionFolder):

    features  float16 (N, C)  each box RoIAligned 7 x 7 on the backbone's last grid (aligned,
                              adaptive sampling) and averaged: C = 2048 for ResNet-50
    boxes     float32 (N, 4)  x1/W, y1/H, x2/W, y2/H of the original image
    conf      float32 (N,)    see --boxes
    cls_prob  float32 (N, K+1) (instances only) one-hot over [background] + the categories
    tags      str (T,)        (instances: category names; json: the labels given)
    image_hw  int32 (2,)      the original height and width

--boxes says where the boxes come from and what `conf` means:
    grid:S           (default grid:3) the whole image, then an S x S grid of cells, row by row;
                     conf = 1 for every box (no detector: every box is kept by UNITER's conf
                     threshold and, in this order, by Oscar's first-n rule); no tags, no cls_prob.
                     Grid features from an ImageNet ResNet are a strong substitute for detector
                     features [Jiang et al. 2020, "In Defense of Grid Features for VQA"].
    instances:FILE   a COCO instances file (bbox = x, y, w, h in pixels): every annotated box of
                     the image with conf = 1 (ground truth is certain), its category name as tag
                     and a one-hot cls_prob (UNITER's MRC targets; column 0 is background, as a
                     detector's softmax), then the whole image with conf = 0 and a background
                     cls_prob, so an image with no annotation, or absent from the file, still
                     has a region
    json:FILE        your detector's boxes: {"<image file, as in SOURCE>": [{"box": [x1, y1, x2,
                     y2] in pixels, "score": s (default 1), "label": "dog" (optional)}, ...]};
                     conf = score, tags = the labels in conf order; an image absent from the file
                     (or with no usable box) is skipped and counted (no_boxes)

Both files are checked when they are read, before anything is written: a bbox or box that is
not a list of exactly 4 JSON numbers (strings of digits and true / false are no numbers), a
score that is no number, a label that is neither a string nor an integer, an annotation of an
image or a category the file does not list, or a repeated image or category id is a one-line
error naming the file and the entry. A box whose numbers are not finite (NaN, Infinity, an
integer beyond a float), whose score is not finite as float32, or that has no area once clipped
to the image (x2 <= x1 or y2 <= y1, or wholly outside; a COCO bbox with w <= 0 or h <= 0) is
dropped when its image is extracted and counted (bad_boxes). Images are matched by file name,
as SOURCE gives it: a file with an entry for none of SOURCE's images (after --n) is an error at
the start (a file of another split, or of other names), and one that misses some of them says
how many in a warning at the start (not_in_boxes_file).

SOURCE is a folder (every jpg, jpeg, png, bmp, webp under it, in natural order: img2 before
img10, so --n N takes the first N as one counts them) or a COCO JSON (`images[*].file_name`,
relative to --image_dir, default images/ beside the JSON; in the file's order; a file_name
that is not a string, is empty, holds a NUL or leads outside --image_dir is an error naming
its index). Each image is read as RGB and resized to --image_size x --image_size without a crop
(the aspect ratio is not kept; boxes are fractions of the image, so they are unaffected) and
normalised with the ImageNet mean/std. --image_size is 0 (224, or the VirTex checkpoint's) or
at least 32 (the ResNet's stride: a smaller image still makes a grid of one cell);
--batch_size is at least 1, --n at least 0 (0 = all); --device is auto, cpu, cuda, cuda:K or
mps, one this machine has.

Tags without annotations: --tag_model CKPT --tag_vocab FILE (a CoCa checkpoint and one tag per
line) classifies every box zero-shot, as CoCa's zero-shot classification does a whole image
[CoCa §4.2.2]: the box, widened by --tag_context of its width and height on each side (default
0.5; clipped to the image), is cropped from the original image and resized to the checkpoint's
image size, its image embedding is compared with each tag's text embedding (the normalised mean over
the prompt templates of shared.evaluate), and the softmax of the scaled cosines over the tags is
its class distribution. They replace the box source's tags and cls_prob:
    cls_prob  float32 (N, V+1) column 0 (background) is 0: a zero-shot classifier has no
                              background class; columns 1..V follow the vocabulary file
    tags      str (T,)        each box's most probable tag where its probability is at least
                              --tag_threshold (default 0.5), in box order, repeats kept (as a
                              detector's labels)
conf stays the box source's. --tag_threshold is a probability in [0, 1] and --tag_context a
finite number >= 0 (NaN is neither); the vocabulary file is UTF-8 text.

The backbone is the ResNet of virtex.py (torchvision's parameter names), from one of:
    --backbone_weights FILE   a torchvision resnet50 state dict you have (resnet50-*.pth; `fc.*`
                              is dropped, a DataParallel `module.` prefix stripped)
    --virtex CKPT             the visual backbone of one of our VirTex checkpoints
    --random_weights [SEED]   a randomly initialised ResNet-50 (a baseline, or a smoke test),
                              drawn with SEED (default 0): two runs with one seed (the train
                              and the test split) extract with one network
Nothing is downloaded: with none of them the command stops and says so.

OUT_DIR/extract.json records the settings when the run starts and adds the counts at its end:
the weights' identity (weights_sha256: sha256 over the state dict's names and bytes, 16 hex
digits; random_weights: the seed), the box source (boxes: grid:S, or instances: / json: and the
file's absolute path), image_size, and with zero-shot tags the CoCa weights' and the
vocabulary's sha256, tag_threshold and tag_context. The counts: images, written,
already_written, unreadable, no_boxes, bad_boxes and not_in_boxes_file (see above); the last
line the command prints gives them too. Files are written atomically (a temporary file, then a
rename) and a file already in OUT_DIR is skipped, so an interrupted run picks up where it
stopped. A run whose settings differ from extract.json's on any of those (the contents of a
file depend on them) stops before writing anything, naming them, as does a run into a folder
with .npz files and no extract.json (an older or a foreign folder): one folder never mixes two
extractions. An image that cannot be decoded is skipped, counted, and listed in
OUT_DIR/unreadable.txt (its path, a tab, the reason), one line per file: a resumed run tries it
again, does not list it twice, and drops its line once it is written.

Every error is one line beginning with "error:" that names the flag or the file, given before
anything is written where it can be known then: a bad option, a --boxes file of the wrong form,
an OUT_DIR that is a file or cannot be written (tried at the start with a temporary file). A
write that fails later (a full disk) stops the run naming the file; no temporary file is left
and the files written before it are complete, so a rerun resumes after them.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import virtex
from shared.checkpoint import writable_folder, write_json_atomic
from shared.data import image_to_tensor
from shared.folders import IMAGE_SUFFIXES, inside, open_rgb
from shared.roi import box_features


def one_line(e: BaseException) -> str:
    """An exception's message as one line: its first line, or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shown(value, limit: int = 60) -> str:
    """A JSON value as it would be written, on one line and cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- 1. Backbone: torchvision weights, a VirTex checkpoint, or random --------------------------

def resnet_from_torchvision(state: dict) -> virtex.ResNet:
    """A ResNet-50 holding a torchvision `resnet50().state_dict()`. The name map: the names are
    torchvision's already (virtex.Bottleneck), `fc.weight` / `fc.bias` are dropped (no classifier
    here) and a `module.` prefix (nn.DataParallel) is stripped. Anything else that does not fit
    is a ValueError naming the first missing or unexpected key."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors (torchvision's resnet50 weights file is "
                         "one: torch.save(resnet50().state_dict(), FILE))")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    resnet = virtex.ResNet(virtex.Config.paper())
    ours = resnet.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    if missing or unexpected:
        raise ValueError(f"not a torchvision ResNet-50: {len(missing)} keys missing (e.g. "
                         f"{missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    wrong = [k for k in ours if ours[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"not a ResNet-50: {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                         f"expected {tuple(ours[wrong[0]].shape)}")
    resnet.load_state_dict(state)
    return resnet


def random_seed(random_weights: int | bool | None) -> int | None:
    """--random_weights [SEED] -> the seed of the random ResNet, or None for none: None and
    False are none, True is seed 0, an int is its own seed."""
    if random_weights is None or random_weights is False:
        return None
    return 0 if random_weights is True else int(random_weights)


def load_backbone(backbone_weights: str, virtex_checkpoint: str,
                  random_weights: int | bool | None) -> tuple[virtex.ResNet, int, str]:
    """(ResNet in eval mode, its training image size, a description) from exactly one source.
    A random ResNet is drawn under its seed in a forked generator (the caller's stream goes on
    untouched), so two runs with one seed, e.g. the train and the test split, share one network."""
    seed = random_seed(random_weights)
    given = [bool(backbone_weights), bool(virtex_checkpoint), seed is not None]
    if sum(given) != 1:
        raise SystemExit("error: give the backbone's weights, one of --backbone_weights FILE (a "
                         "torchvision resnet50 state dict), --virtex CKPT (our VirTex "
                         "checkpoint) or --random_weights; nothing is downloaded"
                         if not any(given) else
                         "error: give only one of --backbone_weights, --virtex, --random_weights")
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resnet = virtex.ResNet(virtex.Config.paper())
        return resnet.eval(), 224, f"random ResNet-50 (seed {seed})"
    if backbone_weights:
        path = Path(backbone_weights)
        if not path.is_file():
            raise SystemExit(f"error: --backbone_weights {path}: no such file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            return resnet_from_torchvision(state).eval(), 224, f"torchvision ResNet-50 {path}"
        except Exception as e:  # unreadable file, or not ResNet-50 weights: one line
            raise SystemExit(f"error: --backbone_weights {path}: {one_line(e)}") from None
    import infer  # a checkpoint of train.py: its model, config and run options

    try:
        paper, model, _, config, run = infer.load(Path(virtex_checkpoint))
    except Exception as e:
        raise SystemExit(f"error: --virtex {virtex_checkpoint}: {one_line(e)}") from None
    if not isinstance(getattr(model, "visual", None), virtex.ResNet):  # its backbone
        raise SystemExit(f"error: --virtex {virtex_checkpoint} is a {run['model']} checkpoint, "
                         f"not one with a ResNet backbone (VirTex's)")
    return model.visual.eval(), config.image_size, f"VirTex {virtex_checkpoint}"


def weights_sha256(module: torch.nn.Module) -> str:
    """The weights' identity: sha256 over each state-dict entry's name and bytes, in key order;
    its first 16 hex digits. Equal weights give one hash whatever file they came from."""
    h = hashlib.sha256()
    for name, value in module.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class ZeroShotTagger:
    """Tags and a class distribution for each box from a CoCa checkpoint (module docstring)."""

    def __init__(self, checkpoint: str, vocab_file: str, threshold: float, device,
                 context: float = 0.5):
        import infer
        from shared.evaluate import PROMPT_TEMPLATES, class_embeddings

        path = Path(vocab_file)
        if not path.is_file():
            raise SystemExit(f"error: --tag_vocab {path}: no such file")
        try:
            tags = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
        except (OSError, ValueError) as e:  # UnicodeDecodeError: not UTF-8 text
            raise SystemExit(f"error: --tag_vocab {path}: cannot be read as UTF-8 text "
                             f"({one_line(e)})") from None
        self.tags = [t for t in tags if t]
        if not self.tags:
            raise SystemExit(f"error: --tag_vocab {path}: no tag (one a line)")
        repeated = sorted({t for t in self.tags if self.tags.count(t) > 1})
        if repeated:
            raise SystemExit(f"error: --tag_vocab {path}: {repeated[0]!r} is there twice")
        if not 0.0 <= threshold <= 1.0:
            raise SystemExit(f"error: --tag_threshold is a probability, not {threshold}")
        if not (math.isfinite(context) and context >= 0):  # `context < 0` is False for NaN
            raise SystemExit(f"error: --tag_context must be >= 0 and finite, not {context}")
        try:
            paper, model, tokenizer, config, run = infer.load(Path(checkpoint))
        except SystemExit:
            raise
        except Exception as e:
            raise SystemExit(f"error: --tag_model {checkpoint}: {one_line(e)}") from None
        if "zeroshot" not in paper.PROTOCOLS.get(config.task, ()):
            raise SystemExit(f"error: --tag_model {checkpoint} is a {run['model']} checkpoint "
                             f"without image and text embeddings (zero-shot tags need them, as "
                             f"CoCa's)")
        self.paper, self.model = paper, model.to(device)
        self.size, self.threshold, self.context = config.image_size, threshold, context
        self.scale = float(model.logit_scale.exp())  # the learned temperature of its logits
        self.class_emb = class_embeddings(  # (V, E)
            lambda texts: paper.embed_text_strings(model, tokenizer, config, texts),
            self.tags, PROMPT_TEMPLATES)

    def crops(self, image: Image.Image, boxes: np.ndarray) -> list[np.ndarray]:
        """uint8 (S, S, 3) crops of an RGB image in boxes (N, 4) given as fractions, each box
        widened by `context` of its size on every side: an object cropped tight and enlarged to
        the model's input size looks like no image it was trained on."""
        W, H = image.size
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]  # (N,) each
        c = self.context
        wide = np.stack([boxes[:, 0] - c * w, boxes[:, 1] - c * h, boxes[:, 2] + c * w,
                         boxes[:, 3] + c * h], 1).clip(0, 1)  # (N, 4)
        out = []
        for x1, y1, x2, y2 in (wide * np.array([W, H, W, H])).tolist():
            x1, y1 = min(int(x1), W - 1), min(int(y1), H - 1)
            x2, y2 = max(int(np.ceil(x2)), x1 + 1), max(int(np.ceil(y2)), y1 + 1)  # >= 1 px
            crop = image.crop((x1, y1, x2, y2)).resize((self.size, self.size), Image.BICUBIC)
            out.append(np.asarray(crop))
        return out

    def __call__(self, images: list[Image.Image], boxes: list[np.ndarray]) -> list[dict]:
        """For each image, {"cls_prob" (N_b, V+1), "tags" (T_b,)} of its boxes (N_b, 4)."""
        crops = [c for image, b in zip(images, boxes) for c in self.crops(image, b)]
        emb = self.paper.embed_image_arrays(self.model, crops)  # (Σ N_b, E), unit length
        probs = (self.scale * emb @ self.class_emb.T).softmax(-1).cpu().numpy()  # (Σ N_b, V)
        out, at = [], 0
        for b in boxes:
            p = probs[at:at + len(b)]  # (N_b, V)
            at += len(b)
            best = p.argmax(1)  # (N_b,)
            out.append({"cls_prob": np.concatenate([np.zeros((len(b), 1), np.float32), p], 1),
                        "tags": np.array([self.tags[k] for k, q in zip(best, p.max(1))
                                          if q >= self.threshold], dtype=np.str_)})
        return out


# --- 2. Images and boxes -----------------------------------------------------------------------

def natural_key(name: str) -> tuple[list, str]:
    """'img10.jpg' -> (['img', 10, '.jpg'], name): runs of digits compare as numbers, so img2
    comes before img10 (and img02, img2 keep one order by the name itself)."""
    parts = re.split(r"([0-9]+)", name)  # text, digits, text, ...: the digits at odd places
    return [int(p) if i % 2 else p for i, p in enumerate(parts)], name


def list_images(source: Path, image_dir: str) -> tuple[Path, list[str]]:
    """(image folder, image names relative to it) of a folder, in natural order (natural_key),
    or of a COCO JSON's images, in the file's order. A COCO file_name that is not a usable name
    of a file under the image folder (not a string, empty, a NUL in it, a `..` or an absolute
    path that leaves the folder) is a one-line SystemExit naming its index."""
    if source.is_dir():
        names = sorted((str(p.relative_to(source)) for p in source.rglob("*")
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=natural_key)
        root = source
    elif source.is_file():
        try:
            data = json.loads(source.read_text(encoding="utf-8-sig"))
            if not isinstance(data["images"], list):
                raise TypeError(f"images is {type(data['images']).__name__}, not a list")
            names = [image["file_name"] for image in data["images"]]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            raise SystemExit(f"error: {source}: not a COCO file with images[*].file_name "
                             f"({type(e).__name__}: {one_line(e)})") from None
        root = Path(image_dir) if image_dir else source.parent / "images"
        for k, name in enumerate(names):
            where = f"{source}, images[{k}].file_name"
            if not isinstance(name, str) or Path(name).stem in ("", ".."):
                raise SystemExit(f"error: {where} is {shown(name)}, not the name of an image file")
            try:  # a NUL, or a lone surrogate the file system cannot encode, names no file
                os.fsencode(name)
                if "\0" in name:
                    raise ValueError("a NUL character")
            except ValueError as e:
                raise SystemExit(f"error: {where} is {shown(name)}, not a file name here "
                                 f"({one_line(e)})") from None
            try:
                inside(root, name, where)
            except ValueError as e:
                raise SystemExit(f"error: {one_line(e)}") from None
    else:
        raise SystemExit(f"error: {source}: no such folder or file")
    if not names:
        raise SystemExit(f"error: {source}: no image ({', '.join(IMAGE_SUFFIXES)})")
    stems = {}
    for name in names:  # one .npz per image stem: two images may not share one
        stem = Path(name).stem
        if stem in stems:
            raise SystemExit(f"error: {stems[stem]} and {name} would both write {stem}.npz")
        stems[stem] = name
    return root, names


def grid_boxes(S: int) -> np.ndarray:
    """The whole image, then S x S cells row by row: (1 + S², 4) fractions."""
    edges = np.linspace(0, 1, S + 1)
    cells = [(edges[c], edges[r], edges[c + 1], edges[r + 1]) for r in range(S) for c in range(S)]
    return np.array([(0.0, 0.0, 1.0, 1.0)] + cells, np.float32)


class BadEntry(ValueError):
    """An entry of a --boxes file that cannot be used; the message says which and why."""


def is_number(value) -> bool:
    """A JSON number: an int or a float, not a bool (which Python counts as an int), not a
    string of digits."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_float(value: int | float) -> float:
    """A JSON number as a float; an integer too large for one is an infinity of its sign (a
    non-finite coordinate, dropped and counted like NaN)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def four_numbers(value, what: str) -> tuple[float, ...]:
    """A JSON list of exactly 4 numbers as floats; else a BadEntry saying what it is."""
    if not (isinstance(value, list) and len(value) == 4 and all(map(is_number, value))):
        raise BadEntry(f"{what} is {shown(value)}, not 4 numbers")
    return tuple(map(as_float, value))


def read_instances(file: Path) -> tuple[dict, list[str]]:
    """A COCO instances file -> ({file_name: [(box in pixels x1 y1 x2 y2, category index)]},
    category names); category index 1.. follows the file's category order (0 = background).
    What cannot be read as such (a bbox of other than 4 numbers, an annotation of an unknown
    image or category, a repeated id) is a one-line SystemExit naming the file and the entry;
    a bbox of 4 numbers that is empty or not finite is kept here and dropped at extraction."""
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
        categories, names = {}, []
        for k, c in enumerate(data["categories"]):
            if c["id"] in categories:
                raise BadEntry(f"categories[{k}]: id {shown(c['id'])} is there twice")
            if not isinstance(c["name"], str):
                raise BadEntry(f"categories[{k}]: name {shown(c['name'])} is not a string")
            categories[c["id"]] = k + 1
            names.append(c["name"])
        files = {}
        for k, image in enumerate(data["images"]):
            if image["id"] in files:
                raise BadEntry(f"images[{k}]: id {shown(image['id'])} is there twice")
            if not isinstance(image["file_name"], str):
                raise BadEntry(f"images[{k}]: file_name {shown(image['file_name'])} is not a "
                               f"string")
            files[image["id"]] = image["file_name"]
        boxes = {name: [] for name in files.values()}
        for k, a in enumerate(data["annotations"]):
            if a["image_id"] not in files:
                raise BadEntry(f"annotations[{k}]: image_id {shown(a['image_id'])} is none of "
                               f"the file's images")
            name = files[a["image_id"]]
            if a["category_id"] not in categories:
                raise BadEntry(f"annotations[{k}] (image {name!r}): category_id "
                               f"{shown(a['category_id'])} is none of the file's categories")
            x, y, w, h = four_numbers(a["bbox"], f"annotations[{k}] (image {name!r}): bbox "
                                                 f"[x, y, w, h]")
            boxes[name].append(((x, y, x + w, y + h), categories[a["category_id"]]))
    except BadEntry as e:
        raise SystemExit(f"error: --boxes instances:{file}: {e}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise SystemExit(f"error: --boxes instances:{file}: not a COCO instances file "
                         f"({type(e).__name__}: {one_line(e)})") from None
    return boxes, names


def read_detections(file: Path) -> dict:
    """--boxes json:FILE -> {image name: [(box in pixels, score, label or None)]}. An entry of
    the wrong form (a box of other than 4 numbers, numbers given as strings, a score that is no
    number, a label that is neither a string nor an integer) is a one-line SystemExit naming
    the file and the image; a box or score that is not finite, or a box with no area, is kept
    here and dropped at extraction (image_regions), where the image's size is known."""
    layout = '{image: [{"box": [x1, y1, x2, y2], "score": s, "label": "..."}, ...]}'
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError, RecursionError) as e:
        raise SystemExit(f"error: --boxes json:{file}: expected {layout} ({type(e).__name__}: "
                         f"{one_line(e)})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: --boxes json:{file}: expected {layout}, not a JSON "
                         f"{type(data).__name__}")
    detections = {}
    for name, found in data.items():
        try:
            if not isinstance(found, list):
                raise BadEntry(f"{shown(found)} is not a list of detections")
            rows = []
            for k, d in enumerate(found):
                if not isinstance(d, dict) or "box" not in d:
                    raise BadEntry(f"detection {k} is {shown(d)}, not {{\"box\": [x1, y1, x2, "
                                   f"y2], ...}}")
                box = four_numbers(d["box"], f"detection {k}: box [x1, y1, x2, y2]")
                score, label = d.get("score", 1.0), d.get("label")
                if not is_number(score):
                    raise BadEntry(f"detection {k}: score {shown(score)} is not a number")
                if label is not None and (isinstance(label, bool)
                                          or not isinstance(label, (str, int))):
                    raise BadEntry(f"detection {k}: label {shown(label)} is neither a string "
                                   f"nor an integer")
                rows.append((box, as_float(score), None if label is None else str(label)))
        except BadEntry as e:
            raise SystemExit(f"error: --boxes json:{file}: image {name!r}: {e}") from None
        detections[name] = rows
    return detections


# float32's largest value: a score beyond it would be stored as an infinite conf
FLOAT32_MAX = float(np.finfo(np.float32).max)


def usable_boxes(pixels: list, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x1, y1, x2, y2) in pixels of an H x W image -> (float32 (N, 4) fractions of the
    image clipped to [0, 1], bool (N,) which of them to keep: finite corners, and a positive
    width and height once clipped and rounded to float32 as stored, so that an inverted box,
    an empty one or one wholly outside the image is no region)."""
    corners = np.array(pixels, np.float64).reshape(-1, 4)  # (N, 4)
    with np.errstate(invalid="ignore"):  # NaN and inf rows are dropped below
        boxes = (corners / np.array([W, H, W, H])).clip(0, 1).astype(np.float32)
    keep = (np.isfinite(corners).all(1) & (boxes[:, 2] > boxes[:, 0])
            & (boxes[:, 3] > boxes[:, 1]))
    return boxes, keep


def image_regions(boxes_spec: tuple[str, object], name: str, H: int,
                  W: int) -> tuple[dict | None, int]:
    """The boxes (fractions), conf and, where known, cls_prob and tags of one image (the module
    docstring), rows by conf, highest first, or None when the source has no usable box for it;
    and how many of the source's boxes were dropped (usable_boxes; for json: also a score that
    is not finite as float32)."""
    kind, source = boxes_spec
    if kind == "grid":
        boxes = grid_boxes(source)
        return {"boxes": boxes, "conf": np.ones(len(boxes), np.float32)}, 0
    if kind == "instances":
        found, categories = source[0].get(name, []), source[1]
        boxes, keep = usable_boxes([b for b, _ in found] + [(0, 0, W, H)], H, W)
        labels = [c for (_, c), k in zip(found, keep) if k]
        boxes = boxes[keep]  # the whole image, last, always kept
        cls_prob = np.zeros((len(boxes), len(categories) + 1), np.float32)  # (N, K+1)
        cls_prob[np.arange(len(labels)), labels] = 1.0
        cls_prob[-1, 0] = 1.0  # the whole image: background, not an object
        conf = np.array([1.0] * len(labels) + [0.0], np.float32)
        return ({"boxes": boxes, "conf": conf, "cls_prob": cls_prob,
                 "tags": np.array([categories[c - 1] for c in labels], dtype=np.str_)},
                len(found) - len(labels))
    found = source.get(name, [])  # json
    boxes, keep = usable_boxes([b for b, _, _ in found], H, W)
    kept = [(box, score, label) for box, k, (_, score, label) in zip(boxes, keep, found)
            if k and math.isfinite(score) and abs(score) <= FLOAT32_MAX]
    if not kept:
        return None, len(found)
    kept.sort(key=lambda row: -row[1])  # by score, highest first (stable: ties keep file order)
    out = {"boxes": np.stack([box for box, _, _ in kept]),
           "conf": np.array([score for _, score, _ in kept], np.float32)}
    tags = [label for _, _, label in kept if label is not None]
    if tags:
        out["tags"] = np.array(tags, dtype=np.str_)
    return out, len(found) - len(kept)


def read_image(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int], Image.Image]:
    """An image file -> (normalised float (3, size, size), original (H, W), the RGB image);
    an OSError naming the file when it cannot be decoded or is too large (open_rgb)."""
    image = open_rgb(path)
    W, H = image.size
    return image_to_tensor(np.asarray(image.resize((size, size), Image.BICUBIC))), (H, W), image


def write_npz_atomic(path: Path, arrays: dict) -> None:
    """np.savez to a temporary file beside `path`, then a rename: a file in OUT_DIR is complete.
    A failed write (a full disk, a folder made read-only) leaves no temporary file and raises
    its OSError."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the error that stopped the write is the one to report
            pass


def write_record(path: Path, record: dict) -> None:
    """extract.json written atomically; a failure is a one-line SystemExit naming the file."""
    try:
        write_json_atomic(path, record)
    except (OSError, ValueError) as e:  # shared.checkpoint's one-line error names the file
        message = one_line(e)
        raise SystemExit(f"error: {message}" if str(path) in message else
                         f"error: could not write {path}: {message}") from None


class UnreadableList:
    """OUT_DIR/unreadable.txt: one line per image that could not be decoded, its path, a tab and
    the reason. A resumed run tries such an image again: it is not listed twice, and once it is
    written its line is dropped (at the end of the run)."""

    def __init__(self, path: Path):
        self.path, self.lines, self.recovered = path, {}, False
        try:
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                self.lines.setdefault(line.split("\t")[0], line)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SystemExit(f"error: {path} cannot be read ({one_line(e)})") from None

    @staticmethod
    def key(file: Path) -> str:
        """The path as the list holds it: UTF-8 text, a byte that is no UTF-8 escaped."""
        return str(file).encode("utf-8", "backslashreplace").decode("utf-8")

    def add(self, file: Path, reason: str) -> None:
        key = self.key(file)
        if key in self.lines:
            return
        line = f"{key}\t{reason}".encode("utf-8", "backslashreplace").decode("utf-8")
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        except OSError as e:
            raise SystemExit(f"error: could not write {self.path}: {e.strerror or one_line(e)}"
                             ) from None
        self.lines[key] = line

    def written(self, file: Path) -> None:
        """`file` was read and written this time: no longer unreadable."""
        if self.lines.pop(self.key(file), None) is not None:
            self.recovered = True

    def close(self) -> None:
        if not self.recovered:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(line + "\n" for line in self.lines.values()),
                           encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise SystemExit(f"error: could not write {self.path}: {e.strerror or one_line(e)}"
                             ) from None


# --- 3. The command ----------------------------------------------------------------------------

@dataclasses.dataclass
class Counts:
    images: int = 0  # in SOURCE (or the first --n)
    written: int = 0
    already_written: int = 0  # found in OUT_DIR (an earlier run)
    unreadable: int = 0  # could not be decoded
    no_boxes: int = 0  # --boxes json: the file has no usable box for the image
    bad_boxes: int = 0  # boxes dropped: a corner or score not finite, or no area in the image
    not_in_boxes_file: int = 0  # instances: / json: images of SOURCE the file has no entry for


# The smallest --image_size: the ResNet's last grid has one cell per 32 pixels (its stride), so
# a smaller image still gives a grid of one cell, from fewer pixels than the cell spans.
MIN_IMAGE_SIZE = 32


def check_options(out_dir: Path, image_size: int, batch_size: int, n: int,
                  random_weights: int | bool | None, tag_threshold: float,
                  tag_context: float) -> None:
    """The numbers of the command line, checked before any file is read: a one-line SystemExit
    naming the flag."""
    if image_size != 0 and image_size < MIN_IMAGE_SIZE:
        raise SystemExit(f"error: --image_size is 0 (the backbone's own) or at least "
                         f"{MIN_IMAGE_SIZE} (the ResNet's stride), not {image_size}")
    if batch_size < 1:
        raise SystemExit(f"error: --batch_size must be >= 1, not {batch_size}")
    if n < 0:
        raise SystemExit(f"error: --n is a number of images (0 = all), not {n}")
    seed = random_seed(random_weights)
    if seed is not None and not 0 <= seed < 2**64:  # what torch.manual_seed takes
        raise SystemExit(f"error: --random_weights takes a seed in 0 .. 2**64 - 1, not {seed}")
    if not 0.0 <= tag_threshold <= 1.0:  # NaN fails both comparisons
        raise SystemExit(f"error: --tag_threshold is a probability, not {tag_threshold}")
    if not (math.isfinite(tag_context) and tag_context >= 0):
        raise SystemExit(f"error: --tag_context must be >= 0 and finite, not {tag_context}")
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: OUT_DIR {out_dir}: is a file, not a folder")


def pick_device(device: str) -> torch.device:
    """--device: auto (CUDA when there is one, else the CPU), cpu, cuda, cuda:K or mps; one that
    this machine does not have is a one-line SystemExit."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise SystemExit(f"error: --device is auto, cpu, cuda, cuda:K or mps, not {device!r}"
                         ) from None
    if chosen.type == "cpu":
        return chosen
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {device}: this machine has no CUDA device that "
                             f"torch can use (--device cpu runs on the CPU)")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {device}: there are "
                             f"{torch.cuda.device_count()} CUDA devices (0 .. "
                             f"{torch.cuda.device_count() - 1})")
        return chosen
    if chosen.type == "mps" and torch.backends.mps.is_available():
        return chosen
    raise SystemExit(f"error: --device {device}: not available here (auto, cpu, cuda, cuda:K "
                     f"or mps)")


def boxes_coverage(boxes: str, boxes_spec: tuple[str, object], source: Path,
                   names: list[str]) -> int:
    """How many of SOURCE's images (`names`) an instances: or json: file has no entry for, said
    at the start: a warning when some are missing (instances: they get the whole-image box
    alone; json: they are skipped), a one-line SystemExit when all are (a file of another
    split or of other file names: nothing could be extracted from it)."""
    kind, found = boxes_spec
    if kind == "grid":
        return 0
    listed = found[0] if kind == "instances" else found
    absent = [name for name in names if name not in listed]
    if not absent:
        return 0
    example = f"e.g. {absent[0]!r}"
    if len(absent) == len(names):
        theirs = f"its images are e.g. {next(iter(listed))!r}" if listed else "it lists no image"
        raise SystemExit(f"error: --boxes {boxes} has no entry for any of the {len(names)} "
                         f"images of {source} ({example}; {theirs}): image names must be "
                         f"file names as SOURCE gives them")
    fate = ("they get the whole-image box alone" if kind == "instances" else
            "they are skipped, counted as without boxes")
    print(f"warning: --boxes {boxes} has no entry for {len(absent)} of {len(names)} images of "
          f"{source} ({example}): {fate}", file=sys.stderr, flush=True)
    return len(absent)


def parse_boxes(spec: str) -> tuple[str, object]:
    kind, _, arg = spec.partition(":")
    if kind == "grid":
        if not arg.isdigit() or int(arg) < 1:
            raise SystemExit(f"error: --boxes grid:S takes a grid side S >= 1, got {spec!r}")
        return "grid", int(arg)
    if kind == "instances" and arg:
        return "instances", read_instances(Path(arg))
    if kind == "json" and arg:
        return "json", read_detections(Path(arg))
    raise SystemExit(f"error: --boxes is grid:S, instances:FILE or json:FILE, not {spec!r}")


def boxes_identity(spec: str) -> str:
    """A valid --boxes as extract.json records it: grid:S, or KIND:FILE with FILE absolute."""
    kind, _, arg = spec.partition(":")
    return f"grid:{int(arg)}" if kind == "grid" else f"{kind}:{Path(arg).resolve()}"


def tag_settings(tagger: ZeroShotTagger | None, tag_model: str, tag_vocab: str) -> dict:
    """The zero-shot tagger's part of extract.json ({} without one): its weights' and its
    vocabulary's identity, threshold and context."""
    if tagger is None:
        return {}
    vocab = hashlib.sha256("\n".join(tagger.tags).encode()).hexdigest()[:16]
    return {"tag_model": str(tag_model), "tag_weights_sha256": weights_sha256(tagger.model),
            "tag_vocab": str(tag_vocab), "tag_vocab_sha256": vocab, "tags": len(tagger.tags),
            "tag_threshold": tagger.threshold, "tag_context": tagger.context}


# What a region file's contents depend on: a run adding files to OUT_DIR must agree on each with
# the run that wrote the files there (its extract.json), or one folder would mix two extractions.
IDENTITY = ("weights_sha256", "boxes", "image_size", "tag_weights_sha256", "tag_vocab_sha256",
            "tag_threshold", "tag_context")


def check_out_dir(out_dir: Path, settings: dict) -> None:
    """A one-line SystemExit, before anything is written, when OUT_DIR holds region files of
    another extraction: its extract.json differs from `settings` on IDENTITY, or is missing (a
    folder of an older extract.py or of another tool: what its files hold is unknown). A folder
    without .npz files takes any run."""
    try:
        if not out_dir.is_dir() or not any(out_dir.glob("*.npz")):
            return
    except OSError as e:  # a folder that cannot be listed
        raise SystemExit(f"error: OUT_DIR {out_dir}: cannot be read ({one_line(e)})") from None
    record = out_dir / "extract.json"
    if not record.is_file():
        raise SystemExit(f"error: {out_dir} holds .npz files but no extract.json (an older or "
                         f"another tool's folder), so what they were extracted with is unknown: "
                         f"use another folder or delete it")
    try:
        earlier = json.loads(record.read_text())
        differ = [k for k in IDENTITY if earlier.get(k) != settings.get(k)]
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise SystemExit(f"error: {record} cannot be read ({type(e).__name__}: {one_line(e)}): "
                         f"use another folder or delete it") from None
    if differ:  # a key absent from one of them (no tagger, an older extract.py) is "none"
        then, now = (", ".join(f"{k} {values.get(k, 'none')}" for k in differ)
                     for values in (earlier, settings))
        raise SystemExit(f"error: {out_dir} was extracted with {then}; this run uses {now}: use "
                         f"another folder or delete it")


@torch.no_grad()
def extract_regions(source: Path, out_dir: Path, boxes: str = "grid:3", image_dir: str = "",
                    backbone_weights: str = "", virtex_checkpoint: str = "",
                    random_weights: int | bool | None = None, image_size: int = 0,
                    batch_size: int = 16,
                    n: int = 0, device: str = "auto", log_every_s: float = 5.0,
                    tag_model: str = "", tag_vocab: str = "", tag_threshold: float = 0.5,
                    tag_context: float = 0.5) -> dict:
    """The `regions` command (module docstring); returns extract.json's content."""
    out_dir = Path(out_dir)
    check_options(out_dir, image_size, batch_size, n, random_weights, tag_threshold, tag_context)
    device = pick_device(device)
    boxes_spec = parse_boxes(boxes)
    if bool(tag_model) != bool(tag_vocab):
        raise SystemExit("error: zero-shot tags need both --tag_model CKPT and --tag_vocab FILE")
    root, names = list_images(Path(source), image_dir)
    names = names[:n] if n > 0 else names
    not_in_boxes_file = boxes_coverage(boxes, boxes_spec, Path(source), names)
    resnet, trained_size, backbone = load_backbone(backbone_weights, virtex_checkpoint,
                                                   random_weights)
    size = image_size or trained_size
    tagger = (ZeroShotTagger(tag_model, tag_vocab, tag_threshold, device, tag_context)
              if tag_model else None)
    settings = {"source": str(source), "boxes": boxes_identity(boxes), "backbone": backbone,
                "random_weights": random_seed(random_weights),
                "weights_sha256": weights_sha256(resnet), "image_size": size,
                **tag_settings(tagger, tag_model, tag_vocab)}
    check_out_dir(out_dir, settings)  # refuses a folder of another extraction
    try:  # a file, a read-only folder, a full disk: said now, before any image is read
        writable_folder(out_dir, "OUT_DIR")
    except ValueError as e:  # its own message names OUT_DIR; a NUL in the path is os's
        message = one_line(e)
        raise SystemExit(f"error: {message}" if message.startswith("OUT_DIR") else
                         f"error: OUT_DIR {out_dir}: {message}") from None
    write_record(out_dir / "extract.json", settings)  # the counts follow at the end
    unreadable = UnreadableList(out_dir / "unreadable.txt")
    resnet = resnet.to(device)
    counts = Counts(images=len(names), not_in_boxes_file=not_in_boxes_file)
    todo = []
    for name in names:
        if (out_dir / (Path(name).stem + ".npz")).exists():
            counts.already_written += 1
        else:
            todo.append(name)
    start = last = time.perf_counter()
    feature_dim = None
    for at in range(0, len(todo), batch_size):
        pixels, metas, originals = [], [], []
        for name in todo[at:at + batch_size]:
            try:
                x, (H, W), image = read_image(root / name, size)
            except (OSError, ValueError) as e:
                counts.unreadable += 1
                unreadable.add(root / name, one_line(e))
                continue
            regions, dropped = image_regions(boxes_spec, name, H, W)
            counts.bad_boxes += dropped
            if regions is None:
                counts.no_boxes += 1
                continue
            pixels.append(x)
            metas.append((name, (H, W), regions))
            originals.append(image if tagger is not None else None)
        if pixels:
            grid = resnet(torch.stack(pixels).to(device))  # (B, C, S/32, S/32)
            feats = box_features(grid, [torch.from_numpy(r["boxes"]) for _, _, r in metas],
                                 size)  # B x (N, C)
            feature_dim = grid.shape[1]
            if tagger is not None:  # its tags and cls_prob replace the box source's
                for (_, _, regions), tagged in zip(metas, tagger(
                        originals, [r["boxes"] for _, _, r in metas])):
                    regions.update(tagged)
            for (name, hw, regions), f in zip(metas, feats):
                path = out_dir / (Path(name).stem + ".npz")
                try:
                    write_npz_atomic(path, {"features": f.cpu().numpy().astype(np.float16),
                                            **regions, "image_hw": np.array(hw, np.int32)})
                except OSError as e:
                    raise SystemExit(f"error: could not write {path}: {e.strerror or one_line(e)}"
                                     f"; the {counts.written} files written before it are "
                                     f"complete, and a rerun resumes after them") from None
                counts.written += 1
                unreadable.written(root / name)
        now = time.perf_counter()
        if now - last >= log_every_s or at + batch_size >= len(todo):
            last = now
            done = counts.written + counts.unreadable + counts.no_boxes
            print(f"extract: {done}/{len(todo)} images, {counts.written / (now - start):.1f} "
                  f"images/s, {counts.unreadable} unreadable, {counts.no_boxes} without boxes, "
                  f"{counts.bad_boxes} boxes dropped, {counts.already_written} already written",
                  file=sys.stderr, flush=True)
    unreadable.close()
    seconds = time.perf_counter() - start
    summary = {**settings, "batch_size": batch_size, "device": str(device),
               "feature_dim": feature_dim, **dataclasses.asdict(counts),
               "seconds": round(seconds, 2),
               "images_per_s": round(counts.written / seconds, 2) if counts.written else None}
    write_record(out_dir / "extract.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Region features (.npz per image) for Oscar "
                                                 "and UNITER from images.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("regions", help="one region .npz per image (train.py --data regions:)")
    r.add_argument("source", type=Path, help="an image folder or a COCO JSON (images[*].file_name)")
    r.add_argument("out_dir", type=Path)
    r.add_argument("--boxes", default="grid:3", help="grid:S, instances:FILE or json:FILE")
    r.add_argument("--image_dir", default="", help="a COCO JSON's images (default: images/ "
                                                   "beside it)")
    r.add_argument("--backbone_weights", default="", help="a torchvision resnet50 state dict")
    r.add_argument("--virtex", default="", help="one of our VirTex checkpoints")
    r.add_argument("--random_weights", nargs="?", type=int, const=0, default=None,
                   metavar="SEED", help="a random ResNet-50 drawn with this seed (default 0): "
                                        "one seed, one network, in every run")
    r.add_argument("--image_size", type=int, default=0,
                   help="side the images are resized to (0: 224, or the VirTex checkpoint's)")
    r.add_argument("--batch_size", type=int, default=16)
    r.add_argument("--n", type=int, default=0,
                   help="only the first n images (0 = all): a folder's in natural order "
                        "(img2 before img10), a COCO JSON's in the file's order")
    r.add_argument("--device", default="auto")
    r.add_argument("--tag_model", default="", help="a CoCa checkpoint: zero-shot tags and "
                                                   "cls_prob for every box")
    r.add_argument("--tag_vocab", default="", help="the tags, one a line (with --tag_model)")
    r.add_argument("--tag_threshold", type=float, default=0.5,
                   help="a box's best tag is kept at this probability or more")
    r.add_argument("--tag_context", type=float, default=0.5,
                   help="each box is widened by this much of its size on every side for tagging")
    args = parser.parse_args(argv)
    summary = extract_regions(args.source, args.out_dir, args.boxes, args.image_dir,
                              args.backbone_weights, args.virtex, args.random_weights,
                              args.image_size, args.batch_size, args.n, args.device,
                              tag_model=args.tag_model, tag_vocab=args.tag_vocab,
                              tag_threshold=args.tag_threshold, tag_context=args.tag_context)
    print(f"{summary['written']} region files written to {args.out_dir} ({summary['feature_dim']}"
          f"-d features, {summary['images_per_s']} images/s), {summary['already_written']} "
          f"already there, {summary['unreadable']} unreadable, {summary['no_boxes']} without "
          f"boxes, {summary['bad_boxes']} boxes dropped (not finite or empty)")


if __name__ == "__main__":
    main()
