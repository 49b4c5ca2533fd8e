"""UNITER: UNiversal Image-TExt Representation Learning, written from primitives.

    Yen-Chun Chen, Linjie Li, Licheng Yu, Ahmed El Kholy, Faisal Ahmed, Zhe Gan, Yu Cheng,
    Jingjing Liu. ECCV 2020; arXiv 1909.11740v3. Every `[UNITER ...]` tag cites that version:
    sections, equations (Eqs. 1-4 in §3.2, Eqs. 5-6 in §A.7), tables, footnotes (fn.), §A.

One Transformer reads a caption and an image's detector regions as one sequence; four kinds of
pre-training task teach it to relate the two [UNITER §3.1, Fig. 1]:

    [CLS] w1 .. wT [SEP] ------------------------> Text Embedder (word + position) --+
    each region: feature f (F), location p (7) --> Image Embedder (f and p) ---------+
                                                                                     |
             one bidirectional Transformer over [text ; regions]  <------------------+
               |               |                      |                  |
              MLM       MRFR / MRC / MRC-kl        ITM ([CLS])         WRA (OT between
         (text masked,   (regions masked,         (50 % of images      the text outputs and
          image whole)    text whole)              replaced)           the region outputs)

Masking is conditional: one modality is masked, the other seen whole; each mini-batch trains ONE
task [UNITER §3.1], drawn by a mix ratio [code]; WRA is added on ITM batches [code].

Paper map (part of the paper -> code):
    §3.1, fn. 3, 5   Image Embedder, 7-d location     region_locations, ImageEmbeddings
    §3.1, fn. 5   Text Embedder, one Transformer      UniterEncoder (shared.transformer's BERT)
    §3.1          conditional masking; the task mix   masked_modalities, mask_*; draw_task
    §3.2, Eq. 1   MLM                                 mlm_loss, UNITER.forward_mlm
    §3.2, Eq. 2   ITM                                 itm_loss, rank_score, UNITER.forward_itm
    §3.2, Eq. 3   WRA: OT with the cosine cost        wra_distance, wra_loss
                  ITM + WRA on one batch [code]       itm_wra_loss (the composite)
    §A.7, Eqs. 5-6, Alg. 1   OT, IPOT                 shared.ot.ipot (imported as uniter.ipot)
    §3.2, Eq. 4   MRM: MRFR, MRC, MRC-kl              mrfr_loss, mrc_loss, mrc_kl_loss, forward_mrm
    §4.1, §A.2    retrieval: triplet, hard negatives  rank_hinge_loss, UNITER.forward_rank
                  retrieval test: 5 captions an image retrieval_scores, evaluate
    §4.1, §A.2    VQA: BCE over the answers           task_heads, vqa_loss, UNITER.forward_vqa
    §4, fn. 12    UNITER-base; [code] the recipe      Config, Config.paper()

Model = UniterEncoder (the same tensors whatever the task) + `heads`, one small module per
task: pretrain = itm, mlm, mrfr, mrc (MRC and MRC-kl share it); retrieval = itm (the rank head
IS the pre-trained ITM head, so fine-tuning starts from it); vqa = vqa.

[code] = the official code (ChenRocks/UNITER 1dbfa62). `[paper ≠ code]` marks where the two
differ: switches for the Image Embedder and MRC-kl's scale (region_branch_norms, mrc_kl_scale);
tagged in place: ITM's and retrieval's negatives, MLM's 80/10/10, WRA, loss sums, region heads.

Left out, and why: the four image-text corpora and the Faster R-CNN (the synthetic world's regions
of shared/world.py instead: boxes, features, detector class probabilities); batches sized in
tokens (ours count examples); VCR, NLVR2, SNLI-VE, referring expressions (no such data here).

Shapes: B batch, T text tokens, N regions, D width, F region-feature size, V vocabulary,
C detector classes (background at 0), A answers. Masks over tokens or regions: True = real.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shared.losses import vqa_loss  # UNITER and Oscar share it
from shared.ot import ipot  # the IPOT solver [UNITER §A.7, Alg. 1]; WRA (below) is its use
from shared.transformer import (BertEmbeddings, BertPooler, HeadTransform, PostLNEncoderBlock,
                                TiedOutputHead, init_bert_weights, run_layer)

LOCATION_DIM = 7  # p = [x1, y1, x2, y2, w, h, w·h]  [UNITER §3.1, fn. 3]
PAD_ID = 0  # [PAD] of shared.tokenizer
IGNORE = -100  # the label of a word-piece that is not predicted (PyTorch's ignore_index)
PRETRAIN_TASKS = ("mlm", "itm", "mrfr", "mrc", "mrc_kl")  # one per update, by Config.mix_*


# --- 1. Config and presets ---------------------------------------------------------------------

@dataclass
class Config:
    """UNITER-base with the official all-data pre-training recipe. `[code]` = the official code,
    `OURS:` = not given by the paper or the code. Every field is a flag of train.py."""
    # the single-stream Transformer: BERT-base sizes [UNITER §4 fn. 12; code: uniter-base.json]
    hidden_size: int = 768  # D: the encoder's width
    layers: int = 12  # Transformer layers
    heads: int = 12  # attention heads, D / 64
    intermediate_size: int = 3072  # feed-forward width, 4·D
    dropout: float = 0.1  # [code]: every dropout, hidden and attention
    init_std: float = 0.02  # [code]: BERT's N(0, 0.02) for every Linear and Embedding weight
    vocab_size: int = 28_996  # [code]: bert-base-cased WordPiece (train.py resets it)
    max_text_len: int = 62  # [code] 60 pieces + [CLS], [SEP]; DEVIATION: longer texts cut (§8)
    # the Image Embedder's input: detector regions [UNITER §3.1; code]
    feature_dim: int = 2048  # F: Faster R-CNN (BUTD, ResNet-101) pooled ROI features
    n_regions: int = 100  # [code]: an image keeps its clip(#(conf > region_conf_threshold),
    #                       min_regions, n_regions) most confident regions
    min_regions: int = 10  # [code]: the fewest regions an image keeps (see n_regions)
    region_conf_threshold: float = 0.2  # [code]: conf = the detector's best object-class score
    n_region_classes: int = 1601  # C, [code]: 1600 Visual Genome classes + background at 0
    standardise_features: bool = False  # OURS: (f - mean) / std (feature_statistics); [code]: f
    feature_mean: tuple[float, ...] = ()  # OURS: with standardise_features on region files on
    feature_std: tuple[float, ...] = ()  # disk, their statistics (shared.data.standardisation)
    region_branch_norms: bool = False  # [paper ≠ code] False: [UNITER §3.1]'s LN(W_f f + W_p p +
    #   type); True: [code]'s LN(LN(W_f f) + LN(W_p p) + type) (ImageEmbeddings)
    # pre-training tasks [UNITER §3.2; code]
    mask_prob: float = 0.15  # [UNITER §3.2]: each word-piece (MLM) or region (MRM), i.i.d.
    itm_neg_prob: float = 0.5  # [code]: share of ITM pairs whose image is replaced
    mix_mlm: float = 4.0  # [code] all-data mix ITM 30 : MLM 40 : MRFR 20 : MRC-kl 20 of 110
    mix_itm: float = 3.0  # P(task of a mini-batch) = mix_task / Σ mix
    mix_mrfr: float = 2.0  # MRFR's share of that mix
    mix_mrc: float = 0.0  # [code]: hard-label MRC is in the code but no released config uses it
    mix_mrc_kl: float = 2.0  # MRC-kl's share of that mix
    mrc_kl_scale: str = "region"  # [paper ≠ code] "region": the KL of each masked region, as
    #   Eq. 4 sums; "element": [code]'s kl_div(...).mean() over regions × C = "region" / C
    wra_weight: float = 0.1  # [code]: ITM batches train CE + 0.1 · L_WRA
    ipot_beta: float = 0.5  # [code]: β of the IPOT proximal step [UNITER §A.7, Eq. 6]
    ipot_iters: int = 50  # [code]: outer IPOT iterations
    ipot_inner: int = 1  # [code]: k, scaling updates per outer iteration ("K = 1", Alg. 1)
    conditional_masking: bool = True  # [UNITER §3.1]; False = joint masking [UNITER Table 2]
    # downstream tasks [UNITER §4.1, §A.2; code]
    task: str = "pretrain"  # set from train.py --task: "pretrain" | "retrieval" | "vqa"
    hard_negatives: int = 31  # [code]: a query's best-scoring wrong candidates (forward_rank)
    rank_margin: float = 0.2  # [code]: hinge margin on sigmoid scores
    itm_score: str = "log_odds"  # the retrieval score (rank_score): "log_odds" = logit[match] -
    #   logit[no match] (OURS), "match_logit" = logit[match] alone ([code])
    vqa_head_lr_mult: float = 10.0  # [code]: the VQA head trains at 10x the learning rate
    answers: tuple[str, ...] = ()  # the VQA head's classes: () = the world's, or the answer
    #   vocabulary of a VQA v2 training set (shared.vqa.answer_vocabulary; 3,129 [UNITER §A.2])
    zero_regions: bool = False  # OURS: regions zeroed in training and evaluation: text-only
    eval_pairs: int = 1000  # retrieval among this many test images and ALL their captions
    #                          (5 each): Flickr30K's 1K test images, 5K captions [UNITER §A.2]
    # pre-training recipe [code pretrain-alldata-base-8gpu.json]; paper(task): each task's
    image_size: int = 224  # OURS: the world's render size (UNITER itself sees only regions)
    batch_size: int = 6144  # OURS: [code] batches by tokens, 8 GPUs × 10,240 × 6 accumulation
    #                         steps ≈ 492k tokens; at 60-100 tokens an example, 5k-8k examples
    lr: float = 5e-5  # [code]
    weight_decay: float = 0.01  # [code]
    beta1: float = 0.9  # [code]: AdamW (the paper names no pre-training optimizer)
    beta2: float = 0.98  # [code]
    warmup_steps: int = 10_000  # [code]
    max_steps: int = 200_000  # [code]: UNITER-base, all data
    lr_schedule: str = "linear"  # [code]: linear decay to 0 after warmup
    grad_clip: float = 5.0  # [code], but on the SUM of the accumulated gradients (paper())
    grad_accum_steps: int = 6  # [code]; gradient accumulation [UNITER §A.2]
    adam_eps: float = 1e-6  # [code] optim/adamw.py's default (torch's is 1e-8)
    grad_checkpointing: bool = False  # OURS: recompute activations in the backward (memory)
    train_single_object_prob: float = 0.0  # OURS: the world's train mix; 0 = uniform 1-4 objects

    def __post_init__(self):  # no answers given: the world's; then every problem at once (§7)
        self.answers = self.answers or world_answers()
        if problems := config_problems(self):
            raise ValueError("; ".join(problems))

    @classmethod
    def paper(cls, task: str = "pretrain") -> "Config":
        """UNITER-base [UNITER §4, fn. 12], the official recipe of `task`: PAPER_RECIPES (§7)."""
        if task not in PAPER_RECIPES:
            raise ValueError(f"no paper recipe for {task!r}: {', '.join(PAPER_RECIPES)}")
        return cls(mrc_kl_scale="element", task=task, **PAPER_RECIPES[task])

    @classmethod
    def small(cls) -> "Config":  # OURS: one GPU, hours, on the world's regions (§7)
        return cls(**world_preset("small"))

    @classmethod
    def tiny(cls) -> "Config":  # OURS: 2 CPU cores, minutes, on the world's regions (§7)
        return cls(**world_preset("tiny"))


# --- 2. Inputs: the Image Embedder -------------------------------------------------------------

def region_locations(boxes: Tensor, image_width: float, image_height: float) -> Tensor:
    """The 7-d location of each region that the Image Embedder reads [UNITER §3.1, fn. 3]:

        p = [x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)·(h/H)],   w = x2 - x1, h = y2 - y1

    Every entry is a fraction of the image, so all lie in [0, 1] (no centring, no log), and the
    last one is the box's share of the image area. Worked example: a 640 × 480 image (W × H) and
    the box (x1, y1, x2, y2) = (64, 120, 320, 360) in pixels, so w = 256 and h = 240:

        p = [64/640, 120/480, 320/640, 360/480, 256/640, 240/480, 0.4 · 0.5]
          = [0.1,    0.25,    0.5,     0.75,    0.4,     0.5,     0.2]

    The world's boxes are already divided by the image side: pass image_width = image_height = 1.

    boxes: (..., 4) as (x1, y1, x2, y2), x2 >= x1 and y2 >= y1. Returns (..., 7) floats."""
    boxes = torch.as_tensor(boxes)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4) as (x1, y1, x2, y2), "
                         f"got {tuple(boxes.shape)}")
    if not (image_width > 0 and image_height > 0):
        raise ValueError(f"image_width and image_height must be > 0, "
                         f"got {image_width} and {image_height}")
    if not boxes.is_floating_point():
        boxes = boxes.float()  # integer pixel boxes
    x1, y1, x2, y2 = boxes.unbind(-1)  # each (...)
    x1, x2 = x1 / image_width, x2 / image_width  # (...), fractions of W
    y1, y2 = y1 / image_height, y2 / image_height  # (...), fractions of H
    w, h = x2 - x1, y2 - y1  # (...)
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)  # (..., 7)


class ImageEmbeddings(nn.Module):
    """The Image Embedder [UNITER §3.1; code model/model.py]: region feature f (F) and
    7-d location p -> one D-wide input token per region:

        paper:  e = Dropout(LN( W_f f + W_p p + type[1] ))              branch_norms=False
        [code]: e = Dropout(LN( LN(W_f f) + LN(W_p p) + type[1] ))      branch_norms=True

    [paper ≠ code]: the paper sums "the two FC outputs and then [passes them] through a layer
    normalization" [UNITER §3.1], the modality embedding type[1] summed before it [UNITER §3.1,
    fn. 5] (row 1 of the text embedder's token-type table, passed in); [code] normalises each FC
    output first. No position embedding: the 7-d location is where a region is. Names: [code]
    img_linear, img_layer_norm, pos_linear, pos_layer_norm, mask_embedding row 1.

    DEVIATION from the paper, as [code]: a masked region's feature is replaced by zeros
    [UNITER §3.1, §3.2] plus a learned vector m, so its input is m; its location is kept."""

    def __init__(self, feature_dim: int, d_model: int, dropout: float = 0.1, eps: float = 1e-12,
                 branch_norms: bool = False):
        super().__init__()
        branch_norm = (lambda: nn.LayerNorm(d_model, eps=eps)) if branch_norms else nn.Identity
        self.feature = nn.Linear(feature_dim, d_model)  # W_f; also MRFR's output layer (tied)
        self.feature_norm = branch_norm()  # [code] only
        self.location = nn.Linear(LOCATION_DIM, d_model)  # W_p
        self.location_norm = branch_norm()  # [code] only
        self.mask_vector = nn.Parameter(torch.randn(feature_dim) * 0.02)  # m, BERT's N(0, 0.02)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: Tensor, locations: Tensor, region_type: Tensor,
                masked: Tensor | None = None) -> Tensor:
        """features (B, N, F), locations (B, N, 7), region_type (D,), masked (B, N) bool or
        None. Returns (B, N, D)."""
        if masked is not None:
            features = torch.where(masked[..., None], self.mask_vector.to(features.dtype),
                                   features)  # (B, N, F): masked rows -> m
        v = self.feature_norm(self.feature(features))  # (B, N, D)
        u = self.location_norm(self.location(locations))  # (B, N, D)
        return self.dropout(self.norm(v + u + region_type))  # (B, N, D)


# --- 3. The encoder: Text Embedder, Image Embedder, one Transformer ----------------------------

class UniterEncoder(nn.Module):
    """One BERT-style Transformer over [text ; regions] [UNITER §3.1], the same tensors whatever
    the task; `text_embeddings`, `layers`, `pooler` take BERT's weights (shared.bert). Text
    Embedder: LN(word + position + type[0]) [UNITER §3.1, fn. 5]; the pooler (Linear + tanh on
    [CLS]) feeds ITM and VQA. The sequence is [w_1..w_T (padded) ; r_1..r_N (padded)] with one
    key mask; [code] packs each example first ("gather_index"): less compute, same outputs."""

    def __init__(self, config: Config):
        super().__init__()
        c, D = config, config.hidden_size
        self.config = c
        self.text_embeddings = BertEmbeddings(c.vocab_size, D, max_positions=c.max_text_len,
                                              n_token_types=2, dropout=c.dropout, pad_id=PAD_ID)
        self.image_embeddings = ImageEmbeddings(c.feature_dim, D, c.dropout,
                                                branch_norms=c.region_branch_norms)
        self.layers = nn.ModuleList(PostLNEncoderBlock(D, c.heads, c.intermediate_size,
                                                       c.dropout) for _ in range(c.layers))
        self.pooler = BertPooler(D)

    def forward(self, tokens: Tensor, features: Tensor, locations: Tensor, region_mask: Tensor,
                region_masked: Tensor | None = None) -> Tensor:
        """tokens (B, T), features (B, N, F), locations (B, N, 7), region_mask (B, N) bool
        (True = a real region), region_masked (B, N) bool or None (MRM). Returns the final
        hidden states (B, T + N, D): text first, then regions."""
        if self.config.zero_regions:  # the text-only baseline: the image carries nothing
            features, locations = torch.zeros_like(features), torch.zeros_like(locations)
        text = self.text_embeddings(tokens)  # (B, T, D), segment 0
        region_type = self.text_embeddings.token_type.weight[1]  # (D,), segment 1
        image = self.image_embeddings(features, locations, region_type, region_masked)  # (B, N, D)
        x = torch.cat([text, image], dim=1)  # (B, T + N, D)
        allowed = torch.cat([tokens != PAD_ID, region_mask], dim=1)[:, None, :]  # (B, 1, T + N)
        for layer in self.layers:  # every token sees every real token
            x = run_layer(layer, x, allowed,
                          checkpointed=self.config.grad_checkpointing)  # (B, T + N, D)
        return x


# --- 4. Objectives [UNITER §3.2, Eqs. 1-4; §4.1] -----------------------------------------------
# Pure functions of tensors; region losses average over the `masked` regions (none masked: 0, not
# NaN); logits are cast to fp32. [paper ≠ code]: Eqs. 1 and 4 sum over a pair's masked words or
# regions; [code] and we average (no switch: [code]'s recipe was tuned on means).

def _masked_mean(values: Tensor, masked: Tensor) -> Tensor:
    """Mean of `values` (...) over the entries where `masked` (...) is True; 0 if there are none."""
    masked = masked.to(values.dtype)  # (...)
    return (values * masked).sum() / masked.sum().clamp(min=1)  # ()


def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Masked language modelling [UNITER §3.2, Eq. 1]: predict each masked word-piece from the
    other words and the whole image (conditional masking: no MLM batch masks the image).

        L_MLM = -E log P_θ(w_m | w_\\m, v)  ≈  -(1/M) Σ_{m masked} log P_θ(w_m | w_\\m, v)

        symbol          variable                           shape
        P_θ(· | ...)    softmax(logits[b, t])              (B, T, V)  (or any (..., V))
        w_m             labels[b, t] where != ignore_index (B, T)
        M               number of labelled positions       ()

    [paper ≠ code]: Eq. 1's log P_θ of a pair's masked words sums over them; [code] and we
    average over the batch's masked word-pieces. [code]'s labels use -1 for "not masked", ours
    PyTorch's -100. Nothing labelled gives 0."""
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1),
                          ignore_index=ignore_index, reduction="none")  # (B·T,), 0 where ignored
    return _masked_mean(nll, labels.reshape(-1) != ignore_index)  # ()


