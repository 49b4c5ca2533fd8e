"""Oscar: Object-Semantics Aligned Pre-training for Vision-Language Tasks, from primitives.

    Xiujun Li, Xi Yin, Chunyuan Li, Pengchuan Zhang, Xiaowei Hu, Lei Zhang, Lijuan Wang, Houdong
    Hu, Li Dong, Furu Wei, Yejin Choi, Jianfeng Gao. ECCV 2020; arXiv 2004.06165. Every
    `[Oscar ...]` tag cites the sections, equations and tables of the ECCV 2020 version.

The object tags a detector writes for an image ("dog", "couch") are words, and the caption
mentions the same objects, so tags between the caption and the regions give self-attention
anchors to align words with regions [Oscar §3, Fig. 3]. An example is a Word-Tag-Image triple
(w, q, v), seen two ways [Oscar §3, Eq. 1]:

    [CLS] w_1 .. w_T [SEP]   q_1 .. q_L [SEP]    v_1 .. v_N
     segment 0 ----------+   segment 1 ----+     regions: Linear([feature ; 6-d box]), no
     word + position + segment embeddings  |     position or segment embedding [code]
                         +-----------------+---------------+
                         one BERT encoder over the three (bidirectional)
                          |                        |
           masked token loss on words and tags     contrastive loss on [CLS]: are these
           (the dictionary view h = [w, q])        the image's own tags? (the modality view
                                                   h' = [q, v], tags polluted half the time)

    L_Pre-training = L_MTL + L_C                    [Oscar §3, Eq. 4]

Paper map (part of the paper -> code; the heads of each task: TASK_HEADS):
    §3 Input: the triple (w, q, v)              text_pair
    §3 Input: v = W [v' ; z], z the box         region_vectors, OscarEncoder.embed_regions
    §3 Eq. 1: one encoder over [w, q, v]        OscarEncoder
    §3 Eq. 2: masked token loss L_MTL           mask_tokens, masked_token_loss, heads.mlm
    §3 Eq. 3: contrastive loss L_C              pollution (polluted tags), contrastive_loss
    §3 Eq. 4: L_Pre-training = L_MTL + L_C      pretraining_loss, Oscar.forward
    §4 retrieval: a binary classifier           OscarDataset (pairs), retrieval_loss, match_logits
    §4 captioning: the seq2seq mask             caption_attention_mask, Oscar.forward
    App. A: 15 % of caption tokens, at most 3   caption_masked_count, caption_mask_positions
    §4 captioning inference, beam 5             caption_step_fn, Oscar.context_states /
                                                caption_step, caption
    §4 VQA: linear classifier, soft scores      heads.vqa, vqa_loss (shared.losses)
    §5.1 SCST, CIDEr-D optimisation             Oscar.scst_losses, scst_loss (shared.losses)
    §5.3 the effect of object tags              Config.use_tags = False (the no-tags baseline)

[code] = the official code, microsoft/Oscar 266075f (the Oscar+/VinVL code base). Left out: the
6.5M-pair corpus and the Faster R-CNN (the world's regions and tags instead); NoCaps'
constrained beam search; GQA and NLVR2; Oscar+'s 3-way contrastive loss. BERT-base
initialisation [Oscar §3, Implementation Details] is train.py --init_bert (BERT_INIT).

Shapes: B batch, T text tokens (words and tags), C caption slot, L tag slot, K context (tags +
regions), N regions, M masked tokens, D width, H heads, Dh head width, F region-feature size
(+ 6 box numbers), V vocabulary, A answers, R decoding rows. Masks over tokens or regions:
True = real (not padding). Attention masks: True = may attend.
"""

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.decoding import cached_step_fn, greedy, sample_with_grad
from shared.losses import scst_loss, vqa_loss  # shared word for word with other papers
from shared.masks import causal_mask
from shared.transformer import (BertEmbeddings, BertPooler, PostLNEncoderBlock, TiedOutputHead,
                                init_bert_weights, run_layer)

PAD_ID = 0  # [PAD] of shared.tokenizer
IGNORE = -100  # the label of a token that is not predicted (PyTorch's ignore_index)
BOX_DIM = 6  # the box z after a region feature [Oscar §3: R = 4 or 6]: x1 y1 x2 y2 w h [code]


# --- 1. Config and presets -----------------------------------------------------------------------

@dataclass
class Config:
    """Defaults = Oscar-B [Oscar §3, Implementation Details; code]. AMBIGUITY: the paper names no
    region LayerNorm, clipping or warmup: [code]'s pre-training defaults have none of the three;
    the VinVL (Oscar+) command sets region_layer_norm=True, grad_clip=10 (warmup 0)."""
    # the encoder: BERT-base [Oscar §3, Implementation Details]
    hidden_size: int = 768  # D: the encoder's width
    layers: int = 12  # Transformer layers
    heads: int = 12  # attention heads, D / 64
    intermediate_size: int = 3072  # feed-forward width, 4·D
    dropout: float = 0.1  # [code]; the VQA script raises it to 0.3 for the whole model
    init_std: float = 0.02  # BERT's N(0, 0.02); [Oscar §3] starts from BERT-base weights
    vocab_size: int = 30522  # bert-base-uncased [code]
    # the input [Oscar §3; code]: [CLS] text [SEP] tags [SEP], at most this many pieces by task
    max_text_len: int = 35  # pre-training [Oscar §3, Implementation Details]
    max_retrieval_text_len: int = 70  # [code] run_retrieval.py and its MODEL_ZOO commands
    max_vqa_text_len: int = 128  # [code] the MODEL_ZOO run_vqa.py commands
    answers: tuple[str, ...] = ()  # the VQA head's classes: () = the world's, or the answer
    #   vocabulary of a VQA v2 training set (shared.vqa.answer_vocabulary; 3,129 [Oscar §4])
    max_caption_len: int = 40  # captioning: the caption slot, [CLS] .. [SEP] [code]
    max_tag_len: int = 30  # captioning: the tag slot, tags .. [SEP] (70 - 40) [code]
    n_regions: int = 50  # [Oscar §3, Implementation Details]; [code]: the first 50 rows
    feature_dim: int = 2048  # P = 2048 [Oscar §3]; the input is F + 6 = 2054 [code]
    region_layer_norm: bool = False  # [code] use_img_layernorm: 0 by default, 1 in VinVL's
    region_layer_norm_eps: float = 1e-12  # [code] img_layer_norm_eps
    max_positions: int = 0  # learned positions: 0 = the tasks' longest text; [code] BERT's 512
    tied_decoder: bool = True  # [code] tie_weights: pre-training's MLM output layer is the word
    #   embeddings; captioning's (run without --tie_weights) is its own (V, D) matrix
    contrast_classes: int = 2  # [code] num_contrast_classes: 3 in Oscar+ (VinVL) pre-training
    standardise_features: bool = False  # OURS: (f - mean) / std (feature_statistics); [code]: f
    feature_mean: tuple[float, ...] = ()  # OURS: with standardise_features on region files on
    feature_std: tuple[float, ...] = ()  # disk, their statistics (shared.data.standardisation)
    use_tags: bool = True  # False: the no-tags baseline [Oscar §5.3], no tags anywhere
    # pre-training [Oscar §3]
    mask_prob: float = 0.15  # of caption and tag word-pieces [Oscar §3]; 80/10/10 [code]
    pollute_prob: float = 0.5  # P(the tags are replaced by another image's) [Oscar §3]
    pollute_with_captions: bool = False  # [code]: half the "polluted tags" are a caption
    # captioning fine-tuning and inference [Oscar App. A; code run_captioning.py]
    caption_mask_prob: float = 0.15  # [Oscar App. A]
    max_caption_masked: int = 3  # [Oscar App. A]
    max_gen_len: int = 20  # [code] max_gen_length: the whole caption, [CLS] included
    beam_size: int = 5  # [Oscar §4]; 1 = greedy
    length_penalty: float = 1.0  # score = Σ log p / len [code]
    scst: bool = False  # caption task: self-critical sequence training [Oscar §5.1; code
    #   --scst], CIDEr-D as the reward, from a cross-entropy checkpoint (--init)
    scst_samples: int = 5  # [code] sc_train_sample_n: captions sampled an image
    scst_df_images: int = 0  # CIDEr-D's document frequencies from the first this many
    #   training images' captions; 0 = all ([code]: COCO train's)
    task: str = "pretrain"  # one of TASKS; train.py sets it from --task
    eval_pairs: int = 1000  # retrieval among this many test images and ALL their captions
    image_size: int = 224  # OURS: the world's render size (Oscar itself sees only regions)
    # optimisation [Oscar §3: AdamW, batch 768, lr 5e-5, >= 1.0M steps; code: linear decay];
    #   pre-training's: paper(task) gives the fine-tuning tasks' [Oscar App. A; code]
    batch_size: int = 768  # [Oscar §3]
    lr: float = 5e-5  # [Oscar §3]: AdamW's peak learning rate
    weight_decay: float = 0.01  # [code]
    beta1: float = 0.9  # AdamW's β1
    beta2: float = 0.999  # AdamW's β2
    warmup_steps: int = 0  # [code] (and the VinVL command)
    max_steps: int = 1_000_000  # [Oscar §3]: at least 1.0M steps
    lr_schedule: str = "linear"  # [code]: linear decay
    grad_clip: float = 0.0  # off: [code] max_grad_norm -1 (the VinVL command: 10)
    grad_accum_steps: int = 1  # OURS: micro-batches an update (batch_size is split in this many)
    grad_checkpointing: bool = False  # OURS: recompute activations in the backward (memory)
    train_single_object_prob: float = 0.0  # OURS: the world's train mix; 0 = uniform 1-4 objects

    def __post_init__(self):  # no answers given: the world's; then every problem at once (§7)
        self.answers = self.answers or world_answers()
        if problems := config_problems(self):
            raise ValueError("; ".join(problems))

    def text_len(self) -> int:  # the most pieces of [CLS] text [SEP] tags [SEP] for self.task
        return {"retrieval": self.max_retrieval_text_len, "vqa": self.max_vqa_text_len}.get(
            self.task, self.max_text_len)

    @classmethod
    def paper(cls, task: str = "pretrain") -> "Config":
        """Oscar-B [Oscar §3; code] with the recipe of `task`: PAPER_RECIPES (§7), cited there."""
        if task not in PAPER_RECIPES:
            raise ValueError(f"no paper recipe for {task!r}: {', '.join(PAPER_RECIPES)}")
        return cls(task=task, **PAPER_RECIPES[task])

    @classmethod
    def small(cls) -> "Config":
        """OURS: one GPU, hours. A 6-layer, 384-wide Oscar on 36 of the world's regions."""
        return cls(hidden_size=384, layers=6, heads=6, intermediate_size=1536, vocab_size=1000,
                   max_text_len=48, max_retrieval_text_len=70, max_vqa_text_len=70,
                   max_caption_len=32, max_tag_len=38, n_regions=36, feature_dim=512,
                   image_size=128, batch_size=256, lr=1e-4, warmup_steps=1000,
                   max_steps=50_000, grad_clip=1.0, max_gen_len=24, region_layer_norm=True,
                   train_single_object_prob=0.5, standardise_features=True,
                   scst_df_images=10_000)  # of the world's million: its n-grams are few

    @classmethod
    def tiny(cls) -> "Config":
        """OURS: 2 CPU cores, minutes. The world's regions (10 an image, 64-d, standardised), a
        4-layer, 128-wide encoder, no dropout (the world never repeats an example), init_std
        0.1 (as UNITER's tiny preset: from scratch, its cross-modal loss needs it). Every text
        36 pieces (the world's longest [CLS] text [SEP] tags [SEP] is 30); region LayerNorm."""
        return cls(hidden_size=128, layers=4, heads=2, intermediate_size=512, dropout=0.0,
                   init_std=0.1, vocab_size=1000, max_text_len=36, max_retrieval_text_len=36,
                   max_vqa_text_len=36, max_caption_len=24, max_tag_len=12, n_regions=10,
                   feature_dim=64, image_size=64, batch_size=64, lr=5e-4, warmup_steps=100,
                   max_steps=3000, grad_clip=1.0, max_gen_len=20, region_layer_norm=True,
                   eval_pairs=100, train_single_object_prob=0.5, standardise_features=True,
                   scst_df_images=10_000)  # of the world's million: its n-grams are few


