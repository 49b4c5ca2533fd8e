"""Downstream evaluation on the synthetic world (and image folders), shared by the paper files.

A paper's `evaluate` asks its model for what only the paper knows (an embedding, a pair score, a
caption, an answer's logits) and maps the pieces below onto its metric keys in a few lines:

    in_eval_mode        decorator: eval mode and no gradients for the call, the mode restored after
    world_examples      the first n examples of a world split
    image_batch         uint8 (H, W, 3) arrays -> (B, 3, H, W) normalised tensor on a device
    pair_scores         the (n images, n texts) matrix of a cross-encoder: n² pair scores, chunked
    all_captions        every caption of some examples and the image of each (retrieval texts)
    retrieval_metrics   R@1/5/10 both ways from a scores matrix and the image of each text
    grouped_retrieval   the same for a dual encoder, among groups of images and all their captions
    grouped_pair_retrieval  the same for any scorer (a cross-encoder scores g·G pairs a group)
    reference_caption   a reference caption as a model could write it (tokenised, cut, decoded)
    caption_examples    captions for many images, `chunk` images per decoding call
    caption_metrics     BLEU-4, CIDEr-D, ROUGE-L and the world's caption truth rate
    ScstReward          CIDEr-D of sampled captions with the training references' statistics
    predict_answers     every question of some examples answered by a model's answer logits
    answer_questions    the same for a paper's answer_logits_fn (its contract answer_questions)
    vqa_metrics         VQA accuracy, overall and per question template
    sample_captions     (generated, reference) pairs to print after training

and, for image folders on disk (infer.py zeroshot):

    PROMPT_TEMPLATES    ways a caption names one object, for the prompt ensemble
    class_embeddings    per class, the normalised mean of its prompts' text embeddings
    top_k_accuracy      top-1 / top-5 of a logit table

Shapes: n examples, G captions of a group, E embedding width, A answers.
"""

import functools
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.data import IMAGE_MEAN, IMAGE_STD, image_captions, image_to_tensor
from shared.metrics import (CiderD, bleu, cider_d, recall_at_k, rouge_l, truth_rate,
                            vqa_accuracy_by_type)