def itm_loss(logits: Tensor, is_match: Tensor) -> Tensor:
    """Image-text matching [UNITER §3.2, Eq. 2]: does this caption describe this image? The score
    comes from the [CLS] output (the pooler and the Linear(D, 2) are the model's).

        L_ITM = -(1/B) Σ_b [ y_b log s_b + (1 - y_b) log(1 - s_b) ],   s_b = softmax(z_b)_1

        symbol   variable              shape
        z_b      logits[b]             (B, 2): column 1 = "match", column 0 = "no match"
        y_b      is_match[b]           (B,) bool or 0/1

    The paper's FC layer + sigmoid; [code]'s 2-way softmax, which we follow, is the same binary
    cross-entropy because softmax(z)_1 = sigmoid(z_1 - z_0).
    """
    return F.cross_entropy(logits.float(), is_match.long())  # ()


def rank_score(itm_logits: Tensor, kind: str = "log_odds") -> Tensor:
    """The retrieval score of each (text, image) pair from the ITM head's logits (B, 2) -> (B,),
    zero-shot and as the rank head of `--task retrieval`.

    "log_odds": z_1 - z_0, the argument of the paper's sigmoid s_θ(w, v) [UNITER §3.2, Eq. 2]:
        it ranks exactly as the probability of "match" and ignores what both logits share,
        which the 2-way softmax (and so ITM) never sees. DEVIATION (OURS): [code]'s rank head
        is row 1 alone, not the difference of the rows (reference/uniter.md).
    "match_logit": z_1 alone, [code]'s zero-shot score and rank head."""
    if kind == "match_logit":
        return itm_logits[:, 1]  # (B,)
    return itm_logits[:, 1] - itm_logits[:, 0]  # (B,)