# --- 2. Inputs: Word-Tag-Image triples [Oscar §3, Input] -----------------------------------------

def text_pair(caption: list[int], tags: list[int] | None, max_len: int, cls_id: int,
              sep_id: int) -> tuple[list[int], list[int]]:
    """[CLS] caption [SEP] tags [SEP] and its segment ids (0 for [CLS], the caption and its
    [SEP]; 1 for the tags and the last [SEP]) [code]; tags None (use_tags False): [CLS] caption
    [SEP] only. caption and tags are word-pieces without specials; to fit max_len, one piece at
    a time goes from the end of the longer one, the tags on ties [code: _truncate_seq_pair].

    Worked example: caption [7, 8, 9], tags [5, 6], max_len 7 -> 4 pieces fit next to the 3
    specials; the caption (longer) loses 9 -> tokens [CLS 7 8 SEP 5 6 SEP], segments
    [0 0 0 0 1 1 1]. Caption [7, 8], tags [5, 6], max_len 6: a tie, the tags lose 6."""
    if tags is None:
        caption = caption[:max_len - 2]
        return [cls_id, *caption, sep_id], [0] * (len(caption) + 2)
    caption, tags = list(caption), list(tags)
    while len(caption) + len(tags) > max_len - 3:
        (caption if len(caption) > len(tags) else tags).pop()
    tokens = [cls_id, *caption, sep_id, *tags, sep_id]
    return tokens, [0] * (len(caption) + 2) + [1] * (len(tags) + 1)


def tag_pieces(tokenizer, example: dict, config: Config) -> list[int] | None:
    """q: the word-pieces of an example's object tags; None without tags (use_tags False)."""
    tags = " ".join(example["tags"])
    return tokenizer.encode(tags, add_special=False) if config.use_tags else None


def region_vectors(features: Tensor, boxes: Tensor) -> Tensor:
    """The position-sensitive region feature [v' ; z] [Oscar §3, Input]: z = (x1, y1, x2, y2,
    w, h), the box as fractions of the image side [code] (UNITER embeds the box separately;
    Oscar appends it). features (N, F), boxes (N, 4) -> (N, F + 6)."""
    w = boxes[:, 2:3] - boxes[:, 0:1]  # (N, 1)
    h = boxes[:, 3:4] - boxes[:, 1:2]  # (N, 1)
    return torch.cat([features, boxes, w, h], dim=1)  # (N, F + 6)


def tag_slot(tags: list[int] | None, config: Config, sep_id: int) -> Tensor:
    """Captioning's tag slot: tags [SEP], cut to max_tag_len; empty without tags. (L,)"""
    return torch.tensor([] if tags is None else [*tags[:config.max_tag_len - 1], sep_id],
                        dtype=torch.long)


# --- 3. The encoder over [w, q, v] [Oscar §3, Eq. 1] ---------------------------------------------

class OscarEncoder(nn.Module):
    """BERT over [words ; tags ; regions]: text through BERT's embeddings, regions through the
    projection W [Oscar §3, Input], post-LN layers, the tanh pooler on [CLS]. The same for every
    task; train.py --init_bert fills text_embeddings, layers and pooler from BERT."""

    def __init__(self, config: Config):
        super().__init__()
        c, D = config, config.hidden_size
        self.checkpointed = c.grad_checkpointing
        # every task's positions (captioning: the tags after the caption slot): one encoder
        positions = max(c.max_text_len, c.max_retrieval_text_len, c.max_vqa_text_len,
                        c.max_caption_len + c.max_tag_len, c.max_positions)
        self.text_embeddings = BertEmbeddings(c.vocab_size, D, max_positions=positions,
                                              n_token_types=2, dropout=c.dropout, pad_id=PAD_ID)
        self.region_embedding = nn.Linear(c.feature_dim + BOX_DIM, D)  # v = W [v' ; z]
        self.region_norm = (nn.LayerNorm(D, eps=c.region_layer_norm_eps) if c.region_layer_norm
                            else nn.Identity())
        self.region_dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(PostLNEncoderBlock(D, c.heads, c.intermediate_size,
                                                       c.dropout) for _ in range(c.layers))
        self.pooler = BertPooler(D)

    def embed_regions(self, regions: Tensor) -> Tensor:  # (B, N, F + 6) -> (B, N, D)
        return self.region_dropout(self.region_norm(self.region_embedding(regions)))

    def forward(self, tokens: Tensor, segments: Tensor, positions: Tensor, regions: Tensor,
                region_mask: Tensor, allowed: Tensor | None = None) -> Tensor:
        """tokens, segments, positions (B, T); regions (B, N, F + 6); region_mask (B, N);
        allowed (B, T + N, T + N) (captioning) or None: every token sees every real token.
        Returns the final hidden states (B, T + N, D)."""
        text = self.text_embeddings(tokens, segments, positions)  # (B, T, D)
        x = torch.cat([text, self.embed_regions(regions)], dim=1)  # (B, T + N, D)
        if allowed is None:
            allowed = torch.cat([tokens != PAD_ID, region_mask], dim=1)[:, None, :]  # (B, 1, S)
        for layer in self.layers:
            x = run_layer(layer, x, allowed, checkpointed=self.checkpointed)  # (B, T + N, D)
        return x


# --- 4. Objectives [Oscar §3, Eqs. 2-4; §4] ------------------------------------------------------

