"""Use a trained checkpoint from the command line (train.py writes best.pt / latest.pt).

    python infer.py caption runs/coca-tiny/best.pt photo1.jpg photo2.png
    python infer.py caption runs/virtex-tiny/best.pt photo.jpg --json
    python infer.py caption runs/coca-tiny/best.pt photo.jpg --prompt "one object"
    python infer.py caption runs/oscar-tiny-caption/best.pt --regions img1.npz img2.npz
    python infer.py classify runs/coca-tiny/best.pt photo.jpg --classes "red circle" "blue star"
    python infer.py rank runs/coca-tiny/best.pt "a red circle" photos/ --top 5
    python infer.py zeroshot runs/coca-tiny/best.pt imagenet/val      # root/<class name>/*.jpg
    python infer.py probe runs/virtex-tiny/best.pt imagenet/train imagenet/val --n_train 50000
    python infer.py karpathy runs/coca-tiny/best.pt dataset_coco.json,COCO_ROOT --results r.json
    python infer.py karpathy runs/uniter-tiny-retrieval/best.pt dataset_coco.json,REGIONS --n 1000
    python infer.py vqa runs/uniter-tiny-vqa/best.pt questions.json,annotations.json,regions/

caption   CoCa and VirTex caption image files, continuing --prompt when given (the caption
          begins with it); Oscar (a --task caption checkpoint) captions region files (the .npz
          of shared.folders.RegionFolder; tags are read from them)
classify  CoCa zero-shot: the class whose prompt "a <class>" is most similar to the image
rank      CoCa: the images of a folder (jpg, jpeg, png, bmp, webp), most similar to the text first
          (--top N >= 1 of them)
karpathy  the test (or --split val) images of a Karpathy split file: captioning by CoCa, VirTex
          and Oscar (--task caption) with BLEU-1..4, CIDEr-D, ROUGE-L against the raw
          sentences, both sides tokenised as the COCO toolkit does (shared.metrics.coco_tokenize),
          the captions written as COCO results JSON with --results (for METEOR / SPICE with the
          official toolkit); retrieval by CoCa (embeddings) and by UNITER and Oscar (--task
          pretrain or retrieval: a cross-encoder scores every image with every caption) with the
          first 5 captions of each image: R@1/5/10 both ways and their sum over the whole split
          (COCO 5K, Flickr30k 1K) and the mean over folds of 1,000 images (COCO 1K); UNITER and
          Oscar read SPLIT_JSON[,REGION_DIR] (each image's .npz named as its image file) and
          report pairs_scored, the forward passes it took (5K: 125M; use --n to cap)
vqa       UNITER and Oscar (--task vqa checkpoints) on VQA v2 questions with their region files
          (shared.vqa): the evaluation server's accuracy overall and per answer type, the
          answers written as its results JSON with --results
probe     CoCa and VirTex: a linear classifier on the frozen image features of a training image
          folder, top-1 on a validation folder with the same classes (shared.probe: the
          evaluation of VirTex §Downstream and, with a linear head, CoCa §4.2.1)
zeroshot  CoCa zero-shot top-1 / top-5 on an image folder, root/<class name>/<images> ("_" in a
          folder name reads as a space), each class embedded as the mean over prompt templates
          (shared.evaluate.PROMPT_TEMPLATES, or --templates "a {}" ...) [CoCa §4.2.2]

The output is one line per result for people, or one JSON document with --json for scripts.
Images are read as for training on a corpus (shared.folders.load_image: RGB, shorter side to the
model's image size, centre crop). An image given by name (caption, classify) or in rank's folder
that cannot be read stops the command with one line naming it. zeroshot and probe read whole
folders: an image there that cannot be read (truncated, a decompression bomb, a FIFO) is
skipped with a warning naming it, and the result counts the skipped ones ("unreadable"); the
accuracies are over the images read.
"""

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import train
from shared.benchmarks import _progress, evaluate_corpus
from shared.checkpoint import read_checkpoint
from shared.cli import one_line
from shared.folders import ImageFolder, load_image, read_region_file
from shared.tokenizer import Tokenizer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load(checkpoint: Path, device: str = "cpu"):
    """(paper module, model in eval mode, tokenizer, config, run options) of a checkpoint."""
    if not checkpoint.is_file():
        raise SystemExit(f"error: no checkpoint {checkpoint}")
    with one_line(""):  # not a checkpoint of train.py, or an unreadable one
        ckpt = read_checkpoint(checkpoint)
    paper = train.import_paper(ckpt["run"]["model"])
    config = dataclasses.replace(train.preset_config(paper, ckpt["run"]["preset"]),
                                 **ckpt["config"])
    model = paper.build_model(config).to(device)
    model.load_state_dict(ckpt["model"])
    return paper, model.eval(), Tokenizer.from_str(ckpt["tokenizer"]), config, ckpt["run"]


