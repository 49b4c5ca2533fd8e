"""Evaluation on data on disk, the papers' protocols (train.py --val_data and --eval_only, and
infer.py karpathy / vqa): captioning (BLEU-1..4, CIDEr-D, ROUGE-L with COCO's tokenisation) and
retrieval with 5 captions an image (R@1/5/10 both ways, over the whole split and as the mean of
1,000-image folds) on a Karpathy split or a held-out corpus, and VQA v2's server accuracy. The
paper module is an argument: this file imports none.

    evaluate_corpus(model, paper, tokenizer, config, name, world_config, spec, ...) -> metrics
    check_spec(spec, paper, config, splits)   its files and index read before any work, so a
                                              bad --val_data stops a run at its start
"""

import json
import sys
from pathlib import Path

import torch

from shared.evaluate import in_eval_mode
from shared.folders import RegionFolder, karpathy_split, load_image


def _progress(done: int, total: int, what: str) -> None:
    """A progress line on stderr, rewritten in place."""
    sys.stderr.write(f"\r{done}/{total} {what}" + ("\n" if done == total else ""))
    sys.stderr.flush()


def _caption_items(spec: str, inputs: str, image_size: int, split: str) -> list[dict]:
    """The evaluation images of a spec: [{"image_id", "path" (the image, or for a region model
    its .npz), "captions"}]. karpathy:SPLIT_JSON[,ROOT] (the prefix may be left out): the images
    of `split`, ROOT the image root or, for a region model, the folder of .npz files named as the
    images (default: regions/ beside the file); coco:, jsonl:, regions: (shared.folders): every
    image of that held-out corpus (split does not apply), image_id its position."""
    from shared.folders import open_corpus

    kind, _, rest = spec.partition(":")
    regions = inputs == "regions"
    if kind in ("coco", "jsonl", "regions"):
        corpus = open_corpus(spec, inputs, image_size)
        if corpus.dropped_images:
            raise ValueError(f"{spec}: {corpus.dropped_images} images have no file or no "
                             f"caption; an evaluation set must be complete")
        return [{"image_id": k, "path": path, "captions": captions}
                for k, (path, captions) in enumerate(corpus.records)]
    file, _, root = (rest if kind == "karpathy" else spec).partition(",")
    items = karpathy_split(file, None if regions else (root or None), split)
    if regions:
        region_dir = Path(root) if root else Path(file).parent / "regions"
        items = [{**item, "path": region_dir / (Path(item["path"]).stem + ".npz")}
                 for item in items]
        missing = [item["path"] for item in items if not item["path"].is_file()]
        if missing:
            raise ValueError(f"no region file {missing[0]} ({len(missing)} of the split's "
                             f"{len(items)} images lack one)")
    return items


def check_spec(spec: str, paper, config, splits=("val", "test")) -> None:
    """What evaluate_corpus would refuse of `spec` before reading a pixel: a protocol the
    paper's task lacks, missing or malformed index files, images or region files that are not
    there, an empty split (Karpathy files: each of `splits`). A ValueError or OSError names it."""
    protocols = paper.PROTOCOLS.get(config.task, ())
    if spec.startswith("vqa:"):
        from shared.vqa import VQAFolder

        if "vqa" not in protocols:
            raise ValueError(f"VQA data needs a model whose task answers questions, not "
                             f"--task {config.task}")
        folder = VQAFolder.from_spec(spec)
        if folder.missing:
            raise ValueError(f"question {folder.missing[0][0]}: its image has no region file")
        return
    if not ({"caption", "retrieval"} & set(protocols)):
        raise ValueError(f"captioning and retrieval data; --task {config.task} is evaluated "
                         f"on neither")
    held_out = spec.partition(":")[0] in ("coco", "jsonl", "regions")  # one set, no splits
    for split in splits[:1] if held_out else splits:
        if not _caption_items(spec, paper.INPUTS, config.image_size, split):
            raise ValueError(f"{spec}: no image in its {split} split")


def _read_examples(items: list[dict], regions: bool, image_size: int) -> list[dict]:
    """{"image" or the region arrays, "captions"} of each item; ValueError on an unreadable
    file (its message names it)."""
    if not regions:
        missing = [item["path"] for item in items if not Path(item["path"]).is_file()]
        if missing:  # absent, or there but not a regular file (a FIFO would block a read)
            kind = "not a regular file" if Path(missing[0]).exists() else "no image file"
            raise ValueError(f"{kind} {missing[0]}")
        return [{"image": load_image(item["path"], image_size), "captions": item["captions"]}
                for item in items]
    folder = RegionFolder([(item["path"], item["captions"]) for item in items])
    return [{**folder._read(item["path"]), "captions": item["captions"]} for item in items]