def wra_distance(text_hidden: Tensor, region_hidden: Tensor, text_mask: Tensor,
                 region_mask: Tensor, beta: float = 0.5, iters: int = 50, k: int = 1) -> Tensor:
    """The OT distance between each example's text outputs and region outputs
    [UNITER §3.2, Eq. 3], its plan by IPOT [UNITER §A.7, Eq. 6, Alg. 1]:

        d_b = Σ_ij C_ij T_ij,   C_ij = 1 - cos(x_i, y_j),   T = ipot(C), held constant

        symbol   variable                                 shape
        x_i      text_hidden[b, i] (final layer)          (B, T, D), [CLS] and [SEP] included
        y_j      region_hidden[b, j] (final layer)        (B, N, D)
        C        cost, 0 on padded pairs                  (B, T, N), in [0, 2]
        T        ipot(C.detach(), ...)                    (B, T, N), no gradient
        d_b      the returned distance                    (B,), in [0, 2]

    The marginals a, b of Eq. 3 are uniform over the real tokens and regions [code]. As [code]:
    the costs are computed in fp32 (also under bf16 autocast) and the plan is a constant, so the
    gradient reaches the hidden states only through C: ∂d/∂C = T. Returns (B,) in fp32.
    """
    with torch.autocast(text_hidden.device.type, enabled=False):  # else x @ y would be bf16
        x = F.normalize(text_hidden.float(), dim=-1, eps=1e-5)  # (B, T, D), unit rows; eps: [code]
        y = F.normalize(region_hidden.float(), dim=-1, eps=1e-5)  # (B, N, D)
        real_pair = text_mask[:, :, None] & region_mask[:, None, :]  # (B, T, N)
        cost = (1.0 - x @ y.transpose(1, 2)).masked_fill(~real_pair, 0.0)  # (B, T, N): 1 - cos
    plan = ipot(cost.detach(), text_mask, region_mask, beta, iters, k)  # (B, T, N), constant
    return (cost * plan).sum(dim=(1, 2))  # (B,)


def wra_loss(text_hidden: Tensor, region_hidden: Tensor, text_mask: Tensor, region_mask: Tensor,
             is_match: Tensor, beta: float = 0.5, iters: int = 50, k: int = 1) -> Tensor:
    """Word-region alignment [UNITER §3.2, Eq. 3; code]: on an ITM batch, pull the words and
    regions of matched pairs together and push those of mismatched pairs apart by OT distance:

        L_WRA = (1/n) ( Σ_{b: y_b = 1} d_b  -  Σ_{b: y_b = 0} d_b )

        symbol   variable                                           shape
        d_b      wra_distance(text_hidden, region_hidden, ...)[b]   (B,), in [0, 2]
        y_b      is_match[b]                                        (B,) bool or 0/1
        n        B, positives and negatives together                ()

    The sign: minimising L_WRA lowers d for matched pairs and raises it for mismatched ones. So
    L_WRA lies in [-2, 2] and can be negative; there is no margin or hinge (d <= 2 bounds the
    push). [paper ≠ code]: Eq. 3's L_WRA is the OT distance of a (w, v) pair, minimised, as a
    task of its own [UNITER §3.1]: nothing pushes mismatched pairs apart; which pairs and what
    normaliser are unstated (AMBIGUITY, so no switch). We follow [code]: ITM's batch, positives
    minus negatives, over the whole batch n = n_pos + n_neg.
    """
    d = wra_distance(text_hidden, region_hidden, text_mask, region_mask, beta, iters, k)  # (B,)
    sign = is_match.bool().to(d.dtype) * 2 - 1  # (B,): +1 matched, -1 mismatched
    return (sign * d).sum() / d.shape[0]  # ()


def itm_wra_loss(itm: Tensor, wra: Tensor | None, wra_weight: float) -> Tensor:
    """The loss of an ITM batch [code]: L = L_ITM + λ · L_WRA, both over every pair of the batch;
    itm = L_ITM (itm_loss), wra = L_WRA (wra_loss; None if λ = 0), λ = wra_weight (0.1); all ().
    DEVIATION from the paper (one objective per update [UNITER §3.1]), as [code]."""
    return itm if wra is None else itm + wra_weight * wra  # ()