def in_eval_mode(fn: Callable) -> Callable:
    """fn(model, ...) runs with model.eval() and torch.no_grad(); the model's training mode is
    restored afterwards, also when fn raises. A dict of metrics comes back with Python numbers:
    counts (ints, integer numpy or tensor scalars) as int, everything else as float."""

    @functools.wraps(fn)
    def wrapper(model: torch.nn.Module, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = fn(model, *args, **kwargs)
        finally:
            model.train(was_training)
        if isinstance(out, dict):
            return {k: _plain_number(v) for k, v in out.items()}
        return out
    return wrapper


def _plain_number(value) -> int | float:
    """A metric as a Python int (a count) or float, whatever it was computed as."""
    if isinstance(value, (int, np.integer)) or (torch.is_tensor(value)
                                                and not value.is_floating_point()):
        return int(value)
    return float(value)


def world_examples(world_config, split: str, n: int, regions: bool = True) -> list[dict]:
    """The first min(n, len(split)) examples of World(world_config, split). regions=False skips
    the detector (pixel models do not read regions)."""
    from shared.world import World  # imported where read: importing a paper skips the world
    world = World(world_config, split)
    return [world.example(i, regions=regions) for i in range(min(n, len(world)))]


def image_batch(images: list[np.ndarray], device: torch.device, mean=IMAGE_MEAN,
                std=IMAGE_STD) -> Tensor:
    """uint8 (H, W, 3) arrays -> (B, 3, H, W) normalised pixels on `device`."""
    return torch.stack([image_to_tensor(image, mean, std) for image in images]).to(device)


def pair_scores(score: Callable[[Tensor, Tensor], Tensor], n: int, n_texts: int | None = None,
                chunk: int = 1024) -> Tensor:
    """Every (image i, text t) pair of n images and n_texts texts (default n) scored by a
    cross-encoder, `chunk` pairs a call.

    score(image_index (p,), text_index (p,)) -> (p,) scores. Returns (n images, G texts) on the
    CPU, float32. n·G forward passes, as the official UNITER and Oscar evaluations do."""
    G = n if n_texts is None else n_texts
    image = torch.arange(n).repeat_interleave(G)  # (n·G,), image-major
    text = torch.arange(G).repeat(n)  # (n·G,)
    out = [score(image[s:s + chunk], text[s:s + chunk]).float().cpu()
           for s in range(0, n * G, chunk)]
    return torch.cat(out).view(n, G)  # (n images, G texts)


def all_captions(examples: list[dict]) -> tuple[list[str], Tensor]:
    """Every caption of the examples, image by image, and the image each belongs to: (texts
    (G,), text_image (G,)), G = 5n in the world and in COCO. The retrieval test ranks all of them
    [UNITER §A.2; Oscar §4]: an image is found when any of its captions ranks in the top K."""
    texts = [c for ex in examples for c in ex["captions"]]
    text_image = torch.tensor([k for k, ex in enumerate(examples) for _ in ex["captions"]])
    return texts, text_image


def retrieval_metrics(scores: Tensor, text_image: Tensor | None = None) -> dict[str, float]:
    """i2t_r1/5/10, t2i_r1/5/10 of a (n images, G texts) matrix, text t belonging to image
    text_image[t] (default: the diagonal, G = n), and r1_mean = (i2t_r1 + t2i_r1) / 2."""
    if text_image is None:
        text_image = torch.arange(scores.shape[1])
    metrics = recall_at_k(scores, text_image)
    metrics["r1_mean"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
    return metrics


def grouped_retrieval(embed_images: Callable[[list], Tensor],
                      embed_texts: Callable[[list[str]], Tensor], examples: list[dict],
                      group: int = 100) -> dict[str, float]:
    """Dual-encoder retrieval among groups of `group` images and all their captions (5 each in the
    world), the recalls averaged over groups (the last group may be smaller).

    embed_images(uint8 arrays) -> (g, E); embed_texts(strings) -> (G, E); both L2-normalised,
    so that their product is the cosine similarity."""
    return grouped_pair_retrieval(lambda part, texts: embed_images(
        [ex["image"] for ex in part]) @ embed_texts(texts).T, examples, group)  # (g, G)


def grouped_pair_retrieval(score: Callable[[list[dict], list[str]], Tensor],
                           examples: list[dict], group: int = 1000) -> dict[str, float]:
    """Retrieval among groups of `group` images and all their captions, the recalls averaged
    over groups (COCO 1K: the mean over five folds of 1,000 images of the 5K test; a group as
    large as the split: COCO 5K, Flickr30k 1K). score(examples, texts) -> (g images, G texts):
    for a cross-encoder g·G forward passes a group (UNITER and Oscar), for a dual encoder a
    product of embeddings."""
    recalls = []
    for start in range(0, len(examples), group):
        part = examples[start:start + group]
        texts = [c for ex in part for c in ex["captions"]]
        text_image = torch.tensor([k for k, ex in enumerate(part) for _ in ex["captions"]])  # (G,)
        recalls.append(recall_at_k(score(part, texts).float().cpu(), text_image))
    return {key: sum(float(r[key]) for r in recalls) / len(recalls) for key in recalls[0]}


def reference_caption(tokenizer, text: str, max_pieces: int) -> str:
    """A reference caption as the model could write it: its first max_pieces word-pieces, decoded
    and lowercased, so that BLEU / CIDEr-D compare generated and reference text alike."""
    return tokenizer.decode(tokenizer.encode(text, add_special=False)[:max_pieces]).lower()


def caption_examples(caption: Callable[[list[dict]], list[str]], examples: list[dict],
                     chunk: int = 100) -> list[str]:
    """caption(examples) -> captions, called on `chunk` examples at a time."""
    return [c for s in range(0, len(examples), chunk) for c in caption(examples[s:s + chunk])]


def caption_metrics(captions: list[str], examples: list[dict], tokenizer,
                    max_pieces: int) -> dict[str, float]:
    """Generated captions against each example's references (reference_caption):

    bleu4, cider, rouge_l   BLEU-4, CIDEr-D and ROUGE-L (shared.metrics)
    caption_truth           the share of captions the world's checker finds true of the scene
    caption_truth_baseline  the same for the single most common generated caption (truth_rate)
    """
    from shared.world import is_true
    references = [[reference_caption(tokenizer, c, max_pieces) for c in ex["captions"]]
                  for ex in examples]
    truth = truth_rate(captions, [ex["scene"] for ex in examples], is_true)
    return {"bleu4": bleu(captions, references)[3], "cider": cider_d(captions, references),
            "rouge_l": rouge_l(captions, references), "caption_truth": truth["truth"],
            "caption_truth_baseline": truth["baseline"]}


def scst_sentence(text: str) -> str:
    """A caption as SCST's CIDEr-D reads it [code: Oscar's ScstRewardCriterion]: stripped, a
    final full stop dropped, " <eos>" appended (so a caption that ends where a reference ends
    shares that n-gram with it). Candidates and references alike."""
    text = text.strip()
    return (text[:-1] if text.endswith(".") else text).rstrip() + " <eos>"


class ScstReward:
    """SCST's reward: CIDEr-D of decoded captions against their image's references, with the
    document frequencies of the training references [Rennie et al. 2017; Oscar §5.1; code:
    ScstRewardCriterion over CiderD with df from COCO train], one float per caption.

        reward = ScstReward.from_source(source, tokenizer, max_pieces, n_images)
        reward.references(captions)        an image's captions as the reward compares them
        reward(tokens (R, T), references)  -> (R,) float32 on the CPU, references[r] the
                                              (already prepared) references of row r's image

    References are prepared as caption_metrics prepares them (reference_caption: tokenised,
    cut to max_pieces, decoded, lowercased), so a caption the model can write scores as it
    would in the evaluation; then scst_sentence. It holds the tokenizer: the batch carries this
    object to the model's forward, which decodes its samples with it."""

    def __init__(self, tokenizer, corpus: list[list[str]], max_pieces: int):
        self.tokenizer, self.max_pieces = tokenizer, max_pieces
        self.cider = CiderD([self.references(captions) for captions in corpus])

    @classmethod
    def from_source(cls, source, tokenizer, max_pieces: int, n_images: int) -> "ScstReward":
        """Document frequencies from the captions of the first n_images training images (0 =
        all; shared.data.image_captions)."""
        return cls(tokenizer, image_captions(source, n_images or len(source)), max_pieces)

    def references(self, captions: list[str]) -> list[str]:
        return [scst_sentence(reference_caption(self.tokenizer, c, self.max_pieces))
                for c in captions]

    def __call__(self, tokens: Tensor, references: list[list[str]]) -> Tensor:
        texts = [scst_sentence(t.lower()) for t in self.tokenizer.decode_batch(tokens.cpu())]
        return torch.tensor(self.cider.scores(texts, references), dtype=torch.float32)  # (R,)


def predict_answers(examples: list[dict], answer_logits: Callable[[list[str], list[int]], Tensor],
                    answers: list[str], chunk: int = 256) -> tuple[list[str], list[tuple]]:
    """Every question of the examples (their "questions": (question, answer) pairs), answered
    `chunk` at a time by the highest-scoring of `answers` (Oscar and UNITER VQA).

    answer_logits(questions: b strings, images: b indices into examples) -> (b, A) logits over
    `answers`. Returns (the predicted answers, the (question, answer, image index) triples),
    in the order of the examples and of their questions."""
    qa = [(q, a, k) for k, ex in enumerate(examples) for q, a in ex["questions"]]
    predicted = []
    for s in range(0, len(qa), chunk):
        part = qa[s:s + chunk]
        logits = answer_logits([q for q, _, _ in part], [k for _, _, k in part])  # (b, A)
        predicted += [answers[a] for a in logits.argmax(dim=-1).tolist()]
    return predicted, qa


@in_eval_mode
def answer_questions(model: torch.nn.Module, answer_logits_fn: Callable, tokenizer, config,
                     examples: list[dict], world_config=None, chunk: int = 256) -> list[str]:
    """The predicted answer of every question of the examples (their "questions", in order): the
    highest-scoring of config.answers. answer_logits_fn(model, tokenizer, config, examples,
    world_config) -> answer_logits for predict_answers: what a paper's model reads (its
    regions, its text layout) is all that differs between the papers."""
    answer_logits = answer_logits_fn(model, tokenizer, config, examples, world_config)
    return predict_answers(examples, answer_logits, config.answers, chunk)[0]


def vqa_metrics(answer_logits: Callable[[list[str], list[int]], Tensor], examples: list[dict],
                answers: list[str], chunk: int = 256) -> dict[str, float]:
    """vqa_acc over every question of the examples and vqa_acc_<type> per question template
    (shared.metrics.vqa_accuracy). The world gives one answer a question: it counts as ten
    annotators who all gave it, so a right answer scores 1, as on the evaluation server.

    answer_logits(questions, image indices into examples) -> (b, A) logits over `answers`."""
    from shared.world import question_type
    predicted, qa = predict_answers(examples, answer_logits, answers, chunk)
    return vqa_accuracy_by_type(predicted, [[a] * 10 for _, a, _ in qa],
                                [question_type(q) for q, _, _ in qa])


def sample_captions(caption: Callable[[list[dict]], list[str]], world_config, split: str,
                    n: int, regions: bool = True) -> list[tuple[str, str]]:
    """(generated caption, first reference caption) for the first n images of a world split."""
    examples = world_examples(world_config, split, n, regions)
    return [(g, ex["captions"][0]) for g, ex in zip(caption(examples), examples)]


# Prompt templates for zero-shot classification on real images, in the manner of CLIP's
# ensemble (Radford et al. 2021, §3.1.4): ways a caption names one object.
PROMPT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
                    "a photo of the {}.", "a close-up photo of a {}.", "a cropped photo of a {}.",
                    "a blurry photo of a {}.")


def class_embeddings(embed_texts: Callable[[list[str]], Tensor], classes: list[str],
                     templates: tuple[str, ...] = PROMPT_TEMPLATES) -> Tensor:
    """(C, E): for each class, the L2-normalised mean of the L2-normalised text embeddings of
    its prompts, template.format(class) for every template [CoCa §4.2.2, after CLIP].
    embed_texts(strings) -> (n, E)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template needs a {} where the class name goes")
    prompts = [t.format(c) for c in classes for t in templates]  # C·P strings, class-major
    emb = F.normalize(embed_texts(prompts), dim=-1)  # (C·P, E)
    emb = emb.reshape(len(classes), len(templates), -1).mean(dim=1)  # (C, E)
    return F.normalize(emb, dim=-1)  # (C, E)


def top_k_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict:
    """{"top1": ..., "top5": ...}: the share of rows whose label is among the k highest logits
    (k capped at the number of classes). logits (n, C), labels (n,)."""
    ranked = logits.argsort(dim=1, descending=True)  # (n, C)
    hits = ranked == labels[:, None]  # (n, C), one True a row
    return {f"top{k}": float(hits[:, :min(k, logits.shape[1])].any(dim=1).float().mean())
            for k in ks}