def _images(paths: list[Path], size: int) -> list:
    """The images of `paths` (load_image), or a one-line SystemExit naming the first that is
    missing or cannot be read (a path that is no regular file, a FIFO, is refused unopened)."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"error: no image file {missing[0]}")
    try:
        return [load_image(p, size) for p in paths]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None  # e names the file


def _each_readable(paths: list[Path], size: int) -> tuple[list, list[Path]]:
    """(images, their paths) of the `paths` that can be read: one that cannot (a bomb, a
    damaged or truncated file, a FIFO) is left out with a warning naming it, as a folder's bad
    images are everywhere; none readable, or a path that does not exist, is one line."""
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SystemExit(f"error: no image file {missing[0]}")
    images, kept, problems = [], [], []
    for path in paths:
        try:
            images.append(load_image(path, size))
            kept.append(path)
        except (OSError, ValueError) as e:  # its message names the file and the reason
            problems.append(str(e))
            if len(paths) > 1:
                warnings.warn(f"skipping an unreadable image ({e}); {len(problems)} skipped so "
                              f"far", stacklevel=2)
    if not images:
        raise SystemExit(f"error: no image could be read ({len(problems)} unreadable, named "
                         f"above)" if len(paths) > 1 else f"error: {problems[0]}")
    return images, kept


def _readable(folder: ImageFolder, indices, skipped: list[Path]) -> list:
    """folder.item(i) of each of `indices` whose image can be read. One that cannot is left
    out with a warning naming it and appended to `skipped` (shared across calls: the warning
    counts every image skipped so far)."""
    items = []
    for i in indices:
        try:
            items.append(folder.item(int(i)))
        except OSError as e:  # its message names the file and the reason
            skipped.append(folder.items[int(i)][0])
            warnings.warn(f"skipping an unreadable image ({e}); {len(skipped)} skipped so far",
                          stacklevel=2)
    return items


def _protocol(checkpoint: Path, protocol: str, what: str):
    """(paper, model, tokenizer, config, run) of a checkpoint whose paper declares `protocol`
    for its task (PROTOCOLS), else a one-line SystemExit saying what the command needs."""
    paper, model, tokenizer, config, run = load(checkpoint)
    if protocol not in paper.PROTOCOLS.get(config.task, ()):
        raise SystemExit(f"error: {what}; this {run['model']} checkpoint (--task {config.task}) "
                         f"has none")
    return paper, model, tokenizer, config, run


def caption(checkpoint: Path, images: list[Path], regions: list[Path],
            prompt: str = "") -> list[dict]:
    paper, model, tokenizer, config, run = _protocol(checkpoint, "caption",
                                                     "needs a checkpoint that writes captions")
    with torch.no_grad():
        if paper.INPUTS == "regions":
            if prompt:
                raise SystemExit("error: --prompt continues the caption of an image file; this "
                                 "model captions region files")
            if not regions or images:
                raise SystemExit(f"error: {run['model']} captions region files: give --regions "
                                 f"FILE.npz ...")
            missing = [p for p in regions if not p.exists()]  # a FIFO: read_region_file says
            if missing:
                raise SystemExit(f"error: no region file {missing[0]}")
            try:  # each file its own caption, or one line naming the file that cannot be read
                examples = [{"captions": ["-"], **read_region_file(p)} for p in regions]
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
            world_config = None
            if config.standardise_features:  # the statistics its training used
                world_config = train.make_world_config(paper, config, run["seed"])
            captions = paper.caption(model, tokenizer, config, examples, world_config)
            return [{"file": str(p), "caption": c} for p, c in zip(regions, captions)]
        read, images = _each_readable(images, config.image_size)  # unreadable ones skipped
        captions = paper.caption(model, tokenizer, config, [{"image": x} for x in read],
                                 prompt=prompt)
    return [{"file": str(p), "caption": c} for p, c in zip(images, captions)]


def _embeddings(checkpoint: Path):
    """(paper, model, tokenizer, config) of a checkpoint with image and text embeddings."""
    return _protocol(checkpoint, "zeroshot", "needs image and text embeddings (zero-shot, as "
                                             "CoCa's)")[:4]


def classify(checkpoint: Path, image: Path, classes: list[str]) -> list[dict]:
    paper, model, tokenizer, config = _embeddings(checkpoint)
    with torch.no_grad():
        image_emb = paper.embed_image_arrays(model, _images([image], config.image_size))  # (1, E)
        class_emb = paper.embed_text_strings(model, tokenizer, config,
                                             ["a " + c for c in classes])  # (C, E)
        probs = (image_emb @ class_emb.T * model.logit_scale.exp()).softmax(-1)[0]  # (C,)
    order = probs.argsort(descending=True).tolist()
    return [{"class": classes[k], "probability": round(float(probs[k]), 4)} for k in order]


def rank(checkpoint: Path, text: str, folder: Path, top: int) -> list[dict]:
    if top < 1:  # a slice [:0] is empty and [:-1] drops the last image, silently
        raise SystemExit(f"error: --top must be at least 1, got {top}")
    paper, model, tokenizer, config = _embeddings(checkpoint)
    if not folder.is_dir():
        raise SystemExit(f"error: no folder {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"error: no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    with torch.no_grad():
        read, paths = _each_readable(paths, config.image_size)  # unreadable ones skipped
        image_emb = paper.embed_image_arrays(model, read)  # (n, E)
        text_emb = paper.embed_text_strings(model, tokenizer, config, [text])  # (1, E)
        scores = (image_emb @ text_emb.T)[:, 0]  # (n,) cosine similarities
    order = scores.argsort(descending=True)[:top].tolist()
    return [{"file": str(paths[k]), "similarity": round(float(scores[k]), 4)} for k in order]


def zeroshot(checkpoint: Path, root: Path, templates: tuple[str, ...] | None = None,
             chunk: int = 250) -> dict:
    """{"images", "classes", "unreadable", "top1", "top5"} of CoCa's zero-shot classification
    of a folder: "images" those read and scored, "unreadable" those skipped (_readable)."""
    from shared.evaluate import PROMPT_TEMPLATES, class_embeddings, top_k_accuracy

    paper, model, tokenizer, config = _embeddings(checkpoint)
    try:
        folder = ImageFolder(root, config.image_size)
        with torch.no_grad():
            class_emb = class_embeddings(
                lambda texts: paper.embed_text_strings(model, tokenizer, config, texts),
                folder.classes, tuple(templates or PROMPT_TEMPLATES))  # (C, E)
            logits, labels, skipped = [], [], []
            for start in range(0, len(folder), chunk):  # images read a chunk at a time
                items = _readable(folder, range(start, min(start + chunk, len(folder))), skipped)
                if not items:
                    continue
                image_emb = paper.embed_image_arrays(model, [image for image, _ in items])
                logits.append(image_emb @ class_emb.T)  # (b, C)
                labels += [label for _, label in items]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if not labels:
        raise SystemExit(f"error: {root}: none of its {len(folder)} images can be read")
    accuracy = top_k_accuracy(torch.cat(logits), torch.tensor(labels, device=class_emb.device))
    return {"images": len(labels), "classes": len(folder.classes), "unreadable": len(skipped),
            **accuracy}


def probe(checkpoint: Path, train_root: Path, val_root: Path, n_train: int = 0, n: int = 0,
          chunk: int = 250) -> dict:
    """The linear probe of a CoCa or VirTex checkpoint's frozen image features on an image
    folder pair, root/<class name>/<images> (shared.probe.probe_accuracy: multinomial logistic
    regression, weight decay chosen on held-out training images): {"train_images",
    "val_images", "classes", "unreadable", "top1"}. n_train, n > 0: that many images of each
    folder, spread evenly over it (so over its classes). An image that cannot be read is
    skipped (_readable): the image counts are of those read, "unreadable" counts the others."""
    from shared.probe import probe_accuracy

    paper, model, tokenizer, config, run = _protocol(checkpoint, "probe",
                                                     "probe reads frozen image features")
    try:
        folders = [ImageFolder(root, config.image_size) for root in (train_root, val_root)]
        unknown = sorted(set(folders[1].classes) - set(folders[0].classes))
        if unknown:
            raise ValueError(f"{val_root}: class folder {unknown[0]!r} is not a class of "
                             f"{train_root}")
        features, skipped = [], []
        for folder, count in zip(folders, (n_train, n)):
            count = len(folder) if count <= 0 else min(count, len(folder))
            index = np.linspace(0, len(folder) - 1, count).round().astype(int)  # evenly spread
            x, y = [], []
            with torch.no_grad():
                for start in range(0, count, chunk):
                    items = _readable(folder, index[start:start + chunk], skipped)
                    if items:
                        x.append(paper.image_features(model, [image for image, _ in items])
                                 .float().cpu())  # (b, C)
                        y += [folders[0].classes.index(folder.classes[label])
                              for _, label in items]
                    _progress(min(start + chunk, count), count, f"images of {folder.root}")
            if not y:
                raise ValueError(f"{folder.root}: none of the {count} images chosen can be read")
            features += [torch.cat(x), torch.tensor(y)]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    order = torch.randperm(len(features[1]), generator=torch.Generator().manual_seed(0))
    x_train, y_train = features[0][order], features[1][order]  # random order: see probe_accuracy
    top1 = probe_accuracy(x_train, y_train, features[2], features[3], len(folders[0].classes))
    return {"train_images": len(x_train), "val_images": len(features[2]),
            "classes": len(folders[0].classes), "unreadable": len(skipped), "top1": top1}


def karpathy(checkpoint: Path, spec: str, split: str = "test", n: int = 0,
             results: Path | None = None, chunk: int = 100, group: int = 1000,
             pairs: int = 8192) -> dict:
    """The Karpathy-split evaluation of a checkpoint (module docstring, evaluate_corpus): a dict
    of metrics, with "images" the number evaluated (n > 0: the first n of the split)."""
    paper, model, tokenizer, config, run = load(checkpoint)
    spec = spec if spec.startswith("karpathy:") else "karpathy:" + spec
    try:
        return evaluate_corpus(model, paper, tokenizer, config, run["model"],
                               train.make_world_config(paper, config, run["seed"]), spec,
                               split, n, results, chunk, group, pairs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def vqa(checkpoint: Path, spec: str, results: Path | None = None, n: int = 0,
        chunk: int = 200) -> dict:
    """The VQA v2 evaluation of a UNITER or Oscar --task vqa checkpoint on
    QUESTIONS_JSON[,ANNOTATIONS_JSON[,REGION_DIR]] (evaluate_corpus, shared.vqa.VQAFolder); n >
    0: the questions of the first n images."""
    paper, model, tokenizer, config, run = load(checkpoint)
    spec = spec if spec.startswith("vqa:") else "vqa:" + spec
    try:
        return evaluate_corpus(model, paper, tokenizer, config, run["model"],
                               train.make_world_config(paper, config, run["seed"]), spec,
                               n=n, results=results, chunk=chunk // 2)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def _unreadable_note(n: int) -> str:
    """What a result line adds when images were skipped (its counts leave them out)."""
    return f"; {n} unreadable images skipped (named in the warnings)" if n else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Captions, zero-shot classes and text-to-image "
                                                 "ranking from a trained checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("caption", help="caption images (CoCa, VirTex) or region files (Oscar)")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("images", type=Path, nargs="*")
    c.add_argument("--regions", type=Path, nargs="+", default=[])
    c.add_argument("--prompt", default="", help='text every caption continues, e.g. "one object"')
    z = sub.add_parser("classify", help="CoCa zero-shot classification of one image")
    z.add_argument("checkpoint", type=Path)
    z.add_argument("image", type=Path)
    z.add_argument("--classes", nargs="+", required=True)
    r = sub.add_parser("rank", help="CoCa: rank a folder of images for a text")
    r.add_argument("checkpoint", type=Path)
    r.add_argument("text")
    r.add_argument("folder", type=Path)
    r.add_argument("--top", type=int, default=5, help="how many images to list (>= 1)")
    e = sub.add_parser("zeroshot", help="CoCa zero-shot top-1 / top-5 on an image folder")
    e.add_argument("checkpoint", type=Path)
    e.add_argument("root", type=Path)
    e.add_argument("--templates", nargs="+", help='prompt templates, e.g. "a photo of a {}."')
    k = sub.add_parser("karpathy", help="a Karpathy split: captioning and retrieval")
    k.add_argument("checkpoint", type=Path)
    k.add_argument("data", help="SPLIT_JSON[,IMAGE_ROOT] (UNITER, Oscar: SPLIT_JSON[,REGION_DIR]),"
                                " e.g. dataset_coco.json,/data/coco")
    k.add_argument("--split", default="test", choices=("test", "val"))
    k.add_argument("--n", type=int, default=0, help="only the first n images (0 = all)")
    k.add_argument("--results", type=Path, help="write the captions as COCO results JSON")
    v = sub.add_parser("vqa", help="UNITER / Oscar on VQA v2 questions: accuracy, predictions")
    v.add_argument("checkpoint", type=Path)
    v.add_argument("data", help="QUESTIONS_JSON[,ANNOTATIONS_JSON[,REGION_DIR]]")
    v.add_argument("--n", type=int, default=0, help="only the first n images (0 = all)")
    v.add_argument("--results", type=Path, help="write the answers in the VQA results format")
    b = sub.add_parser("probe", help="CoCa / VirTex: linear probe on image folders")
    b.add_argument("checkpoint", type=Path)
    b.add_argument("train_root", type=Path, help="train_root/<class name>/<images>")
    b.add_argument("val_root", type=Path, help="the same classes, held-out images")
    b.add_argument("--n_train", type=int, default=0, help="training images (0 = all)")
    b.add_argument("--n", type=int, default=0, help="validation images (0 = all)")
    for p in (c, z, r, e, k, v, b):
        p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)
    out = getattr(args, "results", None)  # checked before the work, not after it
    if out is not None and out.is_dir():
        parser.error(f"--results {out}: a folder, not a file")
    if out is not None and not (out.parent.is_dir() and os.access(out.parent, os.W_OK)):
        parser.error(f"--results {out}: its folder {out.parent} does not exist or is not "
                     f"writable")
    if args.command == "caption":
        if not args.images and not args.regions:
            parser.error("give image files, or --regions files for Oscar")
        results = caption(args.checkpoint, args.images, args.regions, args.prompt)
        lines = [f"{r['file']}: {r['caption']}" for r in results]
    elif args.command == "classify":
        results = classify(args.checkpoint, args.image, args.classes)
        lines = [f"{r['probability']:.4f}  {r['class']}" for r in results]
    elif args.command == "rank":
        results = rank(args.checkpoint, args.text, args.folder, args.top)
        lines = [f"{r['similarity']:+.4f}  {r['file']}" for r in results]
    elif args.command in ("karpathy", "vqa"):
        results = (karpathy(args.checkpoint, args.data, args.split, args.n, args.results)
                   if args.command == "karpathy" else
                   vqa(args.checkpoint, args.data, args.results, args.n))
        lines = [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                 for key, value in results.items()]
    elif args.command == "probe":
        results = probe(args.checkpoint, args.train_root, args.val_root, args.n_train, args.n)
        lines = [f"{results['train_images']} training and {results['val_images']} validation "
                 f"images, {results['classes']} classes: top-1 {results['top1']:.4f}"
                 + _unreadable_note(results["unreadable"])]
    else:
        results = zeroshot(args.checkpoint, args.root, args.templates)
        lines = [f"{results['images']} images, {results['classes']} classes: top-1 "
                 f"{results['top1']:.4f}, top-5 {results['top5']:.4f}"
                 + _unreadable_note(results["unreadable"])]
    sys.stdout.write(json.dumps({args.command: results}, indent=1) + "\n" if args.json
                     else "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