def mrfr_loss(predicted: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Masked region feature regression [UNITER §3.2, Eq. 4, MRFR]: regress each masked region's
    detector feature from the text and the other regions.

        L_MRFR = (1/(M·F)) Σ_{i masked} || h_θ(v_i) - r(v_i) ||²

        symbol     variable                          shape
        h_θ(v_i)   predicted[b, n]                   (B, N, F)
        r(v_i)     target[b, n]: the input feature   (B, N, F), copied before masking
        M          masked.sum()                      ()

    [paper ≠ code]: the paper sums the squared L2 norms over the M masked regions; [code] (and
    we) average the squared error over the M regions and the F dimensions (an element-wise MSE
    over the masked rows). h_θ's last layer is the Image Embedder's feature Linear (D <- F)
    used transposed, the same Parameter object, with its own zero bias [code]."""
    squared_error = (predicted.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return _masked_mean(squared_error, masked)  # ()


def mrc_loss(logits: Tensor, detector_probs: Tensor, masked: Tensor) -> Tensor:
    """Masked region classification [UNITER §3.2, Eq. 4, MRC]: predict the detector's most
    likely object class of each masked region, a hard label.

        L_MRC = -(1/M) Σ_{i masked} log softmax(g_θ(v_i))[c_i]
        c_i   = 1 + argmax_{c >= 1} p̃(v_i)_c        (the best object class, never background)

        symbol     variable                      shape
        g_θ(v_i)   logits[b, n]                  (B, N, C)
        p̃(v_i)     detector_probs[b, n]          (B, N, C): detector softmax, background at 0
        M          masked.sum()                  ()

    [paper ≠ code]: the paper sums over the M masked regions; [code] (and we) average. As
    [code], background (class 0) is left out of the argmax, so it is never a target even where
    the detector thinks it most likely; the model still has a background logit."""
    C = logits.shape[-1]
    target = detector_probs[..., 1:].argmax(dim=-1) + 1  # (B, N): best object class, never 0
    nll = F.cross_entropy(logits.reshape(-1, C).float(), target.reshape(-1),
                          reduction="none")  # (B·N,)
    return _masked_mean(nll, masked.reshape(-1))  # ()


def mrc_kl_loss(logits: Tensor, detector_probs: Tensor, masked: Tensor,
                scale: str = "region") -> Tensor:
    """Masked region classification with KL-divergence [UNITER §3.2, Eq. 4, MRC-kl]: match the
    detector's whole class distribution instead of its argmax.

        L_MRC-kl = (1/M) Σ_{i masked} KL(p̃(v_i) ‖ softmax(g_θ(v_i)))          scale "region"
                 = (1/M) Σ_{i masked} Σ_c t_c (log t_c - log p_c),   0 · log 0 := 0
        L_MRC-kl / C                                                         scale "element"

        symbol     variable                                shape
        t_c        detector_probs[b, n, c]                 (B, N, C), background included
        log p_c    log_softmax(logits[b, n])_c             (B, N, C)
        M, C       masked.sum(), the classes (1601)        ()

    [paper ≠ code]: the paper sums the KL over the M masked regions; [code]'s kl_div(...).mean()
    averages over the M × C entries ("element", paper()); "region" (tiny, small) does not shrink
    with C. With one task an update, shared AdamW moments and clipping, the scale sets how hard
    MRC-kl pulls on the encoder, not only the loss value."""
    t = detector_probs.float()  # (B, N, C)
    log_p = logits.float().log_softmax(dim=-1)  # (B, N, C)
    kl = (torch.xlogy(t, t) - t * log_p).sum(dim=-1)  # (B, N): Σ_c t (log t - log p)
    return _masked_mean(kl, masked) / {"region": 1, "element": t.shape[-1]}[scale]  # ()


def rank_hinge_loss(positive: Tensor, negative: Tensor, margin: float = 0.2,
                    valid: Tensor | None = None) -> Tensor:
    """Retrieval fine-tuning [UNITER §4.1: "maximize the margin ... through triplet loss";
    code model/itm.py]: a hinge on sigmoid scores, so that each true pair beats each of its
    negatives by the margin:

        L_rank = mean_{b, k} max(0, margin + σ(s_neg[b, k]) - σ(s_pos[b]))

        symbol     variable           shape
        s_pos[b]   positive[b]        (B,): the score of query b's true pair
        s_neg      negative[b, k]     (B, K): its K negatives (other images or captions)

    The sigmoid bounds every score to (0, 1), so a margin of 0.2 is on a fixed scale. valid
    (B, K) bool, if given, keeps only those terms in the mean (a batch with too few other
    images to fill K negatives)."""
    gap = margin + torch.sigmoid(negative.float()) - torch.sigmoid(positive.float())[:, None]
    if valid is None:
        return gap.clamp(min=0).mean()  # ()
    return (gap.clamp(min=0) * valid).sum() / valid.sum().clamp(min=1)  # ()


# --- 5. The model: the encoder and one head per task -------------------------------------------

def task_heads(config: Config) -> nn.ModuleDict:
    """The heads of config.task [code]. "itm" is one Linear(D, 2) (itm_output, column 1 =
    "match") in pre-training and retrieval alike, so retrieval fine-tuning starts from it."""
    c, D = config, config.hidden_size
    heads = nn.ModuleDict()
    if c.task in ("pretrain", "retrieval"):
        heads["itm"] = nn.Linear(D, 2)  # (B, D) pooled [CLS] -> (B, 2)  [UNITER §3.2, Eq. 2]
    if c.task == "pretrain":
        heads["mlm"] = TiedOutputHead(D, c.vocab_size)  # (M, D) -> (M, V), the word embeddings
        heads["mrfr"] = TiedOutputHead(D, c.feature_dim)  # (M, D) -> (M, F), W_f transposed
        heads["mrc"] = nn.Sequential(HeadTransform(D), nn.Linear(D, c.n_region_classes))
        #   (M, D) -> (M, C), shared by MRC and MRC-kl  [UNITER §3.2, Eq. 4]. [paper ≠ code]:
        #   MRFR's h_θ and MRC's scores are each "an FC layer" [UNITER §3.2]; [code]
        #   (model/pretrain.py RegionFeatureRegression, RegionClassification) puts a transform
        #   (Linear, GELU, LN: HeadTransform) first. We follow [code]: its heads convert
    if c.task == "vqa":  # an MLP on the pooled [CLS] [UNITER §4.1]; [code] model/vqa.py
        heads["vqa"] = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(),
                                     nn.LayerNorm(2 * D, eps=1e-12),
                                     nn.Linear(2 * D, len(c.answers)))  # (B, D) -> (B, A)
    return heads


class UNITER(nn.Module):
    """UniterEncoder + the heads of config.task (task_heads). forward(batch) trains the task of
    batch["task"]: mlm, mrfr, mrc, mrc_kl, itm (pretrain), retrieval or vqa."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.encoder = UniterEncoder(config)
        self.heads = task_heads(config)
        self.apply(lambda m: init_bert_weights(m, config.init_std))  # [code]: BERT's init
        nn.init.normal_(self.encoder.image_embeddings.mask_vector, std=config.init_std)

    def encode_batch(self, batch: dict, region_masked: Tensor | None = None) -> Tensor:
        return self.encoder(batch["tokens"], batch["features"], batch["locations"],
                            batch["region_mask"], region_masked)  # (B, T + N, D)

    def match_score(self, tokens: Tensor, features: Tensor, locations: Tensor,
                    region_mask: Tensor) -> Tensor:
        """rank_score (config.itm_score) of each (text, image) row. (B,)"""
        h = self.encoder(tokens, features, locations, region_mask)  # (B, T + N, D)
        return rank_score(self.heads["itm"](self.encoder.pooler(h)), self.config.itm_score)

    def answer_logits(self, tokens: Tensor, features: Tensor, locations: Tensor,
                      region_mask: Tensor) -> Tensor:
        """(B, A) logits over config.answers."""
        h = self.encoder(tokens, features, locations, region_mask)  # (B, T + N, D)
        return self.heads["vqa"](self.encoder.pooler(h))  # (B, A)

    def forward(self, batch: dict) -> dict:
        """One task's batch -> {"loss": scalar, <task>: scalar, ...}; batch["task"] picks it."""
        task = batch["task"]
        if task in ("mrfr", "mrc", "mrc_kl"):
            return self.forward_mrm(batch, task)
        return {"mlm": self.forward_mlm, "itm": self.forward_itm, "retrieval": self.forward_rank,
                "vqa": self.forward_vqa}[task](batch)

    def forward_mlm(self, batch: dict) -> dict:
        """[UNITER §3.2, Eq. 1]: the masked word-pieces, gathered by the collate's flat positions
        (so the step has no data-dependent shape and no host-device sync)."""
        T = batch["tokens"].shape[1]
        h = self.encode_batch(batch, batch.get("region_masked"))  # joint masking: both masked
        hidden = h[:, :T].flatten(0, 1).index_select(0, batch["mlm_positions"])  # (M, D)
        logits = self.heads["mlm"](hidden, self.encoder.text_embeddings.word.weight)  # (M, V)
        loss = mlm_loss(logits, batch["mlm_targets"])
        return {"loss": loss, "mlm": loss}

    def forward_mrm(self, batch: dict, task: str) -> dict:
        """[UNITER §3.2, Eq. 4]: MRFR, MRC or MRC-kl on the masked regions' outputs."""
        T = batch["tokens"].shape[1]
        h = self.encode_batch(batch, batch["region_masked"])  # (B, T + N, D)
        hidden = h[:, T:].flatten(0, 1).index_select(0, batch["mrm_positions"])  # (M, D)
        every = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)  # (M,)
        if task == "mrfr":
            # the output layer IS the Image Embedder's W_f (D x F), transposed: (M, D) -> (M, F)
            weight = self.encoder.image_embeddings.feature.weight.t()  # (F, D)
            loss = mrfr_loss(self.heads["mrfr"](hidden, weight), batch["mrfr_targets"], every)
        else:
            logits = self.heads["mrc"](hidden)  # (M, C)
            loss = (mrc_loss(logits, batch["mrc_targets"], every) if task == "mrc" else
                    mrc_kl_loss(logits, batch["mrc_targets"], every, self.config.mrc_kl_scale))
        return {"loss": loss, task: loss}

    def forward_itm(self, batch: dict) -> dict:
        """[UNITER §3.2, Eq. 2] on the pooled [CLS], plus wra_weight · WRA [UNITER §3.2, Eq. 3]
        on the same forward pass's outputs (every text token, [CLS] and [SEP] included, and
        every region): itm_wra_loss."""
        c, T = self.config, batch["tokens"].shape[1]
        h = self.encode_batch(batch)  # (B, T + N, D)
        loss_itm = itm_loss(self.heads["itm"](self.encoder.pooler(h)), batch["is_match"])
        loss_wra = None if c.wra_weight == 0 else wra_loss(
            h[:, :T], h[:, T:], batch["tokens"] != PAD_ID, batch["region_mask"],
            batch["is_match"], c.ipot_beta, c.ipot_iters, c.ipot_inner)
        out = {"loss": itm_wra_loss(loss_itm, loss_wra, c.wra_weight), "itm": loss_itm}
        return out if loss_wra is None else {**out, "wra": loss_wra}

    def forward_rank(self, batch: dict) -> dict:
        """Retrieval fine-tuning with hard negatives. [paper ≠ code]: the paper trains each
        positive against 2 random negatives, its text and its image replaced [UNITER §4.1,
        §A.2], and for Table 3 also 2 hard ones, drawn from the top 20 of 128 random candidates
        re-scored every N steps [UNITER §A.2]; [code] (train_itm_hard_negatives.py, -hn configs)
        scores each query against 399 random candidates at every step (eval mode, no gradient)
        and trains the hinge on the 31 best-scoring wrong ones, no random ones. We follow [code].
        DEVIATION: the candidates are the batch's other B - 1 examples, the hard_negatives best
        of them in each direction. A candidate of the query's own image (another of its
        captions: a corpus is read one pair at a time) is a true pair, never a negative."""
        tokens, features = batch["tokens"], batch["features"]
        locations, region_mask = batch["locations"], batch["region_mask"]
        B = tokens.shape[0]
        k = min(self.config.hard_negatives, B - 1)
        if k < 1:
            raise ValueError("retrieval fine-tuning needs at least 2 pairs a batch")

        def score_pairs(t: Tensor, i: Tensor) -> Tensor:  # (text t[p], image i[p]) -> (P,)
            chunks = zip(t.split(1024), i.split(1024))  # 1024 pairs a call
            return torch.cat([self.match_score(tokens[a], features[b], locations[b],
                                               region_mask[b]) for a, b in chunks])
        was_training = self.training
        self.eval()
        with torch.no_grad():
            grid = torch.arange(B, device=tokens.device)
            scores = score_pairs(grid.repeat(B), grid.repeat_interleave(B)).view(B, B)
            #   (B images, B texts): pair p = (text p % B, image p // B)
            same = batch["image_ids"][:, None] == batch["image_ids"][None, :]  # (B, B)
            scores.masked_fill_(same, -torch.inf)  # the true pairs are not negatives
            hard_images = scores.topk(k, dim=0).indices.T  # (B texts, k): best wrong images
            hard_texts = scores.topk(k, dim=1).indices  # (B images, k): best wrong texts
            # False where a row had fewer than k other images and topk took a true pair
            wrong = torch.cat([~same[hard_images, grid[:, None]], ~same.gather(1, hard_texts)],
                              dim=1)  # (B, 2k)
        self.train(was_training)
        positive = self.match_score(tokens, features, locations, region_mask)  # (B,)
        texts = grid.repeat_interleave(k)  # (B·k,): text b, k times
        images = hard_images.reshape(-1)  # (B·k,)
        negative_images = score_pairs(texts, images).view(B, k)  # (B, k)
        negative_texts = score_pairs(hard_texts.reshape(-1), texts).view(B, k)  # (B, k)
        loss = rank_hinge_loss(positive, torch.cat([negative_images, negative_texts], dim=1),
                               self.config.rank_margin, wrong)
        return {"loss": loss, "rank": loss}

    def forward_vqa(self, batch: dict) -> dict:
        """VQA as classification over the answers [UNITER §4.1] with a binary cross-entropy on
        their soft scores [UNITER §A.2], from the pooled [CLS] of [question ; regions]."""
        logits = self.heads["vqa"](self.encoder.pooler(self.encode_batch(batch)))  # (B, A)
        loss = vqa_loss(logits, batch["answer_scores"])
        return {"loss": loss, "vqa": loss}


# --- 6. The paper's sampling: conditional masking, the task sampler ----------------------------
# Pure functions of a numpy Generator (each draw of the data is a function of (seed, i)), applied
# by UniterDataset (§8), which also draws ITM's negative images (negative_index).

def draw_task(config: Config, update: int, seed: int = 0) -> str:
    """The pre-training task of optimizer update `update`: "we randomly sample one task for each
    mini-batch, and train on only one objective per SGD update" [UNITER §3.1]; task k with
    probability mix_k / Σ mix [code: MetaLoader]. Every micro-batch of an update asks with the
    same `update`, so one update trains one task; ITM batches also train WRA (itm_wra_loss)."""
    mix = np.array([config.mix_mlm, config.mix_itm, config.mix_mrfr, config.mix_mrc,
                    config.mix_mrc_kl], dtype=np.float64)  # (5,), in PRETRAIN_TASKS order
    u = np.random.default_rng([seed, 5, update]).random()  # one uniform in [0, 1)
    k = int(np.searchsorted(np.cumsum(mix) / mix.sum(), u, side="right"))
    return PRETRAIN_TASKS[min(k, len(PRETRAIN_TASKS) - 1)]