@in_eval_mode
def evaluate_corpus(model, paper, tokenizer, config, name: str, world_config, spec: str,
                    split: str = "test", n: int = 0, results: Path | None = None,
                    chunk: int = 100, group: int = 1000, pairs: int = 8192,
                    max_retrieval_images: int = 0) -> dict:
    """The metrics of a model on evaluation data on disk (train.py --val_data and --eval_only
    and infer.py use it): vqa: specs go to VQA (_vqa_metrics); the others (_caption_items) to
    captioning (CoCa, VirTex, Oscar --task caption) and retrieval (CoCa by embeddings, UNITER
    and Oscar --task pretrain / retrieval as cross-encoders), as the module docstring says.
    n > 0: the first n images. results: the captions (VQA: answers) in the official format.
    pairs: about how many image-caption pairs a cross-encoder scores a call;
    max_retrieval_images > 0: a cross-encoder ranks among only the first that many images and
    their captions (train.py passes the config's eval_pairs: the protocol's n · 5n forward
    passes are 5M for 1,000 images), said in "retrieval_images". world_config: the world the
    model trained beside (train.make_world_config), whose statistics a region model without
    its own (feature_mean) standardises with."""
    from shared.evaluate import grouped_pair_retrieval
    from shared.metrics import bleu, cider_d, coco_tokenize, rouge_l

    regions = paper.INPUTS == "regions"
    protocols = paper.PROTOCOLS.get(config.task, ())  # what this paper's task is judged on
    if spec.startswith("vqa:"):
        if "vqa" not in protocols:
            raise ValueError(f"VQA data needs a checkpoint that answers questions, not {name} "
                             f"--task {config.task}")
        return _vqa_metrics(model, paper, tokenizer, config, world_config, spec, n, results,
                            2 * chunk)
    captions_too, retrieval = "caption" in protocols, "retrieval" in protocols
    if not (captions_too or retrieval):
        raise ValueError(f"captioning and retrieval data; this {name} checkpoint is --task "
                         f"{config.task}")
    items = _caption_items(spec, paper.INPUTS, config.image_size, split)
    items = items[:n] if n > 0 else items
    examples = _read_examples(items, regions, config.image_size)
    metrics = {"images": len(items)}
    if captions_too:
        captions = []
        for start in range(0, len(examples), chunk):
            part = examples[start:start + chunk]
            captions += paper.caption(model, tokenizer, config, part, world_config)
            _progress(min(start + chunk, len(examples)), len(examples), "images captioned")
        candidates = [coco_tokenize(c) for c in captions]
        references = [[coco_tokenize(c) for c in item["captions"]] for item in items]
        b = bleu(candidates, references)
        metrics |= {**{f"bleu{k + 1}": b[k] for k in range(4)},
                    "cider": cider_d(candidates, references),
                    "rouge_l": rouge_l(candidates, references)}
        if results is not None:  # the COCO results format the official toolkit reads
            results.write_text(json.dumps([{"image_id": item["image_id"], "caption": c}
                                           for item, c in zip(items, captions)]) + "\n")
    if retrieval:  # the first 5 captions of each image, as the papers' protocol
        five = [{**ex, "captions": ex["captions"][:5]} for ex in examples]
        cross = paper.CROSS_ENCODER  # every image with every caption of its group
        if cross and max_retrieval_images > 0:
            five = five[:max_retrieval_images]
            metrics["retrieval_images"] = len(five)
        if cross:  # a few images a call, with a progress line
            def score(part, texts):  # (g, G), a few images a call, with a progress line
                rows, step = [], max(1, pairs // len(texts))
                for s in range(0, len(part), step):
                    rows.append(paper.retrieval_scores(model, tokenizer, config,
                                                       part[s:s + step], world_config, texts))
                    _progress(min(s + step, len(part)) * len(texts), len(part) * len(texts),
                              "image-caption pairs scored")
                return torch.cat(rows)  # (g, G)
        else:  # embeddings: the whole group in one call
            score = lambda part, texts: paper.retrieval_scores(  # (g, G)
                model, tokenizer, config, part, world_config, texts)
        whole = grouped_pair_retrieval(score, five, group=len(five))
        folds = whole if len(five) <= group else grouped_pair_retrieval(score, five, group)
        for key, recalls in (("all", whole), ("1k", folds)):
            metrics |= {f"{k}_{key}": value for k, value in recalls.items()}
            metrics[f"rsum_{key}"] = sum(recalls.values())
        metrics["r1_mean"] = (whole["i2t_r1"] + whole["t2i_r1"]) / 2  # what best.pt keeps
        if cross:  # the cost of the protocol: g images x G captions, every group
            pairs = lambda size: sum(len(five[s:s + size]) * sum(
                len(ex["captions"]) for ex in five[s:s + size])
                for s in range(0, len(five), size))
            metrics["pairs_scored"] = pairs(len(five)) + (
                pairs(group) if len(five) > group else 0)
    return metrics


def _vqa_metrics(model, paper, tokenizer, config, world_config, spec: str, n: int,
                 results: Path | None, chunk: int) -> dict:
    """VQA v2 (shared.vqa.VQAFolder) of a model whose task answers questions (PROTOCOLS): the
    evaluation server's accuracy overall and per answer type (when the annotations are
    given)."""
    from shared.vqa import VQAFolder, accuracy_by_type, results_json

    folder = VQAFolder.from_spec(spec)
    if folder.missing:
        question, path = folder.missing[0]
        raise ValueError(f"question {question}: its image has no region file {path} "
                         f"({len(folder.missing)} questions lack one)")
    total = len(folder) if n <= 0 else min(n, len(folder))
    predicted, records = [], []
    for start in range(0, total, chunk):  # `chunk` images' regions in memory at a time
        examples = [folder.example(i) for i in range(start, min(start + chunk, total))]
        predicted += paper.answer_questions(model, tokenizer, config, examples, world_config)
        records += [r for ex in examples for r in ex["records"]]
        _progress(min(start + chunk, total), total, "images")
    if folder.unreadable:
        raise ValueError(f"{folder.unreadable} region files could not be read (named in the "
                         f"warnings above)")
    metrics = {"images": total, "questions": len(records)}
    if "answers" in records[0]:
        metrics |= accuracy_by_type(predicted, records)
    if results is not None:  # the evaluation server's format
        results.write_text(results_json(predicted, records))
    return metrics
