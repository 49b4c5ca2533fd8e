"""A sixth paper file, as small as the contract allows: a dual encoder (mean-pooled pixels and a
bag of words, each projected to a shared space) trained with a symmetric contrastive loss.

It defines the names of the README's contract and nothing else, and tests/test_toy_paper.py
runs it through the unchanged train.py, shared.benchmarks and infer.py: a forker's own paper
file gets everything the four papers get.
"""

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.config import optimisation_problems
from shared.data import ImageTextDataset, collate_image_text
from shared.evaluate import image_batch, in_eval_mode, world_examples
from shared.metrics import recall_at_k
from shared.optim import adamw

TASKS = ("pretrain",)
MAIN_METRIC = {"pretrain": "r1_mean"}
INPUTS = "pixels"
BERT_INIT = None
UNUSED_PARAMETERS = False
PROTOCOLS = {"pretrain": ("retrieval", "zeroshot", "probe")}
CROSS_ENCODER = False


@dataclasses.dataclass
class Config:
    embed_dim: int = 16  # the shared space
    image_size: int = 32  # the world's render size
    vocab_size: int = 200  # set from the tokenizer by train.py
    max_text_len: int = 16  # word-pieces a caption
    task: str = "pretrain"  # one of TASKS
    train_single_object_prob: float = 0.5  # the world's training mix
    batch_size: int = 8  # examples an update
    lr: float = 1e-3  # AdamW's peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    beta1: float = 0.9  # AdamW's β1
    beta2: float = 0.999  # AdamW's β2
    warmup_steps: int = 1  # linear warmup
    max_steps: int = 4  # updates
    lr_schedule: str = "cosine"  # after warmup
    grad_clip: float = 1.0  # global gradient norm
    grad_accum_steps: int = 1  # micro-batches an update

    def __post_init__(self):
        problems = optimisation_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def tiny(cls):
        return cls()

    small = tiny

    @classmethod
    def paper(cls, task: str = "pretrain"):  # the paper's recipe for a task: one here
        return cls(task=task)


class DualEncoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.image = nn.Linear(3, config.embed_dim)
        self.words = nn.EmbeddingBag(config.vocab_size, config.embed_dim, mode="mean")
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def embed_images(self, images: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, E)
        return F.normalize(self.image(images.mean((2, 3))), dim=-1)

    def embed_texts(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, E)
        return F.normalize(self.words(tokens, per_sample_weights=None), dim=-1)

    def forward(self, batch: dict) -> dict:
        logits = self.logit_scale.exp() * self.embed_images(batch["images"]) @ \
            self.embed_texts(batch["tokens"]).T  # (B, B)
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss, "contrastive": loss}


def build_model(config: Config) -> DualEncoder:
    return DualEncoder(config)


def make_optimizer(model: DualEncoder, config: Config) -> torch.optim.Optimizer:
    return adamw([{"params": list(model.parameters()), "weight_decay": config.weight_decay}],
                 config, fused=False)


def after_optimizer_step(model: DualEncoder) -> None:
    """Nothing to do."""


def train_dataset(source, tokenizer, config: Config, seed: int = 0) -> ImageTextDataset:
    return ImageTextDataset(source, tokenizer, config.max_text_len, seed)


collate_fn = collate_image_text


def embed_image_arrays(model: DualEncoder, images: list) -> Tensor:
    return model.embed_images(image_batch(images, model.logit_scale.device))  # (n, E)


def embed_text_strings(model: DualEncoder, tokenizer, config: Config, texts: list[str]) -> Tensor:
    return model.embed_texts(tokenizer.encode_batch(texts, config.max_text_len).to(
        model.logit_scale.device))  # (n, E)


def retrieval_scores(model: DualEncoder, tokenizer, config: Config, examples: list[dict],
                     world_config=None, texts: list[str] | None = None) -> Tensor:
    texts = [ex["captions"][0] for ex in examples] if texts is None else texts
    return (embed_image_arrays(model, [ex["image"] for ex in examples])
            @ embed_text_strings(model, tokenizer, config, texts).T)  # (n, G)


image_features = embed_image_arrays


@in_eval_mode
def evaluate(model: DualEncoder, tokenizer, config: Config, world_config, split: str,
             n: int) -> dict:
    examples = world_examples(world_config, split, n, regions=False)
    scores = retrieval_scores(model, tokenizer, config, examples)  # (n, n): caption 0 each
    metrics = recall_at_k(scores, torch.arange(len(examples)))
    return {**metrics, "r1_mean": (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2}


def sample_captions(model, tokenizer, config, world_config, split, n) -> list:
    return []  # a dual encoder writes no captions
