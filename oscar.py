"""Oscar: Object-Semantics Aligned Pre-training for Vision-Language Tasks, from primitives.

    Xiujun Li, Xi Yin, Chunyuan Li, Pengchuan Zhang, Xiaowei Hu, Lei Zhang, Lijuan Wang,
    Houdong Hu, Li Dong, Furu Wei, Yejin Choi, Jianfeng Gao. ECCV 2020; arXiv 2004.06165.

Oscar's one idea: the object tags a detector writes for an image ("dog", "couch") are words, and
the caption mentions the same objects, so putting the tags between the caption and the regions
gives self-attention an anchor to align words with regions [Oscar abstract, §Method]. Each
training example is a Word-Tag-Image triple (w, q, v):

    [CLS] w_1 .. w_T [SEP]   q_1 .. q_K [SEP]    v_1 .. v_N
     segment 0 ----------+   segment 1 ----+     regions: Linear([feature ; 6-d box]), no
     word + position + segment embeddings  |     position or segment embedding [code]
                         +-----------------+---------------+
                         one BERT encoder over the three (bidirectional)
                          |                        |
           masked token loss on words and tags     contrastive loss on [CLS]: are these
           (the "language" view h = [w, q])        the image's own tags? (the "image" view
                                                   h' = [q, v], tags polluted half the time)

    L_pre-training = L_MTL + L_C          [Oscar §Pre-training; code: unweighted sum]

Paper map (part of the paper -> code):
    §Method: Word-Tag-Image triple, the input   text_pair, region_vectors, Oscar.encode
    §Pre-training: masked token loss L_MTL      mask_tokens, masked_token_loss, forward_pretrain
    §Pre-training: contrastive loss L_C         OscarDataset (polluted tags), contrastive_loss
    §Pre-training: L_MTL + L_C                  Oscar.forward_pretrain
    §Adapting: image captioning                 caption_attention_mask, caption_masked_count,
                                                caption_mask_positions, Oscar.forward_caption,
                                                Oscar.context_states, Oscar.caption_logits, caption
    §Adapting: image-text retrieval             Oscar.forward_retrieval, retrieval_scores
    §Adapting: VQA                              Oscar.forward_vqa, vqa_loss
    the ablation without tags                   Config.use_tags = False

Citations name the paper's parts ([Oscar §Method], [Oscar §Pre-training], [Oscar §Adapting]),
not section or equation numbers: the copies of the paper the search tool holds show only the
title, authors and abstract, so no number could be checked. [code] = the official code
(microsoft/Oscar 266075f, the Oscar+/VinVL code base), read for ../shared/specs/uniter_oscar.md
Part B; where this file says what the code does, that spec is the source.

Left out, and why: the 6.5M-pair corpus and the Faster R-CNN (the synthetic world's regions and
detector tags of shared/world.py instead); the BERT-base initialisation (no download here; issue
7); SCST / CIDEr optimisation of captions; NLVR2 and GQA heads; Oscar+'s 3-way contrastive loss.

Shapes: B batch, T text tokens (words and tags), C caption slot, K context (tags + regions),
N regions, D width, F region-feature size (+ 6 box numbers), V vocabulary, A answers.
Masks over tokens or regions: True = real (not padding). Attention masks: True = may attend.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from shared.config import encoder_problems, optimisation_problems
from shared.data import (feature_statistics, flat_targets, model_device, pad_rows,
                         pad_sequences, region_statistics)
from shared.decoding import beam_search, cached_step_fn, greedy
from shared.losses import vqa_loss  # UNITER and Oscar share it
from shared.masks import causal_mask
from shared.metrics import (bleu, cider_d, predict_answers, recall_at_k, truth_rate,
                            vqa_accuracy_by_type)
from shared.transformer import (BertEmbeddings, BertPooler, HeadTransform, PostLNEncoderBlock,
                                init_bert_weights)
from shared.world import ANSWERS, World, is_true, question_type

PAD_ID = 0  # [PAD] of shared.tokenizer
IGNORE = -100  # the label of a token that is not predicted (PyTorch's ignore_index)
BOX_DIM = 6  # the box numbers appended to a region feature: x1, y1, x2, y2, w, h  [code]
TASKS = ("pretrain", "caption", "retrieval", "vqa")  # train.py --task
# what train.py keeps best.pt by, per task
MAIN_METRIC = {"pretrain": "r1_mean", "caption": "cider", "retrieval": "r1_mean",
               "vqa": "vqa_acc"}


# --- 1. Config ------------------------------------------------------------------------------------

@dataclass
class Config:
    """Defaults = Oscar-B [Oscar §Implementation; code]. [paper] / [code] mark the source."""
    # the encoder: BERT-base [paper]
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1  # [code]; the VQA script raises it to 0.3 for the whole model
    init_std: float = 0.02  # BERT's N(0, 0.02); [code] starts from BERT-base weights
    vocab_size: int = 30522  # bert-base-uncased [code]
    # the input [Oscar §Method; code]
    max_text_len: int = 35  # [CLS] caption [SEP] tags [SEP], pre-training [code]
    max_caption_len: int = 40  # captioning: the caption slot, [CLS] .. [SEP] [code]
    max_tag_len: int = 30  # captioning: the tag slot, tags .. [SEP] (70 - 40) [code]
    n_regions: int = 50  # [code]: the first 50 rows, in stored order
    feature_dim: int = 2048  # the detector's pooled feature; the input is F + 6 = 2054 [code]
    region_layer_norm: bool = True  # [code] use_img_layernorm (1 in the VinVL command)
    standardise_features: bool = False  # OURS: (f - mean) / std per dimension, see
    #                                     shared.data.feature_statistics; [code]: raw f
    use_tags: bool = True  # False: the paper's ablation, no tags anywhere
    # pre-training [Oscar §Pre-training; code]
    mask_prob: float = 0.15  # of caption and tag word-pieces, 80/10/10
    pollute_prob: float = 0.5  # P(the tags are replaced by another image's)
    pollute_with_captions: bool = False  # [code] quirk: half the "polluted tags" are another
    #                                      image's caption (textb_sample_mode 0); see below
    # captioning fine-tuning and inference [code run_captioning.py]
    caption_mask_prob: float = 0.15
    max_caption_masked: int = 3
    max_gen_len: int = 20
    beam_size: int = 5  # 1 = greedy
    length_penalty: float = 1.0  # score = Σ log p / len
    # downstream
    task: str = "pretrain"  # one of TASKS; train.py sets it from --task
    eval_pairs: int = 1000  # retrieval among this many (image, caption) pairs: COCO 1K
    image_size: int = 224  # OURS: the world's render size (Oscar itself sees only regions)
    # optimisation [paper: Oscar-B batch 768, lr 5e-5, >= 1M steps; code: AdamW, linear decay]
    batch_size: int = 768
    lr: float = 5e-5
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_steps: int = 0  # [code] VinVL command: warmup 0
    max_steps: int = 1_000_000
    lr_schedule: str = "linear"
    grad_clip: float = 10.0  # [code] VinVL command: max_grad_norm 10
    grad_accum_steps: int = 1
    train_single_object_prob: float = 0.0  # OURS: the world's train mix; 0 = uniform 1-4 objects

    def __post_init__(self):
        problems = encoder_problems(self, TASKS)
        if self.n_regions < 1:
            problems.append(f"n_regions must be >= 1, not {self.n_regions}")
        if self.max_text_len < 5:
            problems.append(f"max_text_len must be >= 5 ([CLS] w [SEP] q [SEP]), "
                            f"not {self.max_text_len}")
        if self.max_gen_len < 1 or self.max_caption_len < self.max_gen_len + 2:
            problems.append(f"need max_gen_len >= 1 and max_caption_len >= max_gen_len + 2 "
                            f"([CLS], the words, the [MASK] being read), got "
                            f"{self.max_caption_len} and {self.max_gen_len}")
        if self.max_tag_len < 1:
            problems.append(f"max_tag_len must be >= 1 (the tags' [SEP]), not {self.max_tag_len}")
        for name in ("mask_prob", "caption_mask_prob"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name} must be in (0, 1), not {getattr(self, name)}")
        if not 0 <= self.pollute_prob <= 1:
            problems.append(f"pollute_prob must be a probability, not {self.pollute_prob}")
        if self.max_caption_masked < 1 or self.beam_size < 1 or self.length_penalty < 0:
            problems.append(f"need max_caption_masked >= 1, beam_size >= 1 and length_penalty "
                            f">= 0, got {self.max_caption_masked}, {self.beam_size}, "
                            f"{self.length_penalty}")
        problems += optimisation_problems(self)
        if self.batch_size < 2 and self.task in ("pretrain", "retrieval"):
            problems.append("pre-training and retrieval draw negatives from other examples: "
                            "batch_size must be >= 2")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def max_positions(self) -> int:
        """Learned positions: pre-training uses 0 .. max_text_len - 1; captioning puts the tags
        after the whole caption slot, at max_caption_len .. + max_tag_len - 1 [code]."""
        return max(self.max_text_len, self.max_caption_len + self.max_tag_len)

    @classmethod
    def paper(cls) -> "Config":
        """Oscar-B [paper; code] (the VinVL pre-training command's optimiser settings)."""
        return cls()

    @classmethod
    def small(cls) -> "Config":
        """OURS: one GPU, hours. A 6-layer, 384-wide Oscar on 36 of the world's regions."""
        return cls(hidden_size=384, layers=6, heads=6, intermediate_size=1536, vocab_size=1000,
                   max_text_len=48, max_caption_len=32, max_tag_len=38, n_regions=36,
                   feature_dim=512, image_size=128, batch_size=256, lr=1e-4, warmup_steps=1000,
                   max_steps=50_000, grad_clip=1.0, max_gen_len=24,
                   train_single_object_prob=0.5, standardise_features=True)

    @classmethod
    def tiny(cls) -> "Config":
        """OURS: 2 CPU cores, minutes. The world's default regions (10 an image, 64-d features,
        standardised) and a 4-layer, 128-wide encoder (2 heads of 64), no dropout (the world
        never repeats an example), init_std 0.1: the settings UNITER's tiny preset needed
        before its cross-modal loss left chance (see uniter.Config.tiny)."""
        return cls(hidden_size=128, layers=4, heads=2, intermediate_size=512, dropout=0.0,
                   init_std=0.1, vocab_size=1000, max_text_len=36, max_caption_len=24,
                   max_tag_len=12, n_regions=10, feature_dim=64, image_size=64, batch_size=64,
                   lr=5e-4, warmup_steps=100, max_steps=3000, grad_clip=1.0, max_gen_len=20,
                   eval_pairs=100, train_single_object_prob=0.5, standardise_features=True)


# --- 2. The input: Word-Tag-Image triples [Oscar §Method] ----------------------------------------

def truncate_pair(a: list[int], b: list[int], max_pieces: int) -> tuple[list[int], list[int]]:
    """Cut two word-piece lists to max_pieces in all, one piece at a time from the end of the
    longer one (the caption on ties) [code: _truncate_seq_pair]."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_pieces:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def text_pair(caption: list[int], tags: list[int] | None, max_len: int, cls_id: int,
              sep_id: int) -> tuple[list[int], list[int]]:
    """[CLS] caption [SEP] tags [SEP] and its segment ids (0 for [CLS], the caption and its
    [SEP]; 1 for the tags and the last [SEP]) [code]; tags None (use_tags False): [CLS] caption
    [SEP] only. caption and tags are word-pieces without specials; the longer is truncated.

    Worked example: caption [7, 8, 9], tags [5, 6], max_len 7 -> 5 pieces fit next to the 3
    specials; the caption (longer) loses 9 -> tokens [CLS 7 8 SEP 5 6 SEP], segments
    [0 0 0 0 1 1 1]."""
    if tags is None:
        caption = caption[:max_len - 2]
        return [cls_id, *caption, sep_id], [0] * (len(caption) + 2)
    caption, tags = truncate_pair(caption, tags, max_len - 3)
    tokens = [cls_id, *caption, sep_id, *tags, sep_id]
    return tokens, [0] * (len(caption) + 2) + [1] * (len(tags) + 1)


def region_vectors(features: Tensor, boxes: Tensor) -> Tensor:
    """The region input of Oscar [code]: [feature ; x1, y1, x2, y2, w, h], the box as fractions
    of the image side (UNITER adds w·h and embeds the box separately; Oscar appends it).
    features (N, F), boxes (N, 4) -> (N, F + 6)."""
    w = boxes[:, 2:3] - boxes[:, 0:1]  # (N, 1)
    h = boxes[:, 3:4] - boxes[:, 1:2]  # (N, 1)
    return torch.cat([features, boxes, w, h], dim=1)  # (N, F + 6)


# --- 3. Masking -----------------------------------------------------------------------------------

def mask_tokens(tokens: list[int], maskable: list[bool], rng: np.random.Generator,
                mask_prob: float, mask_id: int, vocab_size: int) -> tuple[list[int], list[int]]:
    """The masked token loss's corruption [Oscar §Pre-training; code random_word]: each maskable
    piece (caption and tag word-pieces, never [CLS]/[SEP]) is chosen with mask_prob; a chosen
    one becomes [MASK] (80 %), a random id of the WHOLE vocabulary (10 %, specials included, as
    [code]) or stays (10 %). Unlike UNITER there is no at-least-one rule: an item can have no
    label. Returns (input ids, labels with IGNORE where nothing is predicted)."""
    out, labels = list(tokens), [IGNORE] * len(tokens)
    for i, ok in enumerate(maskable):
        if ok and rng.random() < mask_prob:
            labels[i] = tokens[i]
            u = rng.random()
            if u < 0.8:
                out[i] = mask_id
            elif u < 0.9:
                out[i] = int(rng.integers(vocab_size))
    return out, labels


def caption_masked_count(length: int, mask_prob: float = 0.15, max_masked: int = 3) -> int:
    """How many positions of a caption captioning fine-tuning masks [code]:

        min(max(round(mask_prob · length), 1), max_masked)

    `length` counts [CLS] and [SEP] (the caption slot's real tokens). Python's round, as [code]
    (halves go to the even neighbour: round(2.5) = 2). E.g. length 12 -> round(1.8) = 2."""
    return min(max(round(mask_prob * length), 1), max_masked)


def caption_mask_positions(length: int, rng: np.random.Generator, mask_prob: float = 0.15,
                           max_masked: int = 3) -> np.ndarray:
    """The masked positions of a caption of `length` tokens [CLS] w_1 .. w_n [SEP]: drawn
    without replacement from 1 .. length - 1, so [CLS] (position 0) never is and the final
    [SEP] can be: predicting [SEP] is how the model learns to stop [code]. Sorted."""
    count = caption_masked_count(length, mask_prob, max_masked)
    return np.sort(rng.choice(np.arange(1, length), size=min(count, length - 1), replace=False))


def caption_attention_mask(caption_real: Tensor, context_real: Tensor) -> Tensor:
    """The seq2seq self-attention mask of captioning [Oscar §Adapting; code]. The sequence is
    [caption slot (C) ; context (K) = tags and regions]; rows are queries, columns keys:

                        keys:  caption     tags + regions
                             c0 c1 c2 c3   q1 q2 v1 v2 v3
        queries  caption c0 [ 1  .  .  . |  1  1  1  1  1 ]   causal: c_i sees c_0 .. c_i
                         c1 [ 1  1  .  . |  1  1  1  1  1 ]   and the whole context
                         c2 [ 1  1  1  . |  1  1  1  1  1 ]
                         c3 [ 1  1  1  1 |  1  1  1  1  1 ]
                 context q1 [ .  .  .  . |  1  1  1  1  1 ]   the context never sees the
                         .. [ .  .  .  . |  1  1  1  1  1 ]   caption: no later word can
                         v3 [ .  .  .  . |  1  1  1  1  1 ]   leak back through it

    Padding (caption_real / context_real False) is neither a key nor a live query: its row is
    empty, which the attention turns into a zero output, never read.

    caption_real (B, C) bool, context_real (B, K) bool. Returns (B, C + K, C + K) bool."""
    B, C = caption_real.shape
    K = context_real.shape[1]
    causal = causal_mask(C, device=caption_real.device)  # (C, C)
    top = torch.cat([causal[None] & caption_real[:, None, :],
                     context_real[:, None, :].expand(B, C, K)], dim=2)  # (B, C, C + K)
    bottom = torch.cat([torch.zeros(B, K, C, dtype=torch.bool, device=caption_real.device),
                        context_real[:, None, :].expand(B, K, K)], dim=2)  # (B, K, C + K)
    real = torch.cat([caption_real, context_real], dim=1)  # (B, C + K)
    return torch.cat([top, bottom], dim=1) & real[:, :, None]  # (B, C + K, C + K)


# --- 4. Objectives: pure functions ----------------------------------------------------------------

def masked_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_MTL = -E log p(h_i | h_\\i, v) [Oscar §Pre-training]: cross-entropy of the masked
    tokens h_i (words or tags) given the other tokens and the regions, averaged over the
    masked tokens. logits (M, V) at the masked positions, labels (M,) (IGNORE = skip); 0 when
    nothing is masked. Captioning fine-tuning uses it on the masked caption positions [code,
    label smoothing 0 in the Oscar recipe]."""
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def contrastive_loss(logits: Tensor, polluted: Tensor) -> Tensor:
    """L_C = -E log p(y | f(h')) [Oscar §Pre-training]: a 2-way classifier f on the pooled
    [CLS] says whether the triple is polluted (y = 1: the tags were replaced by another image's)
    or not (y = 0), cross-entropy averaged over the batch. logits (B, 2), polluted (B,) bool."""
    return F.cross_entropy(logits.float(), polluted.long().to(logits.device))


# --- 5. The model ---------------------------------------------------------------------------------

class Oscar(nn.Module):
    """One BERT encoder over [words ; tags ; regions] with the heads of config.task:
    pretrain = MLM head (tied to the word embeddings) + contrastive head on the pooled [CLS];
    caption = the MLM head, read at masked caption positions; retrieval = a 2-way head on the
    pooled [CLS]; vqa = a linear answer head on it [code]. Parameter names follow [code]'s
    where it helps loading: region_embedding = img_embedding, contrastive_head =
    cls.seq_relationship."""

    def __init__(self, config: Config):
        super().__init__()
        c, D = config, config.hidden_size
        self.config = c
        self.text_embeddings = BertEmbeddings(c.vocab_size, D, max_positions=c.max_positions,
                                              n_token_types=2, dropout=c.dropout, pad_id=PAD_ID)
        self.region_embedding = nn.Linear(c.feature_dim + BOX_DIM, D)  # (F + 6) -> D
        self.region_norm = nn.LayerNorm(D, eps=1e-12) if c.region_layer_norm else nn.Identity()
        self.region_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(PostLNEncoderBlock(D, c.heads, c.intermediate_size,
                                                       c.dropout) for _ in range(c.layers))
        self.pooler = BertPooler(D)
        if c.task in ("pretrain", "caption"):
            self.mlm_transform = HeadTransform(D)  # output: the word embeddings, tied
            self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))
        if c.task == "pretrain":
            self.contrastive_head = nn.Linear(D, 2)  # column 1 = "polluted"
        if c.task == "retrieval":
            self.retrieval_head = nn.Linear(D, 2)  # column 1 = "match" [code]
        if c.task == "vqa":
            self.vqa_dropout = nn.Dropout(c.dropout)
            self.vqa_head = nn.Linear(D, len(ANSWERS))
        self.apply(lambda module: init_bert_weights(module, c.init_std))

    # -- the encoder ---------------------------------------------------------------------------

    def embed(self, tokens: Tensor, segments: Tensor, positions: Tensor, regions: Tensor
              ) -> Tensor:
        """tokens, segments, positions (B, T); regions (B, N, F + 6). Returns the input
        sequence (B, T + N, D): text embeddings, then region embeddings."""
        text = self.text_embeddings(tokens, segments, positions)  # (B, T, D)
        image = self.region_dropout(self.region_norm(self.region_embedding(regions)))  # (B, N, D)
        return torch.cat([text, image], dim=1)  # (B, T + N, D)

    def encode(self, tokens: Tensor, segments: Tensor, positions: Tensor, regions: Tensor,
               region_mask: Tensor, allowed: Tensor | None = None) -> Tensor:
        """The final hidden states (B, T + N, D). allowed: (B, T + N, T + N) (captioning) or
        None = every token sees every real token (pre-training, retrieval, VQA)."""
        x = self.embed(tokens, segments, positions, regions)  # (B, T + N, D)
        if allowed is None:
            allowed = torch.cat([tokens != PAD_ID, region_mask], dim=1)[:, None, :]  # (B, 1, S)
        for layer in self.layers:
            x = layer(x, allowed)  # (B, T + N, D)
        return x

    def _encode_batch(self, batch: dict, allowed: Tensor | None = None) -> Tensor:
        return self.encode(batch["tokens"], batch["segments"], batch["positions"],
                           batch["regions"], batch["region_mask"], allowed)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """(M, D) -> (M, V): the MLM head, its output layer the word embeddings (tied)."""
        return F.linear(self.mlm_transform(hidden), self.text_embeddings.word.weight,
                        self.mlm_bias)

    def forward(self, batch: dict) -> dict:
        """One batch of config.task -> {"loss": scalar, <term>: scalar, ...}."""
        task = self.config.task
        if task == "pretrain":
            return self.forward_pretrain(batch)
        if task == "caption":
            return self.forward_caption(batch)
        if task == "retrieval":
            return self.forward_retrieval(batch)
        return self.forward_vqa(batch)

    def forward_pretrain(self, batch: dict) -> dict:
        """L_MTL + L_C [Oscar §Pre-training]. The masked tokens are gathered by the collate's
        flat positions (no data-dependent shape, no host-device sync)."""
        h = self._encode_batch(batch)  # (B, T + N, D)
        T = batch["tokens"].shape[1]
        hidden = h[:, :T].flatten(0, 1).index_select(0, batch["mlm_positions"])  # (M, D)
        loss_mtl = masked_token_loss(self.mlm_logits(hidden), batch["mlm_targets"])
        loss_c = contrastive_loss(self.contrastive_head(self.pooler(h)), batch["polluted"])
        return {"loss": loss_mtl + loss_c, "mtl": loss_mtl, "contrastive": loss_c}

    def forward_caption(self, batch: dict) -> dict:
        """Captioning fine-tuning [Oscar §Adapting; code]: the masked caption positions under
        the seq2seq mask; batch["tokens"] = [caption slot (C) ; tag slot]."""
        C = batch["caption_len"]
        tokens = batch["tokens"]
        allowed = caption_attention_mask(tokens[:, :C] != PAD_ID,
                                         torch.cat([tokens[:, C:] != PAD_ID,
                                                    batch["region_mask"]], dim=1))
        h = self._encode_batch(batch, allowed)  # (B, S, D)
        hidden = h[:, :C].flatten(0, 1).index_select(0, batch["mlm_positions"])  # (M, D)
        loss = masked_token_loss(self.mlm_logits(hidden), batch["mlm_targets"])
        return {"loss": loss, "caption": loss}

    def match_logits(self, tokens: Tensor, segments: Tensor, positions: Tensor,
                     regions: Tensor, region_mask: Tensor) -> Tensor:
        """The retrieval score of each row: logit(match) - logit(no match), monotone in [code]'s
        softmax probability. With the pre-training heads (zero-shot), the contrastive head's
        logit(not polluted) - logit(polluted). (B,)"""
        pooled = self.pooler(self.encode(tokens, segments, positions, regions, region_mask))
        if self.config.task == "retrieval":
            logits = self.retrieval_head(pooled)  # (B, 2)
            return logits[:, 1] - logits[:, 0]
        logits = self.contrastive_head(pooled)  # (B, 2)
        return logits[:, 0] - logits[:, 1]

    def forward_retrieval(self, batch: dict) -> dict:
        """[code run_retrieval.py]: 2-way cross-entropy on the pooled [CLS]; the batch holds
        positives and negatives 1:1 (OscarDataset)."""
        logits = self.retrieval_head(self.pooler(self._encode_batch(batch)))  # (B, 2)
        loss = F.cross_entropy(logits.float(), batch["is_match"].long())
        return {"loss": loss, "retrieval": loss}

    def answer_logits(self, tokens: Tensor, segments: Tensor, positions: Tensor,
                      regions: Tensor, region_mask: Tensor) -> Tensor:
        """(B, A) logits over ANSWERS from the pooled [CLS] of [question ; tags ; regions]."""
        pooled = self.pooler(self.encode(tokens, segments, positions, regions, region_mask))
        return self.vqa_head(self.vqa_dropout(pooled))  # (B, A)

    def forward_vqa(self, batch: dict) -> dict:
        logits = self.answer_logits(batch["tokens"], batch["segments"], batch["positions"],
                                    batch["regions"], batch["region_mask"])  # (B, A)
        loss = vqa_loss(logits, batch["answer_scores"])
        return {"loss": loss, "vqa": loss}

    # -- captioning inference: [CLS] w_1 .. w_t [MASK], read at [MASK] -----------------------------

    def context_states(self, tags: Tensor, tag_positions: Tensor, regions: Tensor,
                       region_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        """The tags and regions, run once per image. Under the caption mask they never attend to
        the caption, so their hidden states at every layer are the same at every decoding step:
        computed here once, each step then runs only the caption rows against them (the cache
        [code] builds with history_state, for the part of the sequence that never changes).

        tags (B, L) (segment 1, positions tag_positions (L,)), regions (B, N, F + 6).
        Returns (the input of each layer for the K = L + N context rows, [(B, K, D)] * layers;
        context_real (B, K))."""
        B, L = tags.shape
        text = self.text_embeddings(tags, torch.ones_like(tags), tag_positions)  # (B, L, D)
        image = self.region_dropout(self.region_norm(self.region_embedding(regions)))  # (B, N, D)
        x = torch.cat([text, image], dim=1)  # (B, K, D)
        real = torch.cat([tags != PAD_ID, region_mask], dim=1)  # (B, K)
        states = []
        for layer in self.layers:
            states.append(x)
            x = layer(x, real[:, None, :])  # (B, K, D): the context sees only the context
        return states, real

    def caption_logits(self, caption: Tensor, states: list[Tensor], context_real: Tensor
                       ) -> Tensor:
        """The caption rows against the cached context. caption (R, t) = [CLS] w_1 .. [MASK]
        (no padding), states / context_real as context_states gives them for these R rows.
        Returns the MLM logits (R, t, V) at every caption position; decoding reads the last."""
        R, t = caption.shape
        x = self.text_embeddings(caption)  # (R, t, D), segment 0, positions 0 .. t - 1
        allowed = torch.cat([causal_mask(t, caption.device)[None].expand(R, t, t),
                             context_real[:, None, :].expand(R, t, context_real.shape[1])],
                            dim=2)  # (R, t, t + K): causal over the caption, all the context
        for layer, context in zip(self.layers, states):
            x = layer(x, allowed, context=torch.cat([x, context], dim=1))  # (R, t, D)
        return self.mlm_logits(x)  # (R, t, V)

    def caption_step(self, token: Tensor, position: int, past: list | None, context_kv: list,
                     context_real: Tensor, mask_id: int) -> tuple[Tensor, list]:
        """One decoding step with a key/value cache. token (R,) = w_{t-1}, the last word of
        [CLS] w_1 .. w_{t-1}, at position = t - 1; past: for each layer, the keys and values
        (R, H, t - 1, Dh) of caption rows 0 .. t - 2 (None when t = 1); context_kv: for each
        layer, those of the tags and regions
        (R, H, K, Dh), projected once per image. Only two rows are run: t - 1 (w_{t-1}, which
        was the [MASK] one step ago, so its states changed) and t (the new [MASK]); earlier
        rows never see a later one (causal), so their keys and values are final.
        Returns (the MLM logits at [MASK] (R, V), the next step's past: row t - 1's keys and
        values appended, [((R, H, t, Dh), (R, H, t, Dh))] * layers)."""
        R, t = len(token), position + 1
        new = torch.stack([token, torch.full_like(token, mask_id)], dim=1)  # (R, 2)
        positions = torch.arange(t - 1, t + 1, device=token.device)  # (2,)
        x = self.text_embeddings(new, positions=positions)  # (R, 2, D)
        K = context_real.shape[1]
        allowed = torch.cat([torch.ones(R, 2, t - 1, dtype=torch.bool, device=token.device),
                             causal_mask(2, token.device)[None].expand(R, 2, 2),
                             context_real[:, None, :].expand(R, 2, K)], dim=2)  # (R, 2, t+1+K)
        cache = []
        for l, layer in enumerate(self.layers):
            k_new, v_new = layer.attn.project_kv(x)  # (R, H, 2, Dh) each
            k_past, v_past = (k_new[:, :, :0], v_new[:, :, :0]) if past is None else past[l]
            cache.append((torch.cat([k_past, k_new[:, :, :1]], dim=2),
                          torch.cat([v_past, v_new[:, :, :1]], dim=2)))  # row t - 1 is final
            k_ctx, v_ctx = context_kv[l]  # (R, H, K, Dh)
            kv = (torch.cat([k_past, k_new, k_ctx], dim=2),
                  torch.cat([v_past, v_new, v_ctx], dim=2))  # (R, H, t + 1 + K, Dh)
            x = layer(x, allowed, kv=kv)  # (R, 2, D)
        return self.mlm_logits(x[:, -1]), cache  # (R, V)


def build_model(config: Config) -> Oscar:
    return Oscar(config)


# --- 6. Data: the world's examples as triples -----------------------------------------------------

def region_inputs(example: dict, config: Config, statistics: tuple | None = None) -> Tensor:
    """A world example's first n_regions regions (stored order, [code]) as (n, F + 6) region
    vectors, features standardised with statistics = (mean, std) if given."""
    if example["features"].shape[1] != config.feature_dim:
        raise ValueError(f"the regions have {example['features'].shape[1]}-d features but "
                         f"feature_dim is {config.feature_dim}")
    n = min(config.n_regions, len(example["features"]))
    features = torch.from_numpy(example["features"][:n]).float()  # (n, F)
    if statistics is not None:
        features = (features - statistics[0]) / statistics[1]
    return region_vectors(features, torch.from_numpy(example["boxes"][:n]).float())


def _other(index: int, n: int, rng: np.random.Generator) -> int:
    """A uniformly drawn example index other than `index` (another image)."""
    return (index + 1 + int(rng.integers(n - 1))) % n


class OscarDataset(Dataset):
    """Item i: world example i (modulo the world) as config.task wants it, every random choice a
    pure function of (seed, i):

        pretrain   [CLS] caption [SEP] tags [SEP] + regions; with pollute_prob the tags are
                   another image's (polluted = True); then mask_tokens over words and tags
                   (use_tags False: no tags, and the image is what gets replaced; see below)
        caption    [CLS] caption [SEP] in the caption slot, tags [SEP] in the tag slot (tag
                   positions start at max_caption_len), caption_mask_positions masked
        retrieval  a positive, or (1/2) a negative: half another caption, half another image
                   with its tags [code]
        vqa        [CLS] question [SEP] tags [SEP], the answer

    The polluted tags: the paper replaces the tag sequence "with a probability of 50 % with a
    different tag sequence randomly sampled from the dataset". [code] with the vanilla Oscar
    settings (textb_sample_mode 0) takes a random line of another image, which half the time is
    its CAPTION; pollute_with_captions = True does that, the default follows the paper.
    use_tags = False (OURS for the ablation): there is nothing to pollute, so the contrastive
    item replaces the regions by another image's, image-text matching on the same head."""

    def __init__(self, world, tokenizer, config: Config, seed: int = 0):
        self.world, self.tokenizer, self.config, self.seed = world, tokenizer, config, seed
        self.length = max(1, len(world) // config.batch_size) * config.batch_size
        self.statistics = (region_statistics(world) if config.standardise_features
                           else None)

    def __len__(self) -> int:
        return self.length

    def _pieces(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=False)

    def _tags(self, example: dict) -> list[int] | None:
        return self._pieces(" ".join(example["tags"])) if self.config.use_tags else None

    def __getitem__(self, i: int) -> dict:
        c, world, tok = self.config, self.world, self.tokenizer
        index = i % len(world)
        rng = np.random.default_rng([self.seed, 17, i])
        example = world.example(index)
        item = {"regions": region_inputs(example, c, self.statistics)}
        text = example["captions"][rng.integers(len(example["captions"]))]
        if c.task == "vqa":
            text, answer = example["questions"][rng.integers(len(example["questions"]))]
            item["answer"] = ANSWERS.index(answer)
        tags = self._tags(example)
        if c.task == "pretrain":
            item["polluted"] = bool(rng.random() < c.pollute_prob)
            item["source"] = index  # the example the tags (or regions) come from
            if item["polluted"]:
                item["source"] = _other(index, len(world), rng)
                donor = world.example(item["source"])
                if not c.use_tags:
                    item["regions"] = region_inputs(donor, c, self.statistics)
                elif c.pollute_with_captions and rng.random() < 0.5:
                    tags = self._pieces(donor["captions"][rng.integers(len(donor["captions"]))])
                else:
                    tags = self._tags(donor)
        if c.task == "retrieval":
            item["is_match"] = bool(rng.random() >= 0.5)
            if not item["is_match"]:
                donor = world.example(_other(index, len(world), rng))
                if rng.random() < 0.5:  # another caption, the image and its tags kept
                    text = donor["captions"][rng.integers(len(donor["captions"]))]
                else:  # another image, with its own tags
                    item["regions"] = region_inputs(donor, c, self.statistics)
                    tags = self._tags(donor)
        if c.task == "caption":
            return self._caption_item(item, text, tags, rng)
        tokens, segments = text_pair(self._pieces(text), tags, c.max_text_len, tok.cls_id,
                                     tok.sep_id)
        if c.task == "pretrain":
            maskable = [t not in (tok.cls_id, tok.sep_id) for t in tokens]
            tokens, labels = mask_tokens(tokens, maskable, rng, c.mask_prob, tok.mask_id,
                                         tok.vocab_size)
            item["mlm_labels"] = torch.tensor(labels)
        item["tokens"], item["segments"] = torch.tensor(tokens), torch.tensor(segments)
        item["positions"] = torch.arange(len(tokens))
        return item

    def _caption_item(self, item: dict, text: str, tags: list[int] | None,
                      rng: np.random.Generator) -> dict:
        c, tok = self.config, self.tokenizer
        caption = [tok.cls_id, *self._pieces(text)[:c.max_caption_len - 2], tok.sep_id]
        labels = [IGNORE] * len(caption)
        for p in caption_mask_positions(len(caption), rng, c.caption_mask_prob,
                                        c.max_caption_masked):
            labels[p] = caption[p]
            u = rng.random()
            if u < 0.8:
                caption[p] = tok.mask_id
            elif u < 0.9:
                caption[p] = int(rng.integers(tok.vocab_size))
        item["caption"], item["mlm_labels"] = torch.tensor(caption), torch.tensor(labels)
        tag_ids = [] if tags is None else [*tags[:c.max_tag_len - 1], tok.sep_id]
        item["tags"] = torch.tensor(tag_ids, dtype=torch.long)
        item["tag_offset"] = c.max_caption_len  # the tags' first position id [code]
        return item


def train_dataset(world, tokenizer, config: Config) -> OscarDataset:
    return OscarDataset(world, tokenizer, config)


def collate_fn(items: list[dict]) -> dict:
    """Items -> a padded batch: regions (B, N, F + 6) zero-padded, region_mask (B, N), and

        pretrain, retrieval, vqa   tokens, segments, positions (B, T) (PAD / 0 padded)
        caption    tokens = [caption slot (C) ; tag slot (L)], caption_len = C (an int),
                   tag positions start at the items' tag_offset (the max_caption_len)
        pretrain, caption   mlm_positions (M,) into the flat B·T (B·C) text, mlm_targets (M,)
        pretrain: polluted (B,); retrieval: is_match (B,); vqa: answer (B,), answer_scores (B, A)

    The masked positions are found here, on the CPU, so the step never syncs."""
    regions = pad_rows([it["regions"] for it in items])  # (B, N, F + 6)
    batch = {"regions": regions,
             "region_mask": pad_rows([torch.ones(len(it["regions"]), dtype=torch.bool)
                                      for it in items])}  # (B, N)
    if "caption" in items[0]:
        caption = pad_sequences([it["caption"] for it in items])  # (B, C)
        tags = pad_sequences([it["tags"] for it in items])  # (B, L), L = 0 without tags
        (B, C), L = caption.shape, tags.shape[1]
        batch["tokens"] = torch.cat([caption, tags], dim=1)  # (B, C + L)
        batch["segments"] = torch.cat([torch.zeros_like(caption), torch.ones_like(tags)], 1)
        positions = torch.cat([torch.arange(C), items[0]["tag_offset"] + torch.arange(L)])
        batch["positions"] = positions.expand(B, C + L)  # (B, C + L)
        batch["caption_len"] = C
        labels = torch.full((B, C), IGNORE)
        for b, it in enumerate(items):
            labels[b, :len(it["mlm_labels"])] = it["mlm_labels"]
        batch["mlm_positions"], batch["mlm_targets"] = flat_targets(labels)
        return batch
    batch["tokens"] = pad_sequences([it["tokens"] for it in items])  # (B, T)
    batch["segments"] = pad_sequences([it["segments"] for it in items])
    batch["positions"] = pad_sequences([it["positions"] for it in items])
    if "mlm_labels" in items[0]:
        labels = torch.full(batch["tokens"].shape, IGNORE)
        for b, it in enumerate(items):
            labels[b, :len(it["mlm_labels"])] = it["mlm_labels"]
        batch["mlm_positions"], batch["mlm_targets"] = flat_targets(labels)
    if "polluted" in items[0]:
        batch["polluted"] = torch.tensor([it["polluted"] for it in items])
    if "is_match" in items[0]:
        batch["is_match"] = torch.tensor([it["is_match"] for it in items])
    if "answer" in items[0]:
        batch["answer"] = torch.tensor([it["answer"] for it in items])
        batch["answer_scores"] = F.one_hot(batch["answer"], len(ANSWERS)).float()
    return batch


# --- 7. Downstream evaluation on the world: train.py's contract -----------------------------------

def _tag_text(example: dict, config: Config) -> str | None:
    return " ".join(example["tags"]) if config.use_tags else None


def text_batch(tokenizer, config: Config, texts: list[str], tags: list[str | None]) -> tuple:
    """(tokens, segments, positions), each (B, T), of [CLS] text [SEP] tags [SEP] pairs."""
    rows = [text_pair(tokenizer.encode(t, add_special=False),
                      None if q is None else tokenizer.encode(q, add_special=False),
                      config.max_text_len, tokenizer.cls_id, tokenizer.sep_id)
            for t, q in zip(texts, tags)]
    tokens = pad_sequences([torch.tensor(r[0]) for r in rows])  # (B, T)
    segments = pad_sequences([torch.tensor(r[1]) for r in rows])  # (B, T)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)  # (B, T)
    return tokens, segments, positions


def _regions(examples: list[dict], config: Config, world_config, device) -> tuple:
    statistics = feature_statistics(world_config) if config.standardise_features else None
    rows = [region_inputs(ex, config, statistics) for ex in examples]
    mask = pad_rows([torch.ones(len(r), dtype=torch.bool) for r in rows])
    return pad_rows(rows).to(device), mask.to(device)  # (n, N, F + 6), (n, N)


def retrieval_scores(model: Oscar, tokenizer, config: Config, examples: list[dict],
                     world_config, chunk: int = 1024) -> Tensor:
    """(n images, n captions) scores of every pair of n examples' images (with their own tags)
    and first captions: n² forward passes, as [code]'s cross-image evaluation."""
    device, n = model_device(model), len(examples)
    regions, region_mask = _regions(examples, config, world_config, device)
    image, text = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)  # image-major
    scores = []
    for s in range(0, n * n, chunk):
        i, t = image[s:s + chunk].tolist(), text[s:s + chunk].tolist()
        tokens, segments, positions = text_batch(
            tokenizer, config, [examples[k]["captions"][0] for k in t],
            [_tag_text(examples[k], config) for k in i])
        scores.append(model.match_logits(tokens.to(device), segments.to(device),
                                         positions.to(device), regions[i], region_mask[i]))
    return torch.cat(scores).view(n, n).float().cpu()  # (n images, n texts)


def caption_step_fn(model: Oscar, tokenizer, states: list[Tensor], real: Tensor,
                    cached: bool = True):
    """The step function of shared.decoding for captioning: (tokens (R, t), rows (R,)) ->
    log-probs (R, V) of the next word, read at an appended [MASK]. cached: keys and values are
    kept, those of the tags and regions projected once and those of the caption rows as they
    become final (Oscar.caption_step: two rows run a step); else every step runs all t + 1
    caption rows (Oscar.caption_logits). Both read the tags and regions from `states`
    (Oscar.context_states), and give the same numbers (tests/test_oscar.py)."""
    if cached:
        context_kv = [layer.attn.project_kv(x) for layer, x in zip(model.layers, states)]
        return cached_step_fn(lambda token, position, past, kv, rows: model.caption_step(
            token, position, past, kv, real[rows], tokenizer.mask_id), context_kv)

    def step(tokens: Tensor, rows: Tensor) -> Tensor:  # (R, t) -> (R, V) log-probs
        mask = torch.full((len(tokens), 1), tokenizer.mask_id, dtype=torch.long,
                          device=tokens.device)
        query = torch.cat([tokens, mask], dim=1)  # (R, t + 1)
        logits = model.caption_logits(query, [s[rows] for s in states], real[rows])
        return logits[:, -1].float().log_softmax(dim=-1)  # read at [MASK]
    return step


def caption(model: Oscar, tokenizer, config: Config, examples: list[dict], world_config,
            beam_size: int | None = None, cached: bool = True) -> list[str]:
    """Captions for the examples' images [Oscar §Adapting; code]: start from [CLS], append
    [MASK], read the next word at [MASK], append it, repeat to [SEP] or max_gen_len words;
    beam search (beam_size, Σ log p / len^length_penalty) or greedy (beam_size 1). The tags and
    regions are run once per image (Oscar.context_states); with `cached`, each step runs two
    caption rows (Oscar.caption_step), else all of them (Oscar.caption_logits)."""
    device = model_device(model)
    beam_size = config.beam_size if beam_size is None else beam_size
    regions, region_mask = _regions(examples, config, world_config, device)
    tag_rows = [torch.tensor([*tokenizer.encode(" ".join(ex["tags"]), add_special=False)
                              [:config.max_tag_len - 1], tokenizer.sep_id])
                if config.use_tags else torch.zeros(0, dtype=torch.long) for ex in examples]
    tags = pad_sequences(tag_rows).to(device)  # (B, L)
    tag_positions = config.max_caption_len + torch.arange(tags.shape[1], device=device)
    states, real = model.context_states(tags, tag_positions, regions, region_mask)
    step = caption_step_fn(model, tokenizer, states, real, cached)
    prefix = torch.full((len(examples), 1), tokenizer.cls_id, dtype=torch.long, device=device)
    if beam_size == 1:
        out, _ = greedy(step, prefix, 1 + config.max_gen_len, tokenizer.sep_id, PAD_ID)
    else:
        out, _ = beam_search(step, prefix, 1 + config.max_gen_len, tokenizer.sep_id, beam_size,
                             config.length_penalty, pad_id=PAD_ID)
    return [text.lower() for text in tokenizer.decode_batch(out.cpu())]


def vqa_predictions(model: Oscar, tokenizer, config: Config, examples: list[dict],
                    world_config, chunk: int = 256) -> tuple[list, list]:
    """(predicted answers, (question, answer, image) triples) for every question."""
    device = model_device(model)
    regions, region_mask = _regions(examples, config, world_config, device)

    def answer_logits(questions: list[str], images: list[int]) -> Tensor:
        tokens, segments, positions = text_batch(tokenizer, config, questions,
                                                 [_tag_text(examples[k], config) for k in images])
        return model.answer_logits(tokens.to(device), segments.to(device), positions.to(device),
                                   regions[images], region_mask[images])  # (b, A)
    return predict_answers(examples, answer_logits, ANSWERS, chunk)


def pretraining_accuracy(model: Oscar, tokenizer, config: Config, world, n: int,
                         chunk: int = 256) -> dict[str, float]:
    """The two pre-training tasks on n items of a world split, built as in training (seeded):
    mtl_acc = the share of masked tokens predicted right, contrastive_acc = the share of items
    whose pollution the head calls right."""
    device = model_device(model)
    dataset = OscarDataset(world, tokenizer, config, seed=1)
    right_tokens = n_tokens = right_items = 0
    for s in range(0, n, chunk):
        batch = collate_fn([dataset[i] for i in range(s, min(s + chunk, n))])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        h = model._encode_batch(batch)  # (B, T + N, D)
        T = batch["tokens"].shape[1]
        hidden = h[:, :T].flatten(0, 1).index_select(0, batch["mlm_positions"])  # (M, D)
        right_tokens += (model.mlm_logits(hidden).argmax(-1) == batch["mlm_targets"]).sum().item()
        n_tokens += len(batch["mlm_targets"])
        called = model.contrastive_head(model.pooler(h)).argmax(-1).bool()  # (B,) polluted?
        right_items += (called == batch["polluted"]).sum().item()
    return {"mtl_acc": right_tokens / max(n_tokens, 1), "contrastive_acc": right_items / n}


def _reference(tokenizer, text: str, config: Config) -> str:
    """A reference caption as the model could write it (tokenised, cut to max_gen_len words,
    decoded), so BLEU / CIDEr-D compare the same spacing."""
    pieces = tokenizer.encode(text, add_special=False)[:config.max_gen_len]
    return tokenizer.decode(pieces).lower()


def evaluate(model: Oscar, tokenizer, config: Config, world_config, split: str,
             n: int) -> dict[str, float]:
    """The downstream metrics of config.task on a world split (eval mode, no gradients):

    pretrain    i2t_r1/5/10, t2i_r1/5/10, r1_mean: zero-shot retrieval, every pair scored by
                the contrastive head (not polluted), among min(n, eval_pairs) pairs;
                mtl_acc, contrastive_acc: the two pre-training tasks on n items;
                own_called_polluted, foreign_caption_called_polluted: the share of true
                triples, and of triples with another image's caption, the head calls polluted
    retrieval   the same with the fine-tuned retrieval head
    caption     caption_truth (share of true captions), caption_truth_baseline (the model's
                most common caption applied to every image), cider (CIDEr-D), bleu4, against
                the 5 references, on n images
    vqa         vqa_acc over every question of n images, vqa_acc_<type> per template
    """
    world = World(world_config, split)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        if config.task in ("pretrain", "retrieval"):
            examples = [world.example(i) for i in range(min(n, config.eval_pairs, len(world)))]
            scores = retrieval_scores(model, tokenizer, config, examples, world_config)
            metrics = recall_at_k(scores, torch.arange(len(examples)))
            metrics["r1_mean"] = (metrics["i2t_r1"] + metrics["t2i_r1"]) / 2
            if config.task == "pretrain":
                metrics.update(pretraining_accuracy(model, tokenizer, config, world,
                                                    min(n, len(world))))
                # does the head read the caption? own triples, and each image with the NEXT
                # image's caption (own tags and regions): the share it calls polluted
                k = torch.arange(len(examples))
                metrics["own_called_polluted"] = (scores[k, k] < 0).float().mean()
                metrics["foreign_caption_called_polluted"] = (
                    scores[k, (k + 1) % len(k)] < 0).float().mean()
        elif config.task == "caption":
            examples = [world.example(i) for i in range(min(n, len(world)))]
            captions = []
            for s in range(0, len(examples), 100):
                captions += caption(model, tokenizer, config, examples[s:s + 100], world_config)
            references = [[_reference(tokenizer, c, config) for c in ex["captions"]]
                          for ex in examples]
            truth = truth_rate(captions, [ex["scene"] for ex in examples], is_true)
            metrics = {"caption_truth": truth["truth"],
                       "caption_truth_baseline": truth["baseline"],
                       "cider": cider_d(captions, references),
                       "bleu4": bleu(captions, references)[3]}
        else:
            examples = [world.example(i) for i in range(min(n, len(world)))]
            predicted, qa = vqa_predictions(model, tokenizer, config, examples, world_config)
            metrics = vqa_accuracy_by_type(predicted, [q for q, _, _ in qa],
                                           [a for _, a, _ in qa], question_type)
    model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def sample_captions(model: Oscar, tokenizer, config: Config, world_config, split: str,
                    n: int) -> list[tuple[str, str]]:
    """(generated caption, first reference) for the first n images; [] unless task caption."""
    if config.task != "caption":
        return []
    world = World(world_config, split)
    examples = [world.example(i) for i in range(min(n, len(world)))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        generated = caption(model, tokenizer, config, examples, world_config)
    model.train(was_training)
    return [(g, ex["captions"][0]) for g, ex in zip(generated, examples)]