def masked_modalities(task: str, conditional: bool = True) -> tuple[bool, bool]:
    """Which modalities a pre-training item masks, (words, regions). Conditional masking
    [UNITER §3.1]: "each time we only mask one modality while keeping the other modality
    intact", the one its task predicts: mlm -> (True, False), mrfr / mrc / mrc_kl -> (False,
    True). conditional=False is joint random masking ([UNITER Table 2] line 12): MLM and MRM
    items mask both (each still trains its own loss). ITM and the downstream tasks mask nothing."""
    mrm = task in ("mrfr", "mrc", "mrc_kl")
    if task != "mlm" and not mrm:
        return False, False
    return task == "mlm" or not conditional, mrm or not conditional


def mask_words(tokens: list[int], rng: np.random.Generator, mask_prob: float, mask_id: int,
               random_ids: tuple[int, int], special_ids: set) -> tuple[list[int], list[int]]:
    """MLM masking of one caption [UNITER §3.2, fn. 7; code data/mlm.py]:

    each word-piece (never [CLS], [SEP] or another special token) is picked with probability
    mask_prob (15 %); a picked one becomes [MASK] 80 % of the time, a random word-piece drawn
    uniformly from random_ids = [lo, hi) 10 %, and stays itself 10 %. If nothing was picked, the
    first word-piece becomes [MASK], so every caption has something to predict [code].

    AMBIGUITY: §3.2's text replaces the masked words "with special token [MASK]"; its fn. 7
    splits them 80/10/10 "following BERT", as [code] (data/mlm.py random_word) and we do.

    Returns (inputs, labels): labels hold the original id at picked positions, IGNORE elsewhere."""
    inputs, labels = list(tokens), [IGNORE] * len(tokens)
    words = [t for t, token in enumerate(tokens) if token not in special_ids]
    picked = [t for t in words if rng.random() < mask_prob]
    if not picked and words:
        picked, forced = [words[0]], True  # [code]: the forced one is always [MASK]
    else:
        forced = False
    for t in picked:
        labels[t] = tokens[t]
        u = 0.0 if forced else rng.random()
        if u < 0.8:
            inputs[t] = mask_id
        elif u < 0.9:
            inputs[t] = int(rng.integers(*random_ids))
    return inputs, labels


def mask_regions(n: int, rng: np.random.Generator, mask_prob: float) -> np.ndarray:
    """MRM masking of one image's n regions [UNITER §3.2, Eq. 4; code data/mrm.py]: each region
    i.i.d. with probability mask_prob (15 %), and one at random if none was picked [code].
    Returns (n,) bool. The model replaces a masked region's feature by a learned mask vector
    (ImageEmbeddings); its location is never masked."""
    masked = rng.random(n) < mask_prob  # (n,)
    if n and not masked.any():
        masked[rng.integers(n)] = True
    return masked


# ===== below: train.py's contract, not in the paper =====

from torch.utils.data import Dataset

from shared.checkpoint import converted_state
from shared.config import encoder_problems, optimisation_problems
from shared.data import (Epochs, RecentExamples, check_feature_size, flat_targets, model_device,
                         pad_rows, pad_sequences, pick_text, standardisation,
                         statistics_problems)
from shared.distributed import world_size
from shared.evaluate import answer_questions as shared_answer_questions
from shared.evaluate import (all_captions, in_eval_mode, retrieval_metrics, vqa_metrics,
                             world_examples)
from shared.optim import adamw, fused_for
from shared.vqa import answer_index, soft_scores, world_answers


# --- 7. The contract: tasks, config checks, the world's presets, model and optimizer -----------

TASKS = ("pretrain", "retrieval", "vqa")  # train.py --task
MAIN_METRIC = {"pretrain": "r1_mean", "retrieval": "r1_mean", "vqa": "vqa_acc"}  # best.pt
INPUTS = "regions"  # detector regions, not pixels
# --init_bert fills model.encoder, and the MLM head from BERT's [code: from BERT-base]
BERT_INIT = {"mlm": "cls.predictions"}
UNUSED_PARAMETERS = True  # one pre-training task an update: the other heads get no gradient
PROTOCOLS = {"pretrain": ("retrieval",), "retrieval": ("retrieval",),  # by task, what data on
             "vqa": ("vqa",)}  # disk evaluates (shared.benchmarks)
CROSS_ENCODER = True  # retrieval_scores runs the model on every (image, text) pair


def config_problems(c: Config) -> list[str]:
    """Every problem with a Config, one line each ([] = none; Config.__post_init__ raises them
    as one ValueError): the encoder and task fields (shared.config), UNITER's own, the
    optimisation fields and the feature statistics (shared.data)."""
    mix = (c.mix_mlm, c.mix_itm, c.mix_mrfr, c.mix_mrc, c.mix_mrc_kl)
    checks = [  # (fine, what to say otherwise)
        (c.max_text_len >= 3,
         f"max_text_len must be >= 3 ([CLS], a word, [SEP]), not {c.max_text_len}"),
        (1 <= c.min_regions <= c.n_regions, f"need 1 <= min_regions <= n_regions, got "
         f"min_regions {c.min_regions}, n_regions {c.n_regions}"),
        (0 <= c.region_conf_threshold < 1,
         f"region_conf_threshold must be in [0, 1), not {c.region_conf_threshold}"),
        (c.n_region_classes >= 2, f"n_region_classes counts background and at least one "
         f"object class, so it must be >= 2, not {c.n_region_classes}"),
        (0 < c.mask_prob < 1, f"mask_prob must be in (0, 1), not {c.mask_prob}"),
        (0 <= c.itm_neg_prob <= 1,
         f"itm_neg_prob must be a probability, not {c.itm_neg_prob}"),
        (min(mix) >= 0 and sum(mix) > 0, f"the task mix (mix_mlm, mix_itm, mix_mrfr, mix_mrc, "
         f"mix_mrc_kl) must be >= 0 and not all 0, got {mix}"),
        (c.wra_weight >= 0, f"wra_weight must be >= 0, not {c.wra_weight}"),
        (c.ipot_beta >= 0.03 and min(c.ipot_iters, c.ipot_inner) >= 1,
         f"need ipot_beta >= 0.03 (below ~0.023 exp(-C/β) of WRA's cosine costs C <= 2 "
         f"leaves fp32's normal range and the plan is NaN, shared.ot.ipot) and ipot_iters, "
         f"ipot_inner >= 1, got {c.ipot_beta}, {c.ipot_iters}, {c.ipot_inner}"),
        (c.itm_score in ("log_odds", "match_logit"),
         f"itm_score must be log_odds or match_logit, not {c.itm_score!r}"),
        (c.mrc_kl_scale in ("region", "element"),
         f"mrc_kl_scale must be region or element, not {c.mrc_kl_scale!r}"),
        (c.adam_eps > 0, f"adam_eps must be > 0, not {c.adam_eps}"),
        (c.hard_negatives >= 1 and c.rank_margin >= 0 and c.vqa_head_lr_mult > 0,
         f"need hard_negatives >= 1, rank_margin >= 0 and vqa_head_lr_mult > 0, got "
         f"{c.hard_negatives}, {c.rank_margin}, {c.vqa_head_lr_mult}")]
    return (encoder_problems(c, TASKS) + [message for fine, message in checks if not fine]
            + optimisation_problems(c) + statistics_problems(c))


# Config.paper(task): UNITER-base [UNITER §4, fn. 12] with the official recipe of `task` [code]:
# the all-data pre-training (8 GPUs), VQA (train-vqa-base-4gpu.json) or retrieval with hard
# negatives (train-itm-{flickr,coco}-base-16gpu-hn.json, the same numbers); the paper's Image
# Embedder and [code]'s MRC-kl scale (the recipe's lr and clipping were tuned with it). Where
# [UNITER §A.2] gives other fine-tuning numbers, the comments say so: [code]'s configs are the
# complete recipes, and the ones vqa_head_lr_mult and hard_negatives (also [code]) belong to.
#
# [code] sums the gradients of its k accumulation steps (each micro-batch's loss is a mean; no
# division by k; Horovod averages over GPUs), clips that sum and steps AdamW with eps 1e-6;
# train.py averages them (the gradient of the update's mean loss, k times smaller). The same update
# follows from the average with both thresholds divided by k: clipping ‖k·g‖ at c is clipping ‖g‖
# at c/k, and Adam's step m/(√v + eps) is unchanged when g, m and √v grow k times and eps does too
# (tests/test_uniter.py, test_the_paper_recipe_on_the_mean_gradient_is_the_codes_on_the_sum). k is
# [code]'s, not ours: pre-training 6, VQA 5; retrieval's train_itm_hard_negatives.py divides by its
# 8 accumulation steps (a mean) but adds the text-side and the image-side losses, twice our mean
# over both, so k = 2. Splitting the same batch_size into another --grad_accum_steps changes no
# threshold.
PAPER_RECIPES = {
    "pretrain": dict(  # the class defaults [code pretrain-alldata-base-8gpu.json]
        grad_clip=5.0 / 6,  # [code] grad_norm 5 on the SUM of 6 accumulated gradients
        adam_eps=1e-6 / 6),  # [code] 1e-6 on that sum
    "vqa": dict(  # [code] train-vqa-base-4gpu.json (4 GPUs), train_vqa.py
        batch_size=1280,  # OURS: [code] batches by input units (text + regions,
        #   padded): 4 GPUs × 5,120 × 5 accumulation steps = 102,400 units an update;
        #   at 80 units an example (as pre-training's estimate) 102,400 / 80 = 1,280.
        #   [UNITER §A.2]: "batch size of 10240 input units"
        grad_accum_steps=5,  # [code] gradient_accumulation_steps
        lr=8e-5,  # [code] learning_rate (the head: × vqa_head_lr_mult 10 [code]
        #   lr_mul); [UNITER §A.2]: 3e-4
        max_steps=6000,  # [code] num_train_steps; [UNITER §A.2]: "maximum 5K steps"
        warmup_steps=600,  # [code]
        lr_schedule="linear",  # [code] warmup_linear: linear decay to 0
        weight_decay=0.01,  # [code]; [UNITER §A.2] the same
        beta1=0.9, beta2=0.98,  # [code] betas; [UNITER §A.2]: AdamW
        grad_clip=2.0 / 5,  # [code] grad_norm 2 on the SUM of 5 gradients
        adam_eps=1e-6 / 5),  # [code] optim/adamw.py's 1e-6 on that sum
    "retrieval": dict(  # [code] train-itm-*-base-16gpu-hn.json (16 GPUs),
        #   train_itm_hard_negatives.py; hard_negatives 31, rank_margin 0.2 [code]
        batch_size=128,  # [code] 16 GPUs × train_batch_size 8 (one text-side and
        #   one image-side query a step, 8 steps): 128 queries a side; here 128 pairs,
        #   each a text query and an image query. [UNITER §A.2]: Flickr30K 120, COCO 60
        grad_accum_steps=1,  # OURS: the negatives are the batch's (forward_rank)
        lr=5e-5,  # [code]; [UNITER §A.2]: Flickr30K 5e-5, COCO 2e-5
        max_steps=5000,  # [code] num_train_steps; [UNITER §A.2]: Flickr30K 16K,
        #   COCO 20K (2 random + 2 hard negatives, re-mined every 2,500 / 4,000 steps)
        warmup_steps=500,  # [code]
        lr_schedule="linear",  # [code] warmup_linear
        weight_decay=0.01,  # [code]
        beta1=0.9, beta2=0.98,  # [code] betas
        grad_clip=2.0 / 2,  # [code] grad_norm 2 on L_text-side + L_image-side
        adam_eps=1e-6 / 2),  # [code] 1e-6 on that sum
}