def masked_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The masked token loss [Oscar §3, Eq. 2], over the discrete tokens h = [w, q]:

        L_MTL = -E_{(v,h)~D} log p(h_i | h_\\i, v)  ~=  -(1/M) Σ_m log softmax(z_m)[y_m]

        symbol           variable                                  shape
        h_i              labels: a masked word or tag's id         (M,)  IGNORE = skip
        p(.|h_\\i, v)     softmax(logits) at the masked position    (M, V)

    averaged over the masked tokens of the batch; 0 when nothing is masked. Captioning uses it
    at the masked caption positions [Oscar §4; code, label smoothing 0 in the Oscar recipe]."""
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)


def contrastive_loss(logits: Tensor, polluted: Tensor) -> Tensor:
    """The contrastive loss [Oscar §3, Eq. 3]: a binary classifier f (an FC layer on the pooled
    [CLS]) says whether h' = [q, v] is the image's own or polluted (q replaced by another
    image's tags), cross-entropy averaged over the batch:

        L_C = -E_{(h',w)~D} log p(y | f(h', w))

        symbol     variable                             shape
        f(h', w)   logits: column 1 = "polluted"        (B, 2)
        y          polluted                             (B,) bool

    AMBIGUITY: the paper's y = 1 is the original, [code]'s label 1 is polluted; we follow
    [code] (a relabelling: the same loss)."""
    return F.cross_entropy(logits.float(), polluted.long().to(logits.device))


def pretraining_loss(mtl: Tensor, contrastive: Tensor) -> Tensor:
    """The full pre-training objective [Oscar §3, Eq. 4], an unweighted sum ("a clear and
    simple form for the joint loss" [Oscar §3, Discussion]; [code] too):

        L_Pre-training = L_MTL + L_C        L_MTL = mtl (masked_token_loss),
                                            L_C = contrastive (contrastive_loss)"""
    return mtl + contrastive


def retrieval_loss(logits: Tensor, is_match: Tensor) -> Tensor:
    """Retrieval fine-tuning as binary classification [Oscar §4]: an aligned pair against one
    with "a different image or a different caption", a classifier on [CLS], cross-entropy, no
    ranking loss [code run_retrieval.py]:

        L = -(1/B) Σ_b log softmax(z_b)[y_b]      z = logits (B, 2), column 1 = "match";
                                                  y = is_match (B,) bool"""
    return F.cross_entropy(logits.float(), is_match.long().to(logits.device))


# --- 5. The model: the encoder and one head per task ---------------------------------------------

# the heads of each task; a head keeps its name across tasks when fine-tuning should keep it
TASK_HEADS = {"pretrain": ("mlm", "contrastive"), "caption": ("mlm",),
              "retrieval": ("retrieval",), "vqa": ("vqa",)}


class UntiedOutputHead(TiedOutputHead):
    """The MLM head with its own output matrix (tied_decoder False): [code]'s captioning model
    leaves cls.predictions.decoder untied unless run with --tie_weights, so fine-tuning moves it
    away from the word embeddings. The `weight` passed in is ignored."""

    def __init__(self, d_model: int, vocab_size: int, std: float):
        super().__init__(d_model, vocab_size)
        self.decoder = nn.Parameter(torch.randn(vocab_size, d_model) * std)  # (V, D)

    def forward(self, hidden: Tensor, weight: Tensor) -> Tensor:
        return super().forward(hidden, self.decoder)  # (M, D) -> (M, V)


class Oscar(nn.Module):
    """OscarEncoder + the heads of config.task (TASK_HEADS). [code]'s names: region_embedding =
    img_embedding, heads.contrastive = cls.seq_relationship."""

    def __init__(self, config: Config):
        super().__init__()
        self.config, D = config, config.hidden_size
        self.encoder = OscarEncoder(config)
        classifier = lambda n: nn.Sequential(OrderedDict(dropout=nn.Dropout(config.dropout),
                                                         classifier=nn.Linear(D, n)))
        make = {"mlm": lambda: TiedOutputHead(D, config.vocab_size) if config.tied_decoder
                else UntiedOutputHead(D, config.vocab_size, config.init_std),  # mlm_logits
                # f [Oscar §3, Eq. 3]; 0 = the image's own, 1 = polluted (Oscar+: 1, 2)
                "contrastive": lambda: nn.Linear(D, config.contrast_classes),
                # column 1 = "match" [code]; "a task-specific linear classifier" [Oscar §4,
                # VQA]; both after dropout on the pooled [CLS] [code]
                "retrieval": lambda: classifier(2), "vqa": lambda: classifier(len(config.answers))}
        self.heads = nn.ModuleDict({name: make[name]() for name in TASK_HEADS[config.task]})
        self.apply(lambda module: init_bert_weights(module, config.init_std))

    def encode_batch(self, batch: dict, allowed: Tensor | None = None) -> Tensor:
        """The hidden states (B, T + N, D) of a batch (collate_fn, or pair_batch)."""
        return self.encoder(batch["tokens"], batch["segments"], batch["positions"],
                            batch["regions"], batch["region_mask"], allowed)

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """(M, D) -> (M, V): heads.mlm, its output layer the word embeddings (tied)."""
        return self.heads["mlm"](hidden, self.encoder.text_embeddings.word.weight)

    def pretrain_logits(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(MLM logits (M, V) at the collate's flat masked positions, contrastive logits (B, 2))."""
        h = self.encode_batch(batch)  # (B, T + N, D)
        T = batch["tokens"].shape[1]
        hidden = h[:, :T].flatten(0, 1).index_select(0, batch["mlm_positions"])  # (M, D)
        return self.mlm_logits(hidden), self.heads["contrastive"](self.encoder.pooler(h))

    def match_logits(self, batch: dict) -> Tensor:
        """(B,) logit(match) - logit(no match), monotone in the probability [Oscar §4] ranks by;
        zero-shot (no retrieval head): the contrastive logit(not polluted) - logit(polluted)."""
        pooled = self.encoder.pooler(self.encode_batch(batch))  # (B, D)
        if "retrieval" in self.heads:
            logits = self.heads["retrieval"](pooled)  # (B, 2)
            return logits[:, 1] - logits[:, 0]
        logits = self.heads["contrastive"](pooled)  # (B, 2), Oscar+ (B, 3)
        return logits[:, 0] - logits[:, 1:].logsumexp(dim=1)  # 2 classes: l_0 - l_1 exactly

    def answer_logits(self, batch: dict) -> Tensor:
        """(B, A) logits over config.answers from the pooled [CLS] of [question ; tags ; regions]."""
        return self.heads["vqa"](self.encoder.pooler(self.encode_batch(batch)))  # (B, A)

    def forward(self, batch: dict) -> dict:
        """One batch (collate_fn) -> {"loss": scalar, <term>: scalar, ...}, by batch["task"]."""
        if batch["task"] == "pretrain":  # L_MTL + L_C [Oscar §3, Eq. 4]
            token_logits, pair_logits = self.pretrain_logits(batch)  # (M, V), (B, 2)
            mtl = masked_token_loss(token_logits, batch["mlm_targets"])
            contrastive = contrastive_loss(pair_logits, batch["polluted"])
            return {"loss": pretraining_loss(mtl, contrastive), "mtl": mtl,
                    "contrastive": contrastive}
        if batch["task"] == "caption" and self.config.scst:  # CIDEr optimisation [§5.1]
            return self.scst_losses(batch)
        if batch["task"] == "caption":  # L_MTL at masked caption positions, seq2seq mask [§4]
            C, tokens = batch["caption_len"], batch["tokens"]  # tokens = [caption slot ; tags]
            allowed = caption_attention_mask(tokens[:, :C] != PAD_ID, torch.cat(
                [tokens[:, C:] != PAD_ID, batch["region_mask"]], dim=1))  # (B, S, S)
            h = self.encode_batch(batch, allowed)  # (B, S, D)
            hidden = h[:, :C].flatten(0, 1).index_select(0, batch["mlm_positions"])  # (M, D)
            loss = masked_token_loss(self.mlm_logits(hidden), batch["mlm_targets"])
            return {"loss": loss, "caption": loss}
        if batch["task"] == "retrieval":  # the binary classifier on [CLS] [Oscar §4]
            pooled = self.encoder.pooler(self.encode_batch(batch))  # (B, D)
            loss = retrieval_loss(self.heads["retrieval"](pooled), batch["is_match"])
            return {"loss": loss, "retrieval": loss}
        # VQA [Oscar §4]: multi-label classification against soft target scores
        loss = vqa_loss(self.answer_logits(batch), batch["answer_scores"])
        return {"loss": loss, "vqa": loss}

    def scst_losses(self, batch: dict) -> dict:
        """Self-critical sequence training [Oscar §5.1; Rennie et al. 2017; code:
        the code's run_captioning.py --scst]: per image the greedy caption (eval mode, no
        gradient) is the baseline, scst_samples captions are drawn with dropout on
        (sample_with_grad, no top-k or top-p), each scored by CIDEr-D against the image's
        references (batch["scst_reward"], shared.evaluate.ScstReward), and scst_loss raises
        the samples that beat the baseline. Captions at most max_gen_len tokens, [CLS]
        included ([code] max_gen_length 20)."""
        c, reward_of, n = self.config, batch["scst_reward"], self.config.scst_samples
        tok, C = reward_of.tokenizer, batch["caption_len"]
        tags = batch["tokens"][:, C:]  # (B, L), the tag slot
        tag_positions = c.max_caption_len + torch.arange(tags.shape[1], device=tags.device)
        prefix = torch.full((len(tags), 1), tok.cls_id, dtype=torch.long, device=tags.device)
        training = self.training
        self.eval()  # the baseline: the caption the model writes at test time
        with torch.no_grad():
            states, real = self.context_states(tags, tag_positions, batch["regions"],
                                               batch["region_mask"])
            baseline_tokens, _ = greedy(caption_step_fn(self, tok, states, real), prefix,
                                        c.max_gen_len, tok.sep_id, PAD_ID)  # (B, T)
        baseline_tokens = end_unfinished(baseline_tokens, tok.sep_id, c.max_gen_len)
        self.train(training)
        states, real = self.context_states(tags, tag_positions, batch["regions"],
                                           batch["region_mask"])  # with gradients
        rows = torch.arange(len(tags), device=tags.device).repeat_interleave(n)  # (B·n,)
        tokens, logprob, lengths = sample_with_grad(caption_step_fn(
            self, tok, [x[rows] for x in states], real[rows]), prefix[rows], c.max_gen_len,
            tok.sep_id, PAD_ID)  # (B·n, T), (B·n,), (B·n,)
        references = batch["references"]  # B lists of prepared reference strings
        tokens = end_unfinished(tokens, tok.sep_id, c.max_gen_len)  # scored as [code] writes
        reward = reward_of(tokens, [refs for refs in references for _ in range(n)])  # (B·n,)
        baseline = reward_of(baseline_tokens, references)  # (B,)
        mean_logprob = (logprob / lengths).view(-1, n)  # (B, n)
        loss = scst_loss(mean_logprob, reward.view(-1, n).to(logprob.device),
                         baseline.to(logprob.device))
        return {"loss": loss, "scst": loss, "reward": reward.mean().to(loss.device),
                "greedy_reward": baseline.mean().to(loss.device)}

    # -- captioning inference [Oscar §4]: [CLS] w_1 .. w_t [MASK], read at [MASK] ---------------

    def context_states(self, tags: Tensor, tag_positions: Tensor, regions: Tensor,
                       region_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        """The tags and regions, run once per image: under the caption mask they never see the
        caption, so their states are the same at every decoding step ([code]: history_state).
        tags (B, L) at tag_positions (L,), regions (B, N, F + 6). Returns (each layer's input
        for the K = L + N context rows, [(B, K, D)] * layers; context_real (B, K))."""
        enc = self.encoder
        text = enc.text_embeddings(tags, torch.ones_like(tags), tag_positions)  # (B, L, D)
        x = torch.cat([text, enc.embed_regions(regions)], dim=1)  # (B, K, D)
        real = torch.cat([tags != PAD_ID, region_mask], dim=1)  # (B, K)
        states = []
        for layer in enc.layers:
            states.append(x)
            x = layer(x, real[:, None, :])  # (B, K, D): the context sees only the context
        return states, real

    def caption_logits(self, caption: Tensor, states: list[Tensor], context_real: Tensor
                       ) -> Tensor:
        """caption (R, t) = [CLS] w_1 .. [MASK] (no padding) against the context (context_states
        for these R rows) -> MLM logits (R, t, V) at every caption position."""
        R, t = caption.shape
        x = self.encoder.text_embeddings(caption)  # (R, t, D), segment 0, positions 0 .. t - 1
        allowed = torch.cat([causal_mask(t, caption.device)[None].expand(R, t, t),
                             context_real[:, None, :].expand(R, t, context_real.shape[1])],
                            dim=2)  # (R, t, t + K): causal over the caption, all the context
        for layer, context in zip(self.encoder.layers, states):
            x = layer(x, allowed, context=torch.cat([x, context], dim=1))  # (R, t, D)
        return self.mlm_logits(x)  # (R, t, V)

    def caption_step(self, token: Tensor, position: int, past: list | None, context_kv: list,
                     context_real: Tensor, mask_id: int) -> tuple[Tensor, list]:
        """One decoding step with a key/value cache. token (R,) = w_{t-1}, the last word of
        [CLS] w_1 .. w_{t-1}, at position = t - 1; past: per layer, the keys and values
        (R, H, t - 1, Dh) of caption rows 0 .. t - 2 (None when t = 1); context_kv: per layer,
        those of the tags and regions (R, H, K, Dh). Two rows run: t - 1 (the last step's [MASK],
        now w_{t-1}) and t (the new [MASK]); earlier rows never see a later one, so their keys
        and values are final. Returns (MLM logits at [MASK] (R, V), the next past)."""
        R, t = len(token), position + 1
        new = torch.stack([token, torch.full_like(token, mask_id)], dim=1)  # (R, 2)
        positions = torch.arange(t - 1, t + 1, device=token.device)  # (2,)
        x = self.encoder.text_embeddings(new, positions=positions)  # (R, 2, D)
        K = context_real.shape[1]
        allowed = torch.cat([torch.ones(R, 2, t - 1, dtype=torch.bool, device=token.device),
                             causal_mask(2, token.device)[None].expand(R, 2, 2),
                             context_real[:, None, :].expand(R, 2, K)], dim=2)  # (R, 2, t+1+K)
        cache = []
        for l, layer in enumerate(self.encoder.layers):
            k_new, v_new = layer.attn.project_kv(x)  # (R, H, 2, Dh) each
            k_past, v_past = (k_new[:, :, :0], v_new[:, :, :0]) if past is None else past[l]
            cache.append((torch.cat([k_past, k_new[:, :, :1]], dim=2),
                          torch.cat([v_past, v_new[:, :, :1]], dim=2)))  # row t - 1 is final
            k_ctx, v_ctx = context_kv[l]  # (R, H, K, Dh)
            kv = (torch.cat([k_past, k_new, k_ctx], dim=2),
                  torch.cat([v_past, v_new, v_ctx], dim=2))  # (R, H, t + 1 + K, Dh)
            x = layer(x, allowed, kv=kv)  # (R, 2, D)
        return self.mlm_logits(x[:, -1]), cache  # (R, V)


# --- 6. The paper's sampling and generation: polluted tags, caption masks, decoding --------------
# Pure functions of a numpy Generator (each draw of the data is a function of (seed, i)), applied
# by OscarDataset (§8); then the captioning decoder's step.

def corrupt(token: int, rng: np.random.Generator, mask_id: int,
            random_ids: tuple[int, int]) -> int:
    """A chosen token's input: [MASK] (80 %), a random ordinary id from random_ids = [lo, hi)
    (10 %) or itself (10 %) [code random_word]."""
    # AMBIGUITY: [Oscar §3] replaces a masked token "with a special token [MASK]"; [code] uses
    # BERT's 80/10/10 (pre-training and captioning); we follow [code].
    # DEVIATION: [code] draws from the whole vocabulary; its attention mask comes from lengths,
    # ours from tokens != [PAD], so a drawn [PAD] would become padding: we draw past the specials.
    u = rng.random()
    return mask_id if u < 0.8 else int(rng.integers(*random_ids)) if u < 0.9 else token


def mask_tokens(tokens: list[int], maskable: list[bool], rng: np.random.Generator,
                mask_prob: float, mask_id: int, random_ids: tuple) -> tuple[list, list]:
    """The corruption of L_MTL [Oscar §3, Eq. 2]: each maskable piece (caption and tag
    word-pieces, never [CLS]/[SEP]) is chosen with mask_prob and corrupted. Unlike UNITER there
    is no at-least-one rule: an item can have no label. Returns (input ids, labels with IGNORE
    where nothing is predicted)."""
    out, labels = list(tokens), [IGNORE] * len(tokens)
    for i, ok in enumerate(maskable):
        if ok and rng.random() < mask_prob:
            labels[i], out[i] = tokens[i], corrupt(tokens[i], rng, mask_id, random_ids)
    return out, labels


def other_image(index: int, n_images: int, rng: np.random.Generator) -> int:
    """Another image than `index`, uniformly among the other n_images - 1."""
    return (index + 1 + int(rng.integers(n_images - 1))) % n_images


def pollution(config: Config, index: int, n_images: int,
              rng: np.random.Generator) -> tuple[bool, int, str]:
    """The contrastive item's draw [Oscar §3, Eq. 3]: (polluted, the image whose q (or v) the
    item shows, what replaces the image's own: "" (nothing), "tags", "caption" or "regions").

    Polluted tags [Oscar §3]: q replaced "with probability 50% with a different tag sequence
    randomly sampled from the dataset". [code] (vanilla settings, textb_sample_mode 0) takes a
    random line of another image, half the time its CAPTION: pollute_with_captions = True.
    DEVIATION: use_tags = False (the no-tags baseline) leaves nothing to pollute, so the
    contrastive item replaces the regions by another image's (image-text matching, same head)."""
    if not rng.random() < config.pollute_prob:
        return False, index, ""
    source = other_image(index, n_images, rng)
    if not config.use_tags:
        return True, source, "regions"
    if config.pollute_with_captions and rng.random() < 0.5:
        return True, source, "caption"
    return True, source, "tags"


def caption_masked_count(length: int, mask_prob: float = 0.15, max_masked: int = 3) -> int:
    """How many positions of a caption captioning fine-tuning masks: "15% of caption tokens
    with a maximum of 3 tokens per caption" [Oscar App. A], as [code] rounds it:

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
    """The seq2seq mask of captioning [Oscar §4]: "a caption token can only attend to the tokens
    before its position"; "all caption tokens will have full attentions to image regions and
    object tags but not the other way around". Over [caption slot (C) ; context (K) = tags and
    regions]; rows are queries, columns keys:

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


def end_unfinished(tokens: Tensor, sep_id: int, max_len: int) -> Tensor:
    """[code]'s captions end with [SEP]: one still unfinished at max_len tokens ([CLS]
    included) gets [SEP] over its last word, so it keeps at most max_len - 2 words (greedy,
    sampling and beam search alike). tokens (R, T) -> (R, T)."""
    if tokens.shape[1] < max_len:  # every row emitted [SEP] before the limit
        return tokens
    unfinished = (tokens != sep_id).all(dim=1)  # (R,)
    return torch.where(unfinished[:, None] & (torch.arange(tokens.shape[1], device=tokens.device)
                                              == tokens.shape[1] - 1), sep_id, tokens)


def caption_step_fn(model: Oscar, tokenizer, states: list[Tensor], real: Tensor,
                    cached: bool = True):
    """shared.decoding's step: (tokens (R, t), rows (R,)) -> log-probs (R, V) of the next word,
    read at an appended [MASK], with `states` (Oscar.context_states). cached: caption_step (two
    rows a step, keys and values kept); else caption_logits (every row every step); equal."""
    if cached:
        context_kv = [layer.attn.project_kv(x) for layer, x in zip(model.encoder.layers, states)]
        return cached_step_fn(lambda token, position, past, kv, rows: model.caption_step(
            token, position, past, kv, real[rows], tokenizer.mask_id), context_kv)

    def step(tokens: Tensor, rows: Tensor) -> Tensor:  # (R, t) -> (R, V) log-probs
        mask = torch.full((len(tokens), 1), tokenizer.mask_id, dtype=torch.long,
                          device=tokens.device)
        query = torch.cat([tokens, mask], dim=1)  # (R, t + 1)
        logits = model.caption_logits(query, [s[rows] for s in states], real[rows])
        return logits[:, -1].float().log_softmax(dim=-1)  # read at [MASK]
    return step


# ===== below: train.py's contract, not in the paper =====

from torch.utils.data import Dataset

from shared.checkpoint import ReleasedWeights
from shared.config import encoder_problems, optimisation_problems
from shared.data import (Epochs, check_feature_size, flat_targets, model_device, pad_rows,
                         pad_sequences, pick_text, standardisation, statistics_problems)
from shared.decoding import beam_search
from shared.evaluate import answer_questions as shared_answer_questions
from shared.evaluate import (ScstReward, all_captions, caption_examples, caption_metrics,
                             in_eval_mode, pair_scores, retrieval_metrics, vqa_metrics,
                             world_examples)
from shared.evaluate import sample_captions as shared_sample_captions
from shared.optim import adamw, decay_groups, fused_for
from shared.vqa import answer_index, soft_scores, world_answers


# --- 7. The contract: tasks, config checks, model and optimizer ----------------------------------

TASKS = ("pretrain", "caption", "retrieval", "vqa")  # train.py --task
MAIN_METRIC = {"pretrain": "r1_mean", "caption": "cider", "retrieval": "r1_mean",
               "vqa": "vqa_acc"}  # what train.py keeps best.pt by, per task
INPUTS = "regions"  # Oscar reads detector regions (and their tags), not pixels
# --init_bert fills model.encoder, and these heads from BERT's pre-training heads [code]
BERT_INIT = {"mlm": "cls.predictions", "contrastive": "cls.seq_relationship"}
UNUSED_PARAMETERS = True  # captioning and VQA leave the pooler without a gradient
PROTOCOLS = {"pretrain": ("retrieval",), "caption": ("caption",), "retrieval": ("retrieval",),
             "vqa": ("vqa",)}  # what data on disk evaluates, by task (shared.benchmarks)
CROSS_ENCODER = True  # retrieval_scores runs the model on every (image, text) pair


# Config.paper(task): Oscar-B [Oscar §3; code] with the recipe of `task`: pre-training [Oscar §3]
# (the class defaults) or the COCO fine-tuning of [Oscar App. A] (batch, lr, epochs), the rest from
# [code]'s scripts (run_captioning.py, run_retrieval.py, run_vqa.py: their defaults), and
# the Oscar-B commands in the code's MODEL_ZOO. Epochs become steps over the paper's data:
#
#     COCO Karpathy train: 113,287 images × 5 captions = 566,435 pairs [Oscar App. A];
#         a caption or retrieval step reads 256 of them: ⌈566,435 / 256⌉ = 2,213 steps
#         an epoch ([code] keeps the last, short batch)
#     VQA v2: train 444k + val 214k questions [Oscar §4], less a minival of 2k val
#         images [Oscar App. A] (OURS: ≈ 2k × 214k / 41k ≈ 10.4k of them): ≈ 647.6k;
#         ⌈647.6k / 128⌉ = 5,060 steps an epoch
#
# [code] averages over its accumulation steps (loss / k) and DataParallel / DDP average over GPUs,
# so its thresholds hold for our mean gradient as they are. Its AdamW is pytorch_transformers' with
# eps 1e-8 (adam_epsilon), torch's default that make_optimizer uses. [code] clips every micro-
# batch's accumulated gradient (no effect at k = 1). Caption is the cross-entropy stage; the CIDEr
# stage (--scst) is 5 epochs at batch 64, lr 1e-6 [Oscar App. A] (MODEL_ZOO's command: 5e-6): give
# those flags.
_STEPS_PER_EPOCH = {"caption": -(-566_435 // 256), "retrieval": -(-566_435 // 256),
                   "vqa": -(-647_600 // 128)}  # 2,213, 2,213, 5,060 (above)
PAPER_RECIPES = {
    "pretrain": dict(),  # the class defaults [Oscar §3; code]
    "caption": dict(  # [Oscar App. A] "Image Captioning", Oscar-B, cross-entropy
        batch_size=256,  # [Oscar App. A]; [code] MODEL_ZOO: 4 V100 × 64
        lr=3e-5,  # [Oscar App. A] "initial learning rate of 3e-5"
        max_steps=40 * _STEPS_PER_EPOCH["caption"],  # [Oscar App. A] 40 epochs ×
        #   2,213 = 88,520 ([code] default num_train_epochs 40; MODEL_ZOO's command: 30)
        warmup_steps=0,  # [code] warmup_steps default
        lr_schedule="linear",  # [code] scheduler default: WarmupLinearSchedule
        weight_decay=0.05,  # [code] weight_decay default
        beta1=0.9, beta2=0.999,  # [code] pytorch_transformers AdamW's defaults
        grad_clip=1.0,  # [code] max_grad_norm default
        grad_accum_steps=1),  # [code] gradient_accumulation_steps default
    "retrieval": dict(  # [Oscar App. A] "Image-Text Retrieval", Oscar-B
        batch_size=512,  # [Oscar App. A] "batch size of 256": [code]'s items, each an
        #   aligned pair and its unaligned one; batch_size counts pairs: 2 × 256
        lr=2e-5,  # [Oscar App. A] "initial learning rate ... 2e-5 and linearly decreases"
        max_steps=40 * _STEPS_PER_EPOCH["retrieval"],  # [Oscar App. A] 40 epochs ×
        #   2,213 = 88,520 (an epoch visits each (image, caption) once; MODEL_ZOO's
        #   command: 4 V100 × 32 = 128 items for 30 epochs)
        warmup_steps=0,  # [code] warmup_steps default
        lr_schedule="linear",  # [Oscar App. A]; [code] WarmupLinearSchedule
        weight_decay=0.05,  # [code] default and MODEL_ZOO command
        beta1=0.9, beta2=0.999,  # [code] pytorch_transformers AdamW's defaults
        grad_clip=1.0,  # [code] max_grad_norm default
        grad_accum_steps=1),  # [code] gradient_accumulation_steps default
    "vqa": dict(  # [Oscar App. A] "VQA", Oscar-B, train + val less 2k images
        batch_size=128,  # [Oscar App. A]; [code] MODEL_ZOO: per_gpu_train_batch_size 32
        lr=5e-5,  # [Oscar App. A]; [code] MODEL_ZOO
        max_steps=25 * _STEPS_PER_EPOCH["vqa"],  # [Oscar App. A] 25 epochs × 5,060 =
        #   126,500 (MODEL_ZOO's Oscar-B command trains on train alone: 444k / 128 ×
        #   25 ≈ 86.7k)
        warmup_steps=0,  # [code] MODEL_ZOO --warmup_steps 0
        lr_schedule="linear",  # [code] scheduler default: WarmupLinearSchedule
        weight_decay=0.05,  # [code] MODEL_ZOO --weight_decay 0.05
        beta1=0.9, beta2=0.999,  # [code] pytorch_transformers AdamW's defaults
        grad_clip=1.0,  # [code] max_grad_norm default
        grad_accum_steps=1),  # [code] gradient_accumulation_steps default
    #   NOT HERE: [code]'s VQA command also sets --drop_out 0.3 (a model field, dropout)
}


def config_problems(c: Config) -> list[str]:
    """Every problem with a Config, one line each ([] = none; Config.__post_init__ raises them
    as one ValueError): the encoder and task fields (shared.config), Oscar's own, the
    optimisation fields and the feature statistics (shared.data)."""
    checks = [  # (what must hold, the message when it does not)
        (min(c.n_regions, c.max_tag_len) >= 1 and min(c.max_text_len, c.max_vqa_text_len,
         c.max_retrieval_text_len) >= 5, "need n_regions, max_tag_len >= 1 and max_*text_len"
         " >= 5 ([CLS] w [SEP] q [SEP])"),
        (c.max_gen_len >= 2 and c.max_caption_len >= c.max_gen_len + 2, f"need max_gen_len "
         f">= 2 ([CLS] included) and max_caption_len >= max_gen_len + 2, got "
         f"{c.max_caption_len} and {c.max_gen_len}"),
        (0 < c.mask_prob < 1 and 0 < c.caption_mask_prob < 1 and 0 <= c.pollute_prob <= 1,
         "need mask_prob and caption_mask_prob in (0, 1) and pollute_prob in [0, 1]"),
        (c.max_caption_masked >= 1 and c.beam_size >= 1 and c.length_penalty >= 0,
         "need max_caption_masked >= 1, beam_size >= 1 and length_penalty >= 0"),
        (c.batch_size >= 2 or c.task not in ("pretrain", "retrieval"),
         "pre-training and retrieval draw negatives from other examples: batch_size >= 2"),
        (c.max_positions >= 0 and c.contrast_classes >= 2 and c.region_layer_norm_eps > 0,
         "need max_positions >= 0, contrast_classes >= 2 and region_layer_norm_eps > 0"),
        (not c.scst or c.task == "caption", f"scst trains a captioner: it needs --task "
         f"caption, not {c.task}"),
        (c.scst_samples >= 1, f"scst_samples must be >= 1, not {c.scst_samples}")]
    return (encoder_problems(c, TASKS) + [message for ok, message in checks if not ok]
            + optimisation_problems(c) + statistics_problems(c))


def build_model(config: Config) -> Oscar:
    return Oscar(config)


def make_optimizer(model: Oscar, config: Config) -> torch.optim.Optimizer:
    """AdamW [Oscar §3, Implementation Details], weight decay on matrices only [code]."""
    return adamw(decay_groups(model, config.weight_decay), config, fused_for(model))


def after_optimizer_step(model: Oscar) -> None:
    """Nothing to do after an optimizer step for Oscar (CoCa clamps its temperature there)."""


# -- the released checkpoints of [code] (Oscar and VinVL): one folder each, pytorch_model.bin,
#    config.json (a BERT config plus img_feature_dim, use_img_layernorm, ...) and vocab.txt
#    (BERT-base-uncased: shared.tokenizer.Tokenizer.from_vocab_file)

RELEASE_MODELS = {  # the head tensors of each [code] model class -> our task
    "BertImgForPreTraining": "pretrain",  # cls.predictions + cls.seq_relationship
    "BertForImageCaptioning": "caption",  # cls.predictions (BertOnlyMLMHead)
    "ImageBertForSequenceClassification": "retrieval or vqa"}  # classifier, on the pooled [CLS]


def release_config(config_dict: dict, task: str, heads: dict) -> Config:
    """Our Config for a [code] config.json: BERT's sizes, the region input img_feature_dim =
    F + 6 (2054 = 2048 + 6 in every release), the region LayerNorm as use_img_layernorm says,
    the heads' sizes as their tensors say (heads: n_labels, contrast_classes, tied_decoder).
    Everything else is Config.paper()'s. Raises ValueError (one line) for what [code] runs and
    we do not build."""
    c = config_dict
    for key, want in (("hidden_act", "gelu"), ("type_vocab_size", 2), ("layer_norm_eps", 1e-12),
                      ("img_feature_type", "faster_r-cnn"),
                      ("position_embedding_type", "absolute")):
        if c.get(key, want) != want:
            raise ValueError(f"config.json has {key} {c[key]!r}; only {want!r} is built")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size", "img_feature_dim") if k not in c]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)} (not an Oscar config?)")
    if c["img_feature_dim"] <= BOX_DIM:
        raise ValueError(f"config.json's img_feature_dim {c['img_feature_dim']} leaves no "
                         f"feature before the {BOX_DIM} box numbers")
    answers = ()
    if task == "vqa":  # the labels live in the data folder ([code] trainval_ans2label.pkl);
        n = heads["n_labels"]  # config.json names them only if given as "answers"
        answers = tuple(c.get("answers") or (f"answer_{i}" for i in range(n)))
        if len(answers) != n:
            raise ValueError(f"config.json's answers are {len(answers)}, the classifier's {n}")
    return Config(
        hidden_size=c["hidden_size"], layers=c["num_hidden_layers"],
        heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        vocab_size=c["vocab_size"], dropout=c.get("hidden_dropout_prob", 0.1),
        max_positions=c.get("max_position_embeddings", 512),
        feature_dim=c["img_feature_dim"] - BOX_DIM, region_layer_norm=bool(
            c.get("use_img_layernorm")), region_layer_norm_eps=c.get("img_layer_norm_eps", 1e-12),
        tied_decoder=heads.get("tied_decoder", True),
        contrast_classes=heads.get("contrast_classes", 2), answers=answers, task=task)


def from_oscar(state_dict: dict, config_dict: dict) -> tuple[Config, dict]:
    """[code]'s released weights (pytorch_model.bin) and config.json -> (our Config, our state
    dict). The task comes from the heads found (RELEASE_MODELS); a classifier of 2 labels is
    retrieval (column 1 = match [code run_retrieval.py]) unless config.json's finetuning_task
    says VQA. The mapping [code: oscar/modeling/modeling_bert.py]:

        [code]                                    ours
        bert.embeddings.*, bert.encoder.layer.i.*,  encoder.text_embeddings, encoder.layers.i,
        bert.pooler.*                               encoder.pooler: shared.bert.hf_to_ours
        bert.embeddings.position_ids (if saved)     none: a constant 0 .. P - 1, checked
        bert.img_embedding (D, F + 6)               encoder.region_embedding: v = W [v' ; z]
        bert.LayerNorm (use_img_layernorm)          encoder.region_norm
        cls.predictions.transform.dense/LayerNorm   heads.mlm.transform.dense/norm
        cls.predictions.bias                        heads.mlm.bias
        cls.predictions.decoder.weight (V, D)       tied: a saved duplicate of the word
                                                    embeddings, checked equal and dropped;
                                                    untied (captioning): heads.mlm.decoder
        cls.predictions.decoder.bias (if saved)     a duplicate of cls.predictions.bias: dropped
        cls.seq_relationship (2 or 3, D)            heads.contrastive (contrast_classes)
        classifier (2 or A, D) ("linear")           heads.retrieval.classifier or
                                                    heads.vqa.classifier

    Every source tensor must be used and every tensor of our model set, with our shapes; else
    ValueError, one line, naming what is left over ([code]'s "mlp" classifier among them)."""
    from shared.bert import hf_to_ours  # imported where used, as the contract's other readers
    sd = {k.replace(".gamma", ".weight").replace(".beta", ".bias") if "LayerNorm" in k else k: v
          for k, v in state_dict.items()}  # very old checkpoints: LayerNorm gamma / beta
    if "classifier.weight" in sd:
        n_labels = sd["classifier.weight"].shape[0]  # (labels, D)
        vqa = "vqa" in str(config_dict.get("finetuning_task", "")) or n_labels != 2
        task, heads = ("vqa" if vqa else "retrieval"), {"n_labels": n_labels}
    elif "cls.predictions.bias" in sd:
        task = "pretrain" if "cls.seq_relationship.weight" in sd else "caption"
        decoder, words = (sd.get("cls.predictions.decoder.weight"),
                          sd.get("bert.embeddings.word_embeddings.weight"))
        heads = {"tied_decoder": decoder is None or (words is not None and torch.equal(
            decoder, words))}
        if task == "pretrain":
            heads["contrast_classes"] = sd["cls.seq_relationship.weight"].shape[0]  # (2|3, D)
    else:
        raise ValueError("no head found (cls.predictions, cls.seq_relationship or classifier):"
                         " not an Oscar or VinVL checkpoint?")
    config = release_config(config_dict, task, heads)
    with torch.device("meta"):  # names and shapes only, no memory
        wanted = {k: v.shape for k, v in Oscar(config).state_dict().items()}
    weights = ReleasedWeights("Oscar", sd, wanted, f" (task {task})")
    take, copy, ours, origin, used = (weights.take, weights.copy, weights.ours, weights.origin,
                                      weights.used)

    # the BERT encoder: shared.bert's one map of BERT's names (KeyError: the first one missing)
    bert = {k: v for k, v in sd.items() if k.startswith("bert.")}
    try:
        text = hf_to_ours(bert, config.layers)
    except KeyError as e:
        raise ValueError(f"the Oscar weights' encoder: {str(e).strip(chr(34) + chr(39))}"
                         ) from None
    by_tensor = {id(v): k for k, v in bert.items()}  # hf_to_ours hands back the same tensors
    for name, tensor in text.items():
        prefix = "encoder.text_" if name.startswith("embeddings.") else "encoder."
        ours[prefix + name], origin[prefix + name] = tensor, by_tensor[id(tensor)]
        used.add(by_tensor[id(tensor)])
    if "bert.embeddings.position_ids" in sd:  # a buffer newer BERT code saves: 0 .. P - 1
        ids = take("bert.embeddings.position_ids").flatten()
        if not torch.equal(ids, torch.arange(len(ids), dtype=ids.dtype)):
            raise ValueError("bert.embeddings.position_ids is not 0 .. P - 1")
    copy("encoder.region_embedding", "bert.img_embedding")  # (D, F + 6)
    if config.region_layer_norm:
        copy("encoder.region_norm", "bert.LayerNorm")
    if "mlm" in TASK_HEADS[task]:
        copy("heads.mlm.transform.dense", "cls.predictions.transform.dense")
        copy("heads.mlm.transform.norm", "cls.predictions.transform.LayerNorm")
        copy("heads.mlm", "cls.predictions", ("bias",))
        if not config.tied_decoder:  # (V, D): captioning without --tie_weights
            ours["heads.mlm.decoder"] = take("cls.predictions.decoder.weight")
        elif "cls.predictions.decoder.weight" in sd:  # equal to the word embeddings (above)
            take("cls.predictions.decoder.weight")
        if "cls.predictions.decoder.bias" in sd:
            if not torch.equal(take("cls.predictions.decoder.bias"), sd["cls.predictions.bias"]):
                raise ValueError("cls.predictions.decoder.bias differs from cls.predictions.bias")
    if task == "pretrain":
        copy("heads.contrastive", "cls.seq_relationship")
    if task in ("retrieval", "vqa"):
        copy(f"heads.{task}.classifier", "classifier")

    return config, weights.finish()


# the released weights each converter turns into this model (convert.py picks by these names):
# (source state dict, source config dict) -> (Config, our state dict)
CONVERTERS = {"oscar": from_oscar}


# --- 8. Data: the world's examples as triples ----------------------------------------------------

def region_inputs(example: dict, config: Config, statistics: tuple | None = None) -> Tensor:
    """A world example's first n_regions regions (stored order, [code]) as (n, F + 6) region
    vectors, features standardised with statistics = (mean, std) if given."""
    check_feature_size(example["features"], config.feature_dim)
    n = min(config.n_regions, len(example["features"]))
    features = torch.from_numpy(example["features"][:n]).float()  # (n, F)
    if statistics is not None:
        features = (features - statistics[0]) / statistics[1]
    return region_vectors(features, torch.from_numpy(example["boxes"][:n]).float())


class OscarDataset(Dataset):
    """Item p: the p-th visit of the stream (shared.data.Epochs; one unit per (image, text)
    pair: [code]'s corpora hold one line per caption or question) for config.task ([CLS]
    caption or question [SEP] tags [SEP] + regions; caption: two slots), every random choice a
    pure function of (seed, p), so the next epoch's visit of a pair draws its masks, polluted
    tags and negatives afresh; retrieval: items 2k, 2k + 1 = the k-th visit's aligned pair and
    its unaligned one [Oscar §4; code]. Pre-training pollutes the tags as `pollution` draws."""

    def __init__(self, source, tokenizer, config: Config, seed: int = 0):
        self.source, self.tokenizer, self.config, self.seed = source, tokenizer, config, seed
        scst = config.task == "caption" and config.scst  # a unit per image, as [code]'s SCST
        self.epochs = Epochs(source, seed, per_text=not scst)
        self.scst_reward = (ScstReward.from_source(source, tokenizer, config.max_gen_len - 1,
                                                   config.scst_df_images) if scst else None)
        self.per_visit = 2 if config.task == "retrieval" else 1  # a positive and its negative
        self.statistics = standardisation(config, source)
        self.answer_index = answer_index(config.answers)
        t = tokenizer  # corrupt draws its random ids from [lo, hi), past the special ids
        self.random_ids = (max(t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) + 1, t.vocab_size)

    def __len__(self) -> int:
        return self.per_visit * len(self.epochs)

    def _pieces(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special=False)

    def __getitem__(self, p: int) -> dict:
        c, source, tok = self.config, self.source, self.tokenizer
        k, negative = divmod(p, self.per_visit)  # retrieval: the k-th visit, which of its two
        (index, j), rng = self.epochs(k), np.random.default_rng([self.seed, 17, k])
        example = source.example(index)
        item = {"task": c.task, "regions": region_inputs(example, c, self.statistics)}
        text = pick_text(example["captions"], j, rng)
        if c.task == "vqa":  # the question takes the caption's place
            text, answers = pick_text(example["questions"], j, rng)
            item["answer_scores"] = torch.from_numpy(soft_scores(  # (A,)
                [answers] if isinstance(answers, str) else answers, self.answer_index))
        tags = tag_pieces(tok, example, c)
        if c.task == "pretrain":  # with pollute_prob, the tags are another image's (pollution)
            item["polluted"], item["source"], kind = pollution(c, index, len(source), rng)
            donor = source.example(item["source"]) if item["polluted"] else None  # q's (v's)
            if kind == "regions":
                item["regions"] = region_inputs(donor, c, self.statistics)
            elif kind == "caption":
                tags = self._pieces(donor["captions"][rng.integers(len(donor["captions"]))])
            elif kind == "tags":
                tags = tag_pieces(tok, donor, c)
        if c.task == "retrieval":  # "we randomly select a different image or a different
            item["is_match"] = not negative  # caption to form an unaligned pair" [Oscar §4]
            if negative:
                donor = source.example(other_image(index, len(source), rng))
                if rng.random() < 0.5:  # another caption, the image and its tags kept
                    text = donor["captions"][rng.integers(len(donor["captions"]))]
                else:  # another image, with its own tags
                    item["regions"] = region_inputs(donor, c, self.statistics)
                    tags = tag_pieces(tok, donor, c)
        if c.task == "caption":  # the caption slot and the tag slot [Oscar §4; code]
            caption = [tok.cls_id, *self._pieces(text)[:c.max_caption_len - 2], tok.sep_id]
            labels = [IGNORE] * len(caption)
            for p in caption_mask_positions(len(caption), rng, c.caption_mask_prob,
                                            c.max_caption_masked):
                labels[p], caption[p] = caption[p], corrupt(caption[p], rng, tok.mask_id,
                                                            self.random_ids)
            item["caption"], item["mlm_labels"] = torch.tensor(caption), torch.tensor(labels)
            item["tags"] = tag_slot(tags, c, tok.sep_id)
            item["tag_offset"] = c.max_caption_len  # the tags' first position id [code]
            if self.scst_reward is not None:  # the image's references, prepared for CIDEr-D
                item["references"] = self.scst_reward.references(example["captions"])
                item["scst_reward"] = self.scst_reward
            return item
        tokens, segments = text_pair(self._pieces(text), tags, c.text_len(), tok.cls_id,
                                     tok.sep_id)
        if c.task == "pretrain":  # L_MTL's input: words and tags masked
            maskable = [t not in (tok.cls_id, tok.sep_id) for t in tokens]
            tokens, labels = mask_tokens(tokens, maskable, rng, c.mask_prob, tok.mask_id,
                                         self.random_ids)
            item["mlm_labels"] = torch.tensor(labels)
        item["tokens"], item["segments"] = torch.tensor(tokens), torch.tensor(segments)
        item["positions"] = torch.arange(len(tokens))
        return item


def train_dataset(source, tokenizer, config: Config, seed: int = 0) -> OscarDataset:
    """The training items of config.task from a World or a shared.folders.RegionFolder."""
    return OscarDataset(source, tokenizer, config, seed)


def collate_fn(items: list[dict]) -> dict:
    """Items -> a batch: task, regions (B, N, F + 6), region_mask (B, N), tokens, segments,
    positions (B, T) (caption: T = caption slot C + tag slot, caption_len = C); mlm_positions
    (M,) into the flat B·T (B·C) text and mlm_targets (M,), found here on the CPU so the step
    never syncs; polluted (B,); is_match (B,); answer_scores (B, A) (shared.vqa.soft_scores)."""
    batch = {"task": items[0]["task"],
             "regions": pad_rows([it["regions"] for it in items]),  # (B, N, F + 6)
             "region_mask": pad_rows([torch.ones(len(it["regions"]), dtype=torch.bool)
                                      for it in items])}  # (B, N)
    if batch["task"] == "caption":
        caption = pad_sequences([it["caption"] for it in items])  # (B, C)
        tags = pad_sequences([it["tags"] for it in items])  # (B, L), L = 0 without tags
        (B, C), L = caption.shape, tags.shape[1]
        batch["tokens"] = torch.cat([caption, tags], dim=1)  # (B, C + L)
        batch["segments"] = torch.cat([torch.zeros_like(caption), torch.ones_like(tags)], 1)
        positions = torch.cat([torch.arange(C), items[0]["tag_offset"] + torch.arange(L)])
        batch["positions"], batch["caption_len"] = positions.expand(B, C + L), C  # (B, C + L)
    else:
        for key in ("tokens", "segments", "positions"):
            batch[key] = pad_sequences([it[key] for it in items])  # (B, T)
    if "mlm_labels" in items[0]:
        labels = pad_sequences([it["mlm_labels"] for it in items], IGNORE)  # (B, T) or (B, C)
        batch["mlm_positions"], batch["mlm_targets"] = flat_targets(labels)
    for key in ("polluted", "is_match"):
        if key in items[0]:
            batch[key] = torch.tensor([it[key] for it in items])  # (B,)
    if "answer_scores" in items[0]:
        batch["answer_scores"] = torch.stack([it["answer_scores"] for it in items])  # (B, A)
    if "references" in items[0]:  # SCST: B lists of strings, and the one reward object
        batch["references"] = [it["references"] for it in items]
        batch["scst_reward"] = items[0]["scst_reward"]
    return batch


def region_batch(examples: list[dict], config: Config, world_config, device) -> tuple:
    """The examples' region vectors (n, N, F + 6) and region_mask (n, N) on `device`."""
    statistics = standardisation(config, world_config)
    rows = [region_inputs(ex, config, statistics) for ex in examples]
    mask = pad_rows([torch.ones(len(r), dtype=torch.bool) for r in rows])
    return pad_rows(rows).to(device), mask.to(device)  # (n, N, F + 6), (n, N)


def pair_batch(tokenizer, config: Config, texts: list[str], images: list[int],
               examples: list[dict], regions: Tensor, region_mask: Tensor) -> dict:
    """The encoder's inputs (a batch) for b (text, image) pairs: [CLS] text [SEP] tags [SEP]
    with the tags of examples[image], and that image's rows of regions and region_mask."""
    rows = [text_pair(tokenizer.encode(text, add_special=False),
                      tag_pieces(tokenizer, examples[k], config), config.text_len(),
                      tokenizer.cls_id, tokenizer.sep_id) for text, k in zip(texts, images)]
    tokens = pad_sequences([torch.tensor(r[0]) for r in rows])  # (b, T)
    return {"tokens": tokens.to(regions.device),
            "segments": pad_sequences([torch.tensor(r[1]) for r in rows]).to(regions.device),
            "positions": torch.arange(tokens.shape[1]).expand_as(tokens).to(regions.device),
            "regions": regions[images], "region_mask": region_mask[images]}


# --- 9. Evaluation and inference -----------------------------------------------------------------

def retrieval_scores(model: Oscar, tokenizer, config: Config, examples: list[dict],
                     world_config=None, texts: list[str] | None = None,
                     chunk: int = 1024) -> Tensor:
    """The (n images, G texts) match_logits of every pair of n examples' images and `texts`
    (default: each example's first caption, G = n): n·G forward passes, `chunk` a call, as the
    official evaluation scores every pair [Oscar §4, Image-Text Retrieval; code]. On the CPU."""
    texts = [ex["captions"][0] for ex in examples] if texts is None else texts
    regions, region_mask = region_batch(examples, config, world_config, model_device(model))
    return pair_scores(lambda image, text: model.match_logits(pair_batch(
        tokenizer, config, [texts[t] for t in text.tolist()], image.tolist(), examples, regions,
        region_mask)), len(examples), len(texts), chunk)  # (n, G)


def answer_logits_fn(model: Oscar, tokenizer, config: Config, examples: list[dict],
                     world_config=None):
    """answer_logits(questions, image indices into examples) -> (b, A) logits over
    config.answers (shared.evaluate.vqa_metrics, shared.evaluate.predict_answers)."""
    regions, region_mask = region_batch(examples, config, world_config, model_device(model))
    return lambda questions, images: model.answer_logits(pair_batch(
        tokenizer, config, questions, images, examples, regions, region_mask))  # (b, A)


def answer_questions(model: Oscar, tokenizer, config: Config, examples: list[dict],
                     world_config=None) -> list[str]:
    """The predicted answer of every question of the examples (their "questions", in order):
    the highest-scoring of config.answers [Oscar §4, VQA] (shared.evaluate.answer_questions)."""
    return shared_answer_questions(model, answer_logits_fn, tokenizer, config, examples,
                                   world_config)


def caption(model: Oscar, tokenizer, config: Config, examples: list[dict], world_config=None,
            prompt: str = "", beam_size: int | None = None, cached: bool = True) -> list[str]:
    """Captions for the examples' images [Oscar §4, Image Captioning; code]: start from [CLS],
    append [MASK], read the next word at [MASK], append it, repeat to [SEP] or max_gen_len tokens
    ([CLS] included, [code]; end_unfinished); beam search (beam_size, Σ log p / len^α) or greedy (beam 1).
    world_config: the world whose feature statistics standardise the regions, where the config
    keeps none. No prompt: the caption always starts at [CLS] (a ValueError otherwise)."""
    if prompt:
        raise ValueError("Oscar's captions start at [CLS]: it continues no prompt")
    device = model_device(model)
    beam_size = config.beam_size if beam_size is None else beam_size
    regions, region_mask = region_batch(examples, config, world_config, device)
    tags = pad_sequences([tag_slot(tag_pieces(tokenizer, ex, config), config, tokenizer.sep_id)
                          for ex in examples]).to(device)  # (B, L)
    tag_positions = config.max_caption_len + torch.arange(tags.shape[1], device=device)
    states, real = model.context_states(tags, tag_positions, regions, region_mask)
    step = caption_step_fn(model, tokenizer, states, real, cached)
    prefix = torch.full((len(examples), 1), tokenizer.cls_id, dtype=torch.long, device=device)
    if beam_size == 1:
        out, _ = greedy(step, prefix, config.max_gen_len, tokenizer.sep_id, PAD_ID)
    else:
        out, _ = beam_search(step, prefix, config.max_gen_len, tokenizer.sep_id, beam_size,
                             config.length_penalty, pad_id=PAD_ID)
    out = end_unfinished(out, tokenizer.sep_id, config.max_gen_len)  # (B, T)
    return [text.lower() for text in tokenizer.decode_batch(out.cpu())]


def pretraining_accuracy(model: Oscar, tokenizer, config: Config, world, n: int,
                         chunk: int = 256) -> dict[str, float]:
    """On n items of a world split built as in training (seed 1): mtl_acc, the share of masked
    tokens predicted right; contrastive_acc, the share of items whose pollution is called."""
    device = model_device(model)
    dataset = OscarDataset(world, tokenizer, config, seed=1)
    right_tokens = n_tokens = right_items = 0
    for s in range(0, n, chunk):
        batch = collate_fn([dataset[i] for i in range(s, min(s + chunk, n))])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        token_logits, pair_logits = model.pretrain_logits(batch)  # (M, V), (B, 2)
        right_tokens += (token_logits.argmax(-1) == batch["mlm_targets"]).sum().item()
        n_tokens += len(batch["mlm_targets"])
        right_items += (pair_logits.argmax(-1).bool() == batch["polluted"]).sum().item()
    return {"mtl_acc": right_tokens / max(n_tokens, 1), "contrastive_acc": right_items / n}


@in_eval_mode
def evaluate(model: Oscar, tokenizer, config: Config, world_config, split: str,
             n: int) -> dict[str, float]:
    """The metrics of config.task on a world split:
    pretrain    i2t_r1/5/10, t2i_r1/5/10, r1_mean: zero-shot retrieval by the contrastive head
                among min(n, eval_pairs) images and ALL their captions (5 each, as the COCO 1K
                test ranks 5,000 captions [Oscar §4]; an image found if any of its captions
                ranks in the top K); mtl_acc, contrastive_acc on n items;
                own_called_polluted, foreign_caption_called_polluted: the share of true triples,
                and of triples with the next image's caption (own tags and regions), the head
                calls polluted, on each image's first caption (does it read the caption at
                all?)
    retrieval   the same recalls with the retrieval head
    caption     caption_truth (_baseline), cider, bleu4 on n images (caption_metrics)
    vqa         vqa_acc and vqa_acc_<type> over every question of n images"""
    if config.task == "caption":
        examples = world_examples(world_config, split, n)
        captions = caption_examples(lambda part: caption(model, tokenizer, config, part,
                                                         world_config), examples)
        return caption_metrics(captions, examples, tokenizer, config.max_gen_len - 1)
    if config.task == "vqa":
        examples = world_examples(world_config, split, n)
        return vqa_metrics(answer_logits_fn(model, tokenizer, config, examples, world_config),
                           examples, config.answers)
    examples = world_examples(world_config, split, min(n, config.eval_pairs))
    texts, text_image = all_captions(examples)  # (G,) each, G = 5n in the world
    scores = retrieval_scores(model, tokenizer, config, examples, world_config, texts)  # (n, G):
    #                         every image with every caption, n·G forward passes as [code]
    metrics = retrieval_metrics(scores, text_image)
    if config.task == "pretrain":
        from shared.world import World  # imported where read: importing oscar skips it
        world = World(world_config, split)
        metrics.update(pretraining_accuracy(model, tokenizer, config, world, min(n, len(world))))
        counts = torch.bincount(text_image, minlength=len(examples))  # (n,) captions an image
        first = counts.cumsum(0) - counts  # (n,) the column of each image's first caption
        k = torch.arange(len(examples))
        metrics["own_called_polluted"] = (scores[k, first] < 0).float().mean()
        metrics["foreign_caption_called_polluted"] = (
            scores[k, first[(k + 1) % len(k)]] < 0).float().mean()
    return metrics


@in_eval_mode
def sample_captions(model: Oscar, tokenizer, config: Config, world_config, split: str,
                    n: int) -> list[tuple[str, str]]:
    """(generated caption, first reference) for the first n images; [] unless task caption."""
    if config.task != "caption":
        return []
    return shared_sample_captions(lambda examples: caption(
        model, tokenizer, config, examples, world_config), world_config, split, n)