def world_preset(name: str) -> dict:
    """OURS: the fields Config.small() and Config.tiny() set, sized for the synthetic world
    (its regions; C = its 6 shapes + background, shared.world.DETECTOR_CLASSES), both with
    [code]'s Image Embedder (region_branch_norms).

    small  one GPU, hours. A 6-layer, 384-wide UNITER on the world's regions: 10 to 36 an image
           (36: the code's count when the confidence threshold is off), 512-d features, 128 px
           renders.
    tiny   2 CPU cores, minutes. The world's default regions (10 per image, all kept, 64-d
           features, standardised) and a 4-layer, 128-wide Transformer (2 heads of 64), no
           dropout (the world never repeats an example). From scratch (no BERT), ITM leaves
           chance only with both standardised region features and init_std 0.1: at width 128,
           BERT's 0.02 makes every attention output ~5 % of its residual, too weak a
           cross-modal signal for ITM (measured: RESULTS.md, with [code]'s Image Embedder,
           region_branch_norms, kept here)."""
    from shared.world import DETECTOR_CLASSES  # imported where read: importing uniter skips it
    if name == "small":
        return dict(hidden_size=384, layers=6, heads=6, intermediate_size=1536, vocab_size=1000,
                    max_text_len=40, feature_dim=512, n_regions=36,
                    n_region_classes=len(DETECTOR_CLASSES), image_size=128, batch_size=256,
                    lr=1e-4, warmup_steps=1000, max_steps=50_000, grad_accum_steps=1,
                    train_single_object_prob=0.5, region_branch_norms=True, adam_eps=1e-8)
    if name == "tiny":
        return dict(hidden_size=128, layers=4, heads=2, intermediate_size=512, dropout=0.0,
                    init_std=0.1, vocab_size=1000, max_text_len=32, feature_dim=64,
                    n_regions=10, min_regions=10, n_region_classes=len(DETECTOR_CLASSES),
                    image_size=64, batch_size=64, lr=5e-4, warmup_steps=100, max_steps=3500,
                    grad_accum_steps=1, train_single_object_prob=0.5, hard_negatives=3,
                    eval_pairs=100, standardise_features=True, region_branch_norms=True,
                    adam_eps=1e-8)
    raise ValueError(f"no preset {name!r}: small or tiny")


def build_model(config: Config) -> UNITER:
    return UNITER(config)


def make_optimizer(model: UNITER, config: Config) -> torch.optim.Optimizer:
    """AdamW [code] (eps: adam_eps): weight decay on matrices, none on vectors (biases,
    LayerNorm gains, the mask vector); the VQA head trains at vqa_head_lr_mult x the learning
    rate ("lr_scale": train.py multiplies each group's schedule by it).
    DEVIATION: [code] exempts parameters by name ("bias", "LayerNorm.weight"), so it does decay
    the gains of the norms not named LayerNorm (img_layer_norm, pos_layer_norm, the MRFR and MRC
    heads' norms) and the mask embedding's row; here every vector is exempt, as in the other
    three papers (shared.optim.decay_groups): decaying a gain pulls it toward 0, not toward
    the identity it starts at."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("heads.vqa."), p.dim() >= 2), []).append(p)
    return adamw([{"params": params, "weight_decay": config.weight_decay if decay else 0.0,
                   "lr_scale": config.vqa_head_lr_mult if head else 1.0}
                  for (head, decay), params in groups.items()], config, fused_for(model),
                 config.adam_eps)


def after_optimizer_step(model: UNITER) -> None:
    """Nothing to do after an update (CoCa clamps its temperature here)."""


# --- the released weights: ChenRocks/UNITER's state dicts -> this model ------------------------
# [code: ChenRocks/UNITER model/model.py, layer.py, pretrain.py, vqa.py, itm.py]: the released
# uniter-base.pt / uniter-large.pt are plain state dicts of UniterForPretraining (the encoder
# under "uniter.", the heads beside it); a fine-tuning run's checkpoints have the same layout with
# its task's head. [code]'s inputs match ours: bert-base-cased word pieces ([CLS] w [SEP],
# positions 0..T-1, type 0), 2048-d BUTD features with the 7-d locations of region_locations
# (type 1), and its Image Embedder normalises each branch (region_branch_norms=True).

def _uniter_names(layers: int) -> dict[str, str]:
    """{our encoder tensor: [code]'s} for UniterModel (text and image embedders, BERT's layers,
    the pooler); mask_embedding and the heads are mapped in from_uniter."""
    names = {"text_embeddings.word": "embeddings.word_embeddings",
             "text_embeddings.position": "embeddings.position_embeddings",
             "text_embeddings.token_type": "embeddings.token_type_embeddings",
             "text_embeddings.norm": "embeddings.LayerNorm",
             "image_embeddings.feature": "img_embeddings.img_linear",  # W_f (D, F)
             "image_embeddings.feature_norm": "img_embeddings.img_layer_norm",
             "image_embeddings.location": "img_embeddings.pos_linear",  # W_p (D, 7)
             "image_embeddings.location_norm": "img_embeddings.pos_layer_norm",
             "image_embeddings.norm": "img_embeddings.LayerNorm", "pooler.dense": "pooler.dense"}
    for i in range(layers):  # BertLayer [code: model/layer.py]
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        names.update({ours + "attn.q_proj": theirs + "attention.self.query",
                      ours + "attn.k_proj": theirs + "attention.self.key",
                      ours + "attn.v_proj": theirs + "attention.self.value",
                      ours + "attn.out_proj": theirs + "attention.output.dense",
                      ours + "attn_norm": theirs + "attention.output.LayerNorm",
                      ours + "mlp.fc1": theirs + "intermediate.dense",
                      ours + "mlp.fc2": theirs + "output.dense",
                      ours + "mlp_norm": theirs + "output.LayerNorm"})
    names = {f"encoder.{k}": f"uniter.{v}" for k, v in names.items()}
    return {f"{k}.{p}": f"{v}.{p}" for k, v in names.items() for p in ("weight", "bias")
            if not (p == "bias" and k.endswith(("word", "position", "token_type")))}


# {task: {our head tensor: [code]'s}}; .weight and .bias of each module unless it ends in a dot
UNITER_HEADS = {
    "pretrain": {"heads.itm": "itm_output",  # Linear(D, 2) [code: model/pretrain.py]
                 "heads.mlm.transform.dense": "cls.predictions.transform.dense",
                 "heads.mlm.transform.norm": "cls.predictions.transform.LayerNorm",
                 "heads.mlm.bias.": "cls.predictions.bias",  # decoder.weight: the word table
                 "heads.mrfr.transform.dense": "feat_regress.net.0",  # net.1 is the GELU
                 "heads.mrfr.transform.norm": "feat_regress.net.2",
                 "heads.mrfr.bias.": "feat_regress.bias",  # feat_regress.weight: W_f, tied
                 "heads.mrc.0.dense": "region_classifier.net.0",
                 "heads.mrc.0.norm": "region_classifier.net.2",
                 "heads.mrc.1": "region_classifier.net.3"},  # (C, D)
    "vqa": {"heads.vqa.0": "vqa_output.0", "heads.vqa.2": "vqa_output.2",  # Linear, GELU, LN,
            "heads.vqa.3": "vqa_output.3"},  # Linear(2D, A) [code: model/vqa.py]
    "retrieval": {}}  # itm from itm_output and rank_output (from_uniter)
UNITER_TIED = {"cls.predictions.decoder.weight": "uniter.embeddings.word_embeddings.weight",
               "feat_regress.weight": "uniter.img_embeddings.img_linear.weight"}


def _uniter_task(keys: set) -> str:
    """The task of the heads found: vqa_output -> vqa; rank_output, or itm_output alone ->
    retrieval; MLM / MRFR / MRC heads -> pretrain."""
    pretrain = {k for k in keys if k.startswith(("cls.", "feat_regress.", "region_classifier."))}
    found = [t for t, hit in (("vqa", "vqa_output.0.weight" in keys),
                              ("retrieval", "rank_output.weight" in keys), ("pretrain", pretrain))
             if hit]
    if not found and "itm_output.weight" in keys:
        return "retrieval"
    if len(found) != 1:
        raise ValueError(f"UNITER weights need one task's heads (vqa_output, rank_output / "
                         f"itm_output, or cls + feat_regress + region_classifier); found "
                         f"{', '.join(found) or 'none'}")
    return found[0]


def uniter_config(state_dict: dict, config_dict: dict) -> Config:
    """The Config of [code]'s weights: sizes from the tensors' shapes, checked against
    config_dict ({} or [code]'s config/uniter-*.json); VQA answers from config_dict["answers"]
    (a list) or ["ans2label"] ({answer: index}, [code: utils/ans2label.json]), else answer_<i>."""
    s, task = state_dict, _uniter_task(set(state_dict))
    V, D = s["uniter.embeddings.word_embeddings.weight"].shape
    layers = sum(k.endswith("attention.self.query.weight") for k in s)
    sizes = {"vocab_size": V, "hidden_size": D, "num_hidden_layers": layers,
             "max_position_embeddings": len(s["uniter.embeddings.position_embeddings.weight"]),
             "type_vocab_size": len(s["uniter.embeddings.token_type_embeddings.weight"]),
             "intermediate_size": len(s["uniter.encoder.layer.0.intermediate.dense.weight"])}
    wrong = [f"{k} {config_dict[k]} (the tensors say {v})" for k, v in sizes.items()
             if k in config_dict and config_dict[k] != v]
    if sizes["type_vocab_size"] != 2 or config_dict.get("hidden_act", "gelu") != "gelu":
        wrong.append("a type table of 2 rows and hidden_act gelu (VCR's 4 types are not here)")
    if wrong:
        raise ValueError(f"UNITER config disagrees with the weights: {'; '.join(wrong)}")
    n_answers = len(s["vqa_output.3.weight"]) if task == "vqa" else 0
    ans2label = config_dict.get("ans2label", {})
    answers = tuple(config_dict.get("answers") or sorted(ans2label, key=ans2label.get)
                    or [f"answer_{i}" for i in range(n_answers)])
    if task == "vqa" and len(answers) != n_answers:
        raise ValueError(f"{len(answers)} answers given, the VQA head has {n_answers}")
    extra = ({"n_region_classes": len(s["region_classifier.net.3.weight"])}
             if task == "pretrain" and "region_classifier.net.3.weight" in s else {})
    return Config(
        task=task, hidden_size=D, layers=layers, intermediate_size=sizes["intermediate_size"],
        heads=config_dict.get("num_attention_heads", max(1, D // 64)),  # 64 wide
        vocab_size=V, max_text_len=sizes["max_position_embeddings"],  # 512 rows [code]
        feature_dim=s["uniter.img_embeddings.img_linear.weight"].shape[1],  # F = 2048 [code]
        dropout=config_dict.get("hidden_dropout_prob", 0.1),
        init_std=config_dict.get("initializer_range", 0.02),
        region_branch_norms=True,  # [code]'s LN(LN(W_f f) + LN(W_p p) + type)
        itm_score="match_logit",  # [code]'s score: the "match" logit (itm) or rank_output
        answers=answers if task == "vqa" else (), mrc_kl_scale="element", **extra)


def from_uniter(state_dict: dict, config_dict: dict) -> tuple[Config, dict]:
    """[code]'s UNITER weights -> (our Config, our state dict), tensor by tensor: every source
    tensor used and every tensor of our model set with its shape, else one-line ValueError.

        [code] (<u> = the "uniter" prefix)     ours
        <u>.embeddings.*                         encoder.text_embeddings (word, position, ...)
        <u>.img_embeddings.img_linear, ...       encoder.image_embeddings (feature, ..._norm)
        <u>.img_embeddings.mask_embedding        row 1 -> mask_vector m (row 0 is [code]'s 0)
        <u>.encoder.layer.i                      encoder.layers.i (_uniter_names)
        <u>.pooler.dense                         encoder.pooler.dense
        heads (UNITER_HEADS)                     heads.<task>
        rank_output (1, D)                       heads.itm row 1 (row 0: itm_output's row 0)
        cls.predictions.decoder, feat_regress.w  tied copies of the word table and W_f: checked

    [code] saved old LayerNorm names gamma / beta at times; from_pretrained reads them as
    weight / bias, and so do we."""
    s = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
         "LayerNorm.bias"): v for k, v in state_dict.items()}
    config = uniter_config(s, config_dict)
    with torch.device("meta"):  # names and shapes only, no memory
        wanted = {k: v.shape for k, v in UNITER(config).state_dict().items()}
    names = _uniter_names(config.layers)
    for ours, theirs in UNITER_HEADS[config.task].items():
        parts = ("",) if ours.endswith(".") else (".weight", ".bias")
        names.update({ours.rstrip(".") + p: theirs + p for p in parts})
    missing = sorted({v for v in names.values() if v not in s})
    if missing:
        raise ValueError(f"the UNITER weights lack {', '.join(missing[:4])}"
                         f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}")
    ours = {k: s[v] for k, v in names.items()}
    used = set(names.values()) | {"uniter.img_embeddings.mask_embedding.weight"}
    ours["encoder.image_embeddings.mask_vector"] = s[
        "uniter.img_embeddings.mask_embedding.weight"][1]  # (2, F) -> (F,): img_masks == 1
    if config.task == "retrieval":  # rank_output = itm_output row 1 at the start [code: itm.py]
        rank_w, rank_b = (s["rank_output.weight"], s["rank_output.bias"]) if (
            "rank_output.weight" in s) else (s["itm_output.weight"][1:], s["itm_output.bias"][1:])
        zero_w, zero_b = torch.zeros_like(rank_w), torch.zeros_like(rank_b)  # no itm_output
        ours["heads.itm.weight"] = torch.cat([s.get("itm_output.weight", zero_w)[:1],
                                              rank_w])  # (2, D): row 1 = the rank score
        ours["heads.itm.bias"] = torch.cat([s.get("itm_output.bias", zero_b)[:1], rank_b])
        used |= {"itm_output.weight", "itm_output.bias", "rank_output.weight", "rank_output.bias"}
    for tied, table in UNITER_TIED.items():  # saved twice by state_dict(): one tensor in [code]
        if tied in s and not torch.equal(s[tied], s[table]):
            raise ValueError(f"{tied} differs from {table}, which [code] ties it to")
        used.add(tied)
    unused = (set(s) - used) | {names[n] for n in set(ours) - set(wanted) if n in names}
    return config, converted_state("UNITER", list(unused), ours, wanted)


# the released weights each converter turns into this model (convert.py picks by these names):
# (source state dict, source config dict) -> (Config, our state dict)
CONVERTERS = {"uniter": from_uniter}


# --- 8. Data: the world's regions, one task a batch --------------------------------------------

def kept_regions(conf: np.ndarray, config: Config) -> int:
    """How many of an image's regions (rows sorted by conf, descending) the model sees [code]:
    those with conf > region_conf_threshold, but at least min_regions and at most n_regions."""
    above = int((np.asarray(conf) > config.region_conf_threshold).sum())
    return int(np.clip(above, config.min_regions, min(config.n_regions, len(conf))))


def uses_region_classes(config: Config) -> bool:
    """Whether training reads the detector's class distribution: MRC and MRC-kl (pre-training
    with mix_mrc or mix_mrc_kl > 0). Fine-tuning needs no cls_prob in the region files, so grid
    features or a detector without class scores serve VQA and retrieval."""
    return config.task == "pretrain" and (config.mix_mrc > 0 or config.mix_mrc_kl > 0)


def check_regions(example: dict, config: Config) -> None:
    """A ValueError naming what does not fit between one example's regions and the config."""
    check_feature_size(example["features"], config.feature_dim)
    if not uses_region_classes(config):
        return
    if "cls_prob" not in example:
        raise ValueError("UNITER's region classification (mix_mrc, mix_mrc_kl) needs each region "
                         "file's cls_prob (the detector's class distribution, background at 0); "
                         "set both to 0 to pre-train without it")
    if example["cls_prob"].shape[1] != config.n_region_classes:
        raise ValueError(f"the detector has {example['cls_prob'].shape[1]} classes (background "
                         f"included) but n_region_classes is {config.n_region_classes}")


def region_inputs(example: dict, config: Config, statistics: tuple | None = None) -> dict:
    """A world example's kept regions as tensors: features (n, F), standardised with
    statistics = (mean, std) if given, locations (n, 7) and, where training reads it
    (uses_region_classes), cls_prob (n, C). The world's boxes are fractions of the image side
    already."""
    check_regions(example, config)
    n = kept_regions(example["conf"], config)
    features = torch.from_numpy(example["features"][:n]).float()  # (n, F)
    if statistics is not None:
        features = (features - statistics[0]) / statistics[1]  # (n, F)
    out = {"features": features,
           "locations": region_locations(torch.from_numpy(example["boxes"][:n]), 1.0, 1.0)}
    if uses_region_classes(config):
        out["cls_prob"] = torch.from_numpy(example["cls_prob"][:n]).float()  # (n, C)
    return out


class UniterDataset(Dataset):
    """Item p: the p-th visit of the stream (shared.data.Epochs; one unit per (image, text)
    pair: [code]'s datasets hold one entry per caption or question) prepared for one task,
    every random choice a pure function of (seed, p), so a second visit of a pair (the next
    epoch) draws its masks, task and negative afresh. Pre-training: the task of item p is
    draw_task(p // batch_size), the same for a whole update (train.py's loader gives
    micro-batch k the items k·b .. k·b+b-1, b = batch_size / grad_accum_steps, or the share of
    one of N processes, b / N); then

        mlm      the caption with mask_words, the image whole (masked_modalities)
        mrfr, mrc, mrc_kl   the caption whole, regions masked by mask_regions
        itm      the caption with its own image, or (itm_neg_prob) the regions of another
                 image of the same micro-batch (see negative_index)

    The last 2·b examples are kept (`shared.data.RecentExamples`), so an ITM negative costs no
    second reading: its image is read for its own item and reused as a negative.

    retrieval: a caption and its image (the negatives come from the batch); vqa: a question
    and its answers."""

    def __init__(self, source, tokenizer, config: Config, seed: int = 0):
        self.source, self.tokenizer, self.config, self.seed = source, tokenizer, config, seed
        self.epochs = Epochs(source, seed, per_text=True)
        self.special_ids = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id,
                            tokenizer.sep_id, tokenizer.mask_id}
        self.random_ids = (max(self.special_ids) + 1, tokenizer.vocab_size)  # ordinary pieces
        self.answer_index = answer_index(config.answers)
        self.statistics = standardisation(config, source)
        # the examples one process puts in one micro-batch (torchrun: its share of it)
        self.micro_batch = max(1, config.batch_size // config.grad_accum_steps // world_size())
        self.example = RecentExamples(source, 2 * self.micro_batch)  # index -> source.example
        check_regions(self.example(0), config)  # here, in one line, not in a loader worker

    def negative_index(self, p: int, index: int, rng: np.random.Generator) -> int:
        """The image of item p's replacement, uniform over the other images of its micro-batch
        (items p - p % b .. p - p % b + b - 1; an image with two captions there counts once).
        [paper ≠ code]: the paper replaces "the image or text in a paired sample"
        [UNITER §3.2, Eq. 2], in proportions it does not give (AMBIGUITY, so no switch); [code]
        and we replace the image only.
        DEVIATION: the paper draws "a randomly-selected one from other samples" [UNITER §3.2,
        Eq. 2], [code] from the whole dataset; our micro-batches are uniform draws (the
        world's examples are i.i.d., a corpus is read in a new permutation every epoch), so
        the negatives follow the same distribution, and each is an image the micro-batch reads
        anyway. Where the micro-batch has no other image (b = 1, or every item one image's),
        one from the whole dataset."""
        start, n = p - p % self.micro_batch, len(self.source)
        others = sorted({self.epochs(start + k)[0] for k in range(self.micro_batch)} - {index})
        if others:
            return others[int(rng.integers(len(others)))]
        if n < 2:
            raise ValueError("ITM needs at least 2 images to draw a negative from; the "
                             "training set has 1")
        return (index + 1 + int(rng.integers(n - 1))) % n

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, p: int) -> dict:
        c = self.config
        index, text = self.epochs(p)
        rng = np.random.default_rng([self.seed, 13, p])
        example = self.example(index)
        task = draw_task(c, p // c.batch_size, self.seed) if c.task == "pretrain" else c.task
        item = {"task": task, "image": index, **region_inputs(example, c, self.statistics)}
        # DEVIATION: a text of more than max_text_len - 2 word-pieces loses its last pieces
        # (encode keeps [SEP]); [code]'s training sets leave such an example out (data/data.py
        # TxtTokLmdb: max_txt_len 60; its evaluation keeps every text, -1). The world's captions
        # never reach it, and on real data dropping would change which examples exist.
        if task == "vqa":
            question, answers = pick_text(example["questions"], text, rng)
            tokens = self.tokenizer.encode(question, max_len=c.max_text_len)
            item["answer_scores"] = torch.from_numpy(soft_scores(  # (A,)
                [answers] if isinstance(answers, str) else answers, self.answer_index))
        else:
            caption = pick_text(example["captions"], text, rng)
            tokens = self.tokenizer.encode(caption, max_len=c.max_text_len)
        if task == "itm":
            item["is_match"] = bool(rng.random() >= c.itm_neg_prob)
            if not item["is_match"]:  # the image, never the text: [paper ≠ code] (negative_index)
                other = self.example(self.negative_index(p, index, rng))
                item.update(region_inputs(other, c, self.statistics))
        words, regions = masked_modalities(task, c.conditional_masking)
        if words:
            tokens, labels = mask_words(tokens, rng, c.mask_prob, self.tokenizer.mask_id,
                                        self.random_ids, self.special_ids)
            item["mlm_labels"] = torch.tensor(labels)  # (T_i,)
        if regions:
            item["region_masked"] = torch.from_numpy(
                mask_regions(len(item["features"]), rng, c.mask_prob))  # (n,)
        item["tokens"] = torch.tensor(tokens)  # (T_i,)
        return item


def collate_fn(items: list[dict]) -> dict:
    """Items of ONE task -> a padded batch:

        tokens (B, T) [PAD]-padded; features (B, N, F), locations (B, N, 7) zero-padded;
        region_mask (B, N) True = real region; task (str); image_ids (B,) the image each
        pair was read from (two captions of one image may share a batch)
        mlm:  mlm_positions (M,) flat indices into the B·T text positions, mlm_targets (M,)
        mrm:  region_masked (B, N), mrm_positions (M,) into the B·N regions, mrfr_targets (M, F)
              (the features before masking), mrc_targets (M, C) (the detector's softmax)
        itm:  is_match (B,) bool;  vqa: answer_scores (B, A) (shared.vqa.soft_scores)

    The positions are computed here, on the CPU, so the model gathers without a device sync."""
    task = items[0]["task"]
    if any(it["task"] != task for it in items):
        raise ValueError(f"a batch must hold one task, got {sorted({it['task'] for it in items})}")
    tokens = pad_sequences([it["tokens"] for it in items], PAD_ID)  # (B, T)
    features = pad_rows([it["features"] for it in items])  # (B, N, F)
    region_mask = pad_rows([torch.ones(len(it["features"]), dtype=torch.bool)
                             for it in items])  # (B, N)
    batch = {"task": task, "tokens": tokens, "features": features,
             "locations": pad_rows([it["locations"] for it in items]),
             "region_mask": region_mask}
    if "image" in items[0]:
        batch["image_ids"] = torch.tensor([it["image"] for it in items])  # (B,)
    if "mlm_labels" in items[0]:
        labels = torch.full(tokens.shape, IGNORE)  # (B, T)
        for b, it in enumerate(items):
            labels[b, :len(it["mlm_labels"])] = it["mlm_labels"]
        batch["mlm_positions"], batch["mlm_targets"] = flat_targets(labels, IGNORE)
    if "region_masked" in items[0]:
        masked = pad_rows([it["region_masked"] for it in items])  # (B, N), False on padding
        positions = masked.flatten().nonzero().squeeze(1)  # (M,)
        batch["region_masked"], batch["mrm_positions"] = masked, positions
        batch["mrfr_targets"] = features.flatten(0, 1)[positions]  # (M, F)
        if "cls_prob" in items[0]:  # MRC / MRC-kl targets (uses_region_classes)
            batch["mrc_targets"] = pad_rows([it["cls_prob"] for it in items]).flatten(0, 1)[
                positions]  # (M, C)
    if "is_match" in items[0]:
        batch["is_match"] = torch.tensor([it["is_match"] for it in items])  # (B,)
    if "answer_scores" in items[0]:
        batch["answer_scores"] = torch.stack([it["answer_scores"] for it in items])  # (B, A)
    return batch


def region_batch(examples: list[dict], config: Config, world_config, device) -> tuple:
    """(features (n, N, F), locations (n, N, 7), region_mask (n, N)) on `device`; the world's
    config gives the statistics of standardise_features (None: the config's own)."""
    statistics = standardisation(config, world_config)
    regions = [region_inputs(ex, config, statistics) for ex in examples]
    features = pad_rows([r["features"] for r in regions]).to(device)
    locations = pad_rows([r["locations"] for r in regions]).to(device)
    mask = pad_rows([torch.ones(len(r["features"]), dtype=torch.bool) for r in regions])
    return features, locations, mask.to(device)


def train_dataset(source, tokenizer, config: Config, seed: int = 0) -> UniterDataset:
    """Item p = the p-th (image, text) visit prepared for the task of its update
    (UniterDataset)."""
    return UniterDataset(source, tokenizer, config, seed)


# --- 9. Evaluation and inference ---------------------------------------------------------------

def retrieval_scores(model: UNITER, tokenizer, config: Config, examples: list[dict],
                     world_config=None, texts: list[str] | None = None) -> Tensor:
    """The (n images, G texts) match_score of every pair of n examples' images and `texts`
    (default: each example's first caption, G = n): n·G forward passes, 1024 a call, as
    [code inf_itm.py]; the texts go shortest first, each call cut to its longest. On the CPU."""
    device = model_device(model)
    texts = [ex["captions"][0] for ex in examples] if texts is None else texts
    tokens = tokenizer.encode_batch(texts, config.max_text_len).to(device)  # (G, T)
    features, locations, mask = region_batch(examples, config, world_config, device)
    n, lengths = len(examples), (tokens != PAD_ID).sum(1)  # (G,)
    text = lengths.argsort().repeat_interleave(n)  # (G·n,), text-major, shortest first
    image = torch.arange(n, device=device).repeat(len(texts))  # (G·n,)
    scores = torch.zeros(n, len(texts))  # (n images, G texts)
    for i, t in zip(image.split(1024), text.split(1024)):  # each (≤ 1024,)
        scores[i.cpu(), t.cpu()] = model.match_score(
            tokens[t, :int(lengths[t].max())], features[i], locations[i], mask[i]).float().cpu()
    return scores


def answer_logits_fn(model: UNITER, tokenizer, config: Config, examples: list[dict],
                     world_config=None, zero_regions: bool = False):
    """answer_logits(questions, image indices into examples) -> (b, A) logits over answers, for
    shared.evaluate.vqa_metrics; zero_regions: every region feature and location zeroed."""
    device = model_device(model)
    features, locations, mask = region_batch(examples, config, world_config, device)
    if zero_regions:
        features, locations = torch.zeros_like(features), torch.zeros_like(locations)

    def answer_logits(questions: list[str], images: list[int]) -> Tensor:
        tokens = tokenizer.encode_batch(questions, config.max_text_len).to(device)  # (b, T)
        k = torch.tensor(images, device=device)  # (b,) the image of each question
        return model.answer_logits(tokens, features[k], locations[k], mask[k])  # (b, A)
    return answer_logits


def answer_questions(model: UNITER, tokenizer, config: Config, examples: list[dict],
                     world_config=None) -> list[str]:
    """The predicted answer of every question of the examples (their "questions", in order):
    the highest-scoring of config.answers [UNITER §4.1] (shared.evaluate.answer_questions)."""
    return shared_answer_questions(model, answer_logits_fn, tokenizer, config, examples,
                                   world_config)


@in_eval_mode
def evaluate(model: UNITER, tokenizer, config: Config, world_config, split: str,
             n: int) -> dict[str, float]:
    """The downstream metrics on a world split.

    pretrain, retrieval: i2t_r1/5/10, t2i_r1/5/10 among min(n, eval_pairs) images and ALL
        their captions (5 each), every pair scored by UNITER.match_score: the COCO / Flickr30K
        protocol [UNITER §A.2; code utils/itm_eval.py], an image found if any of its captions
        ranks in the top K, a caption if its image does; r1_mean = their R@1 mean.
    vqa: vqa_acc over every question of n images; vqa_acc_<type> per question template;
        vqa_acc_regions_zeroed = the same model with the regions zeroed at test time.
    """
    if config.task != "vqa":
        examples = world_examples(world_config, split, min(n, config.eval_pairs))
        texts, text_image = all_captions(examples)  # (G,) each, G = 5n in the world
        return retrieval_metrics(retrieval_scores(model, tokenizer, config, examples,
                                                  world_config, texts), text_image)
    examples = world_examples(world_config, split, n)
    answers = [answer_logits_fn(model, tokenizer, config, examples, world_config, zero_regions)
               for zero_regions in (False, True)]
    metrics = vqa_metrics(answers[0], examples, config.answers)
    metrics["vqa_acc_regions_zeroed"] = vqa_metrics(answers[1], examples,
                                                    config.answers)["vqa_acc"]
    return metrics


@in_eval_mode
def sample_captions(model: UNITER, tokenizer, config: Config, world_config, split: str,
                    n: int) -> list[tuple[str, str]]:
    """UNITER does not caption: always []."""
    return []
