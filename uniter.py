"""UNITER: UNiversal Image-TExt Representation Learning, written from primitives.

    Yen-Chun Chen, Linjie Li, Licheng Yu, Ahmed El Kholy, Faisal Ahmed, Zhe Gan, Yu Cheng,
    Jingjing Liu. ECCV 2020; arXiv 1909.11740v3 (17 Jul 2020). Every `[UNITER ...]` tag cites
    that version.

One Transformer reads a caption and an image's detector regions as one sequence; four kinds of
pre-training task teach it to relate the two [UNITER §Model]:

    [CLS] w1 .. wT [SEP] ------------------------> Text Embedder (word + position) --+
    each region: feature f (F), location p (7) --> Image Embedder (f and p) ---------+
                                                                                     |
             one bidirectional Transformer over [text ; regions]  <------------------+
               |               |                      |                  |
              MLM       MRFR / MRC / MRC-kl        ITM ([CLS])         WRA (OT between
         (text masked,   (regions masked,         (50 % of images      the text outputs and
          image whole)    text whole)              replaced)           the region outputs)

Masking is conditional: one modality is masked while the other is seen whole [UNITER abstract].
Each mini-batch trains ONE task, drawn in proportion to a mix ratio; WRA is added on ITM batches
[code].

Paper map (part of the paper -> code). "to come": the next session adds the model and training.
    §Model: Image Embedder, the 7-d location     region_locations
    §Model: Text/Image Embedders, Transformer    to come (embeddings, encoder, UNITER model)
    §MLM  masked language modelling              mlm_loss; the masking itself: to come
    §MRM  masked region feature regression       mrfr_loss; its tied head: to come
    §MRM  masked region classification           mrc_loss
    §MRM  MRC with KL-divergence                 mrc_kl_loss
    §ITM  image-text matching                    itm_loss; the 50 % negatives: to come
    §WRA  word-region alignment by OT (IPOT)     ipot, wra_distance, wra_loss
    §Impl the pre-training recipe, task mix      Config, Config.paper(); the task sampler: to come
    downstream (VQA, retrieval, ...)             to come

Citations name the paper's parts, [UNITER §Model], [UNITER §MLM], [UNITER §MRM], [UNITER §ITM],
[UNITER §WRA], [UNITER §Impl] (implementation details), not section or equation numbers: only the
first page of v3 (title, authors, abstract) could be read here, so no number was checked.
[code] = the official code (ChenRocks/UNITER 1dbfa62), read for ../shared/specs/uniter_oscar.md
Part A; where this file says what the code does, that spec is the source. [IPOT] = Xie, Wang,
Wang, Zha, "A Fast Proximal Point Method for Computing Exact Wasserstein Distance", UAI 2019
(PMLR 115), arXiv 1802.04307.

Left out, and why: the four image-text corpora and the Faster R-CNN (the synthetic world's regions
of shared/world.py instead: boxes, features, detector class probabilities); the BERT-base-cased
initialisation (no download here); batches sized in tokens (ours count examples, see Config).

Shapes: B batch, T text tokens, N regions, D width, F region-feature size, V vocabulary,
C detector classes (background at 0). Masks over tokens or regions: True = real (not padding).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shared.world import DETECTOR_CLASSES

LOCATION_DIM = 7  # p = [x1, y1, x2, y2, w, h, w·h]  [UNITER §Model]


# --- 2. Config and presets ---------------------------------------------------------------------

@dataclass
class Config:
    """UNITER-base with the official all-data pre-training recipe. `[code]` = the official code,
    `OURS:` = not given by the paper or the code. Every field is a flag of train.py."""
    # the single-stream Transformer: BERT-base sizes [UNITER §Model; code: uniter-base.json]
    hidden_size: int = 768  # D
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072  # feed-forward width, 4·D
    dropout: float = 0.1  # [code]: every dropout, hidden and attention
    vocab_size: int = 28_996  # [code]: bert-base-cased WordPiece (train.py resets it)
    max_text_len: int = 62  # [code] drops captions over 60 word-pieces; + [CLS] and [SEP]
    # the Image Embedder's input: detector regions [UNITER §Model; code]
    feature_dim: int = 2048  # F: Faster R-CNN (BUTD, ResNet-101) pooled ROI features
    n_regions: int = 100  # [code]: an image keeps its clip(#(conf > region_conf_threshold),
    min_regions: int = 10  #   min_regions, n_regions) most confident regions
    region_conf_threshold: float = 0.2  # [code]: conf = the detector's best object-class score
    n_region_classes: int = 1601  # C, [code]: 1600 Visual Genome classes + background at 0
    # pre-training tasks [UNITER §MLM, §MRM, §ITM, §WRA; code]
    mask_prob: float = 0.15  # [code]: each word-piece (MLM) or region (MRM) masked i.i.d.
    itm_neg_prob: float = 0.5  # [code]: share of ITM pairs whose image is replaced
    mix_mlm: float = 4.0  # [code] all-data mix ITM 30 : MLM 40 : MRFR 20 : MRC-kl 20 of 110
    mix_itm: float = 3.0  # P(task of a mini-batch) = mix_task / Σ mix
    mix_mrfr: float = 2.0
    mix_mrc: float = 0.0  # [code]: hard-label MRC is in the code but no released config uses it
    mix_mrc_kl: float = 2.0
    wra_weight: float = 0.1  # [code]: ITM batches train CE + 0.1 · L_WRA
    ipot_beta: float = 0.5  # [code]: β of the IPOT proximal step
    ipot_iters: int = 50  # [code]: outer IPOT iterations
    ipot_inner: int = 1  # [code]: k, scaling updates per outer iteration
    # pre-training recipe, read by train.py [UNITER §Impl; code pretrain-alldata-base-8gpu.json]
    image_size: int = 224  # OURS: the world's render size (UNITER itself sees only regions)
    batch_size: int = 6144  # OURS: [code] batches by tokens, 8 GPUs × 10,240 × 6 accumulation
    #                         steps ≈ 492k tokens; at 60-100 tokens an example, 5k-8k examples
    lr: float = 5e-5  # [code]
    weight_decay: float = 0.01  # [code]
    beta1: float = 0.9  # [code]: AdamW
    beta2: float = 0.98  # [code]
    warmup_steps: int = 10_000  # [code]
    max_steps: int = 200_000  # [code]: UNITER-base, all data
    lr_schedule: str = "linear"  # [code]: linear decay to 0 after warmup
    grad_clip: float = 5.0  # [code]
    grad_accum_steps: int = 6  # [code]
    train_single_object_prob: float = 0.0  # OURS: the world's train mix; 0 = uniform 1-4 objects

    def __post_init__(self):
        problems = []
        if self.hidden_size % self.heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by heads "
                            f"{self.heads}")
        if min(self.layers, self.heads, self.intermediate_size, self.feature_dim) < 1:
            problems.append("layers, heads, intermediate_size and feature_dim must be >= 1")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), not {self.dropout}")
        if self.max_text_len < 3:
            problems.append(f"max_text_len must be >= 3 ([CLS], a word, [SEP]), "
                            f"not {self.max_text_len}")
        if not 1 <= self.min_regions <= self.n_regions:
            problems.append(f"need 1 <= min_regions <= n_regions, got min_regions "
                            f"{self.min_regions}, n_regions {self.n_regions}")
        if not 0 <= self.region_conf_threshold < 1:
            problems.append(f"region_conf_threshold must be in [0, 1), "
                            f"not {self.region_conf_threshold}")
        if self.n_region_classes < 2:
            problems.append(f"n_region_classes counts background and at least one object class, "
                            f"so it must be >= 2, not {self.n_region_classes}")
        if not 0 < self.mask_prob < 1:
            problems.append(f"mask_prob must be in (0, 1), not {self.mask_prob}")
        if not 0 <= self.itm_neg_prob <= 1:
            problems.append(f"itm_neg_prob must be a probability, not {self.itm_neg_prob}")
        mix = (self.mix_mlm, self.mix_itm, self.mix_mrfr, self.mix_mrc, self.mix_mrc_kl)
        if min(mix) < 0 or sum(mix) == 0:
            problems.append(f"the task mix (mix_mlm, mix_itm, mix_mrfr, mix_mrc, mix_mrc_kl) "
                            f"must be >= 0 and not all 0, got {mix}")
        if self.wra_weight < 0:
            problems.append(f"wra_weight must be >= 0, not {self.wra_weight}")
        if self.ipot_beta <= 0 or min(self.ipot_iters, self.ipot_inner) < 1:
            problems.append(f"need ipot_beta > 0 and ipot_iters, ipot_inner >= 1, got "
                            f"{self.ipot_beta}, {self.ipot_iters}, {self.ipot_inner}")
        if self.lr_schedule not in ("cosine", "linear"):
            problems.append(f"lr_schedule must be 'cosine' or 'linear', not {self.lr_schedule!r}")
        if min(self.batch_size, self.max_steps, self.grad_accum_steps) < 1:
            problems.append("batch_size, max_steps and grad_accum_steps must be >= 1")
        elif self.batch_size % self.grad_accum_steps:
            problems.append(f"batch_size {self.batch_size} is not divisible by grad_accum_steps "
                            f"{self.grad_accum_steps}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            problems.append("warmup_steps and grad_clip must be >= 0 (grad_clip 0 = off)")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def paper(cls) -> "Config":
        """UNITER-base [UNITER §Impl] with the official all-data recipe [code] (8 GPUs)."""
        return cls()

    @classmethod
    def small(cls) -> "Config":
        """OURS: one GPU, hours. A 6-layer, 384-wide UNITER on the world's regions: 10 to 36 an
        image (36: the code's count when the confidence threshold is off), 512-d features,
        128 px renders."""
        return cls(hidden_size=384, layers=6, heads=6, intermediate_size=1536, vocab_size=1000,
                   max_text_len=40, feature_dim=512, n_regions=36,
                   n_region_classes=len(DETECTOR_CLASSES), image_size=128, batch_size=256,
                   lr=1e-4, warmup_steps=1000, max_steps=50_000, grad_accum_steps=1,
                   train_single_object_prob=0.5)

    @classmethod
    def tiny(cls) -> "Config":
        """OURS: 2 CPU cores, minutes. The world's default regions (10 per image, all kept,
        64-d features, 6 shapes + background) and a 4-layer, 128-wide Transformer (2 heads of
        64), no dropout (the world never repeats an example). The learning rate and step count
        are provisional until the model exists to be measured."""
        return cls(hidden_size=128, layers=4, heads=2, intermediate_size=512, dropout=0.0,
                   vocab_size=1000, max_text_len=32, feature_dim=64, n_regions=10,
                   min_regions=10, n_region_classes=len(DETECTOR_CLASSES), image_size=64,
                   batch_size=64, lr=5e-4, warmup_steps=100, max_steps=2000,
                   grad_accum_steps=1, train_single_object_prob=0.5)


# --- 3. Input embeddings: the region location -------------------------------------------------

def region_locations(boxes: Tensor, image_width: float, image_height: float) -> Tensor:
    """The 7-d location of each region that the Image Embedder reads [UNITER §Model; code]:

        p = [x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)·(h/H)],   w = x2 - x1, h = y2 - y1

    Every entry is a fraction of the image, so all lie in [0, 1] (no centring, no log), and the
    last one is the box's share of the image area. Worked example: a 640 × 480 image (W × H) and
    the box (x1, y1, x2, y2) = (64, 120, 320, 360) in pixels, so w = 256 and h = 240:

        p = [64/640, 120/480, 320/640, 360/480, 256/640, 240/480, 0.4 · 0.5]
          = [0.1,    0.25,    0.5,     0.75,    0.4,     0.5,     0.2]

    The world's boxes are already divided by the image side: pass image_width = image_height = 1.

    boxes: (..., 4) as (x1, y1, x2, y2), x2 >= x1 and y2 >= y1. Returns (..., 7) floats.
    """
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


# --- 5. Objectives -----------------------------------------------------------------------------
# Each is a pure function of tensors. Region losses take a `masked` flag per region and average
# over the masked ones; a batch with nothing masked gives 0, not NaN. Logits are cast to fp32.

def _masked_mean(values: Tensor, masked: Tensor) -> Tensor:
    """Mean of `values` (...) over the entries where `masked` (...) is True; 0 if there are none."""
    masked = masked.to(values.dtype)  # (...)
    return (values * masked).sum() / masked.sum().clamp(min=1)  # ()


def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Masked language modelling [UNITER §MLM]: predict each masked word-piece from the other
    words and the whole image (conditional masking: the image is never masked in an MLM batch).

        L_MLM = -(1/M) Σ_{m masked} log P_θ(w_m | w_\\m, v)

        symbol          variable                           shape
        P_θ(· | ...)    softmax(logits[b, t])              (B, T, V)  (or any (..., V))
        w_m             labels[b, t] where != ignore_index (B, T)
        M               number of labelled positions       ()

    The mean over the masked word-pieces of the batch, as [code]. Its labels use -1 for "not
    masked"; we use PyTorch's -100. Nothing labelled gives 0.
    """
    V = logits.shape[-1]
    nll = F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1),
                          ignore_index=ignore_index, reduction="none")  # (B·T,), 0 where ignored
    return _masked_mean(nll, labels.reshape(-1) != ignore_index)  # ()


def mrfr_loss(predicted: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Masked region feature regression [UNITER §MRM]: regress each masked region's detector
    feature from the text and the other regions.

        L_MRFR = (1/(M·F)) Σ_{i masked} || h_θ(v_i) - r(v_i) ||²

        symbol     variable                          shape
        h_θ(v_i)   predicted[b, n]                   (B, N, F)
        r(v_i)     target[b, n]: the input feature   (B, N, F), copied before masking
        M          masked.sum()                      ()

    As [code], the squared error is averaged over the F dimensions as well (an element-wise MSE
    over the masked rows); specs/uniter_oscar.md §A7 reports a summed L2 in the paper, not
    checked here. Model concern, for the next session: h_θ's last layer is the Image Embedder's
    feature Linear (D <- F) used transposed, the same Parameter object, with its own zero bias.
    """
    squared_error = (predicted.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    return _masked_mean(squared_error, masked)  # ()


def mrc_loss(logits: Tensor, detector_probs: Tensor, masked: Tensor) -> Tensor:
    """Masked region classification [UNITER §MRM]: predict the detector's most likely object
    class of each masked region, a hard label.

        L_MRC = -(1/M) Σ_{i masked} log softmax(g_θ(v_i))[c_i]
        c_i   = 1 + argmax_{c >= 1} p̃(v_i)_c        (the best object class, never background)

        symbol     variable                      shape
        g_θ(v_i)   logits[b, n]                  (B, N, C)
        p̃(v_i)     detector_probs[b, n]          (B, N, C): detector softmax, background at 0
        M          masked.sum()                  ()

    As [code], background (class 0) is left out of the argmax, so it is never a target even where
    the detector thinks it most likely; the model still has a background logit.
    """
    C = logits.shape[-1]
    target = detector_probs[..., 1:].argmax(dim=-1) + 1  # (B, N): best object class, never 0
    nll = F.cross_entropy(logits.reshape(-1, C).float(), target.reshape(-1),
                          reduction="none")  # (B·N,)
    return _masked_mean(nll, masked.reshape(-1))  # ()


def mrc_kl_loss(logits: Tensor, detector_probs: Tensor, masked: Tensor) -> Tensor:
    """Masked region classification with KL-divergence [UNITER §MRM]: match the detector's
    whole class distribution instead of its argmax.

        L_MRC-kl = (1/M) Σ_{i masked} KL(p̃(v_i) ‖ softmax(g_θ(v_i)))
                 = (1/M) Σ_{i masked} Σ_c t_c (log t_c - log p_c),   0 · log 0 := 0

        symbol     variable                                shape
        t_c        detector_probs[b, n, c]                 (B, N, C), background included
        log p_c    log_softmax(logits[b, n])_c             (B, N, C)
        M          masked.sum()                            ()

    DEVIATION: [code] takes the element-wise mean over the M × C entries, i.e. this loss divided
    by C (1601); we keep the per-region KL, which does not shrink with the number of classes.
    Divide by C to compare loss values with the original.
    """
    t = detector_probs.float()  # (B, N, C)
    log_p = logits.float().log_softmax(dim=-1)  # (B, N, C)
    kl = (torch.xlogy(t, t) - t * log_p).sum(dim=-1)  # (B, N): Σ_c t (log t - log p)
    return _masked_mean(kl, masked)  # ()


def itm_loss(logits: Tensor, is_match: Tensor) -> Tensor:
    """Image-text matching [UNITER §ITM]: does this caption describe this image? The score comes
    from the [CLS] output (the pooler and the Linear(D, 2) are the model's).

        L_ITM = -(1/B) Σ_b [ y_b log s_b + (1 - y_b) log(1 - s_b) ],   s_b = softmax(z_b)_1

        symbol   variable              shape
        z_b      logits[b]             (B, 2): column 1 = "match", column 0 = "no match"
        y_b      is_match[b]           (B,) bool or 0/1

    A 2-way softmax, as [code]; it is the binary cross-entropy above because
    softmax(z)_1 = sigmoid(z_1 - z_0).
    """
    return F.cross_entropy(logits.float(), is_match.long())  # ()


@torch.no_grad()
def ipot(cost: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float = 0.5, iters: int = 50,
         k: int = 1) -> Tensor:
    """Transport plans between text tokens and regions by IPOT [IPOT], batched, as the WRA of
    [UNITER §WRA; code] uses it. Computed without gradient, in cost's dtype (fp32 or fp64).

    The exact problem, for each example b with n_x real tokens and n_y real regions:

        T* = argmin_{T >= 0} Σ_ij C_ij T_ij   such that   Σ_j T_ij = 1/n_x,  Σ_i T_ij = 1/n_y

    IPOT is a proximal-point method: each outer step solves the problem with a KL penalty
    β · KL(T ‖ T_prev) towards the previous plan, approximately, by k Sinkhorn scalings of the
    kernel Q = exp(-C/β) ⊙ T_prev:

        Q = G ⊙ T          G = exp(-C / β), 0 on padded pairs;  T starts at 1 on real pairs
        b = ν / (Qᵀ a)     region scaling,  ν = 1/n_y on real regions, 0 on padding
        a = μ / (Q b)      token scaling,   μ = 1/n_x on real tokens,  0 on padding
        T = diag(a) Q diag(b)

    Unlike plain Sinkhorn, the penalty is towards T_prev, not towards uniform, so the plans
    converge to the exact T* as iters grows, for any β. As [code], a starts at μ and is updated
    last, so the token marginals (rows) are exact after any number of iterations and the region
    marginals (columns) are approximate; after 50 iterations at β = 0.5 they are close.

        symbol   variable / shape
        C        cost (B, T, N); values on padded pairs are ignored (they may be anything)
        real     x_mask (B, T) and y_mask (B, N), True = a real token / region
        μ, ν     built here from the masks: 1/n_x and 1/n_y on the real entries
        T        the returned plan (B, T, N): >= 0, exact zeros on padded rows and columns
                 (in the equations T is the plan, as in [code]; in shapes, the text length)

    An example with no real token or no real region gets an all-zero plan. exp(-C/β) must neither
    overflow nor underflow: for the cosine costs of WRA (C in [0, 2]) and β = 0.5 it lies in
    [e^-4, 1].
    """
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"ipot computes in fp32 or fp64; cost is {cost.dtype} "
                         f"(cast it with .float() first)")
    if cost.dim() != 3:
        raise ValueError(f"cost must be (B, T, N), got shape {tuple(cost.shape)}")
    B, T, N = cost.shape
    if x_mask.shape != (B, T) or y_mask.shape != (B, N):
        raise ValueError(f"for cost {tuple(cost.shape)} x_mask must be {(B, T)} and y_mask "
                         f"{(B, N)}, got {tuple(x_mask.shape)} and {tuple(y_mask.shape)}")
    if x_mask.dtype != torch.bool or y_mask.dtype != torch.bool:
        raise ValueError(f"x_mask and y_mask must be bool (True = real), "
                         f"got {x_mask.dtype} and {y_mask.dtype}")
    if not beta > 0 or iters < 1 or k < 1:
        raise ValueError(f"need beta > 0, iters >= 1 and k >= 1, got {beta}, {iters}, {k}")

    with torch.autocast(cost.device.type, enabled=False):  # bmm in cost's dtype, not bf16
        # an example with no real token or no real region counts as having neither: all-zero plan
        x_real = x_mask & y_mask.any(dim=1, keepdim=True)  # (B, T)
        y_real = y_mask & x_mask.any(dim=1, keepdim=True)  # (B, N)
        real_pair = x_real[:, :, None] & y_real[:, None, :]  # (B, T, N)
        mu = x_real.to(cost.dtype)  # (B, T), then 1/n_x on real tokens, 0 on padding
        nu = y_real.to(cost.dtype)  # (B, N), then 1/n_y on real regions, 0 on padding
        mu = (mu / mu.sum(dim=1, keepdim=True).clamp(min=1))[:, None, :]  # (B, 1, T), a row for bmm
        nu = (nu / nu.sum(dim=1, keepdim=True).clamp(min=1))[:, None, :]  # (B, 1, N)
        x_pad = (~x_real).to(cost.dtype)[:, None, :]  # (B, 1, T): 1 on padding, so 0/1 = 0 there
        y_pad = (~y_real).to(cost.dtype)[:, None, :]  # (B, 1, N)
        kernel = torch.where(real_pair, torch.exp(-cost / beta), 0.0)  # (B, T, N): G
        plan = real_pair.to(cost.dtype)  # (B, T, N): T starts at 1 on real pairs
        a = mu  # (B, 1, T)
        floor = torch.finfo(cost.dtype).tiny * 1e8  # 1.2e-30 in fp32, 2.2e-300 in fp64: see below
        for _ in range(iters):
            Q = plan.mul_(kernel)  # (B, T, N): G ⊙ T, in place (this T is not needed again)
            for _ in range(k):
                b = nu / (torch.bmm(a, Q) + y_pad)  # (B, 1, N): ν / (Qᵀ a), exact 0 on padding
                a = mu / (torch.bmm(b, Q.transpose(1, 2)) + x_pad)  # (B, 1, T): μ / (Q b)
            plan = Q.mul_(a.transpose(1, 2) * b)  # (B, T, N): diag(a) Q diag(b), in place
            # DEVIATION (speed only): entries below `floor` become exact zeros. The entries that the
            # exact plan sets to 0 shrink geometrically (by up to e^-4 an iteration when C = 2 and
            # β = 0.5); in fp32 they reach denormal numbers (below 1.2e-38) within a few dozen
            # iterations, and CPU arithmetic on denormals is several times slower. The floor sits
            # 1e8 above them so that Q = G ⊙ T and the scalings do not make any either. What is
            # dropped moves d by less than 2·T·N·floor. (torch.set_flush_denormal is process-wide
            # state, not ours to flip.)
            F.threshold(plan, floor, 0.0, inplace=True)  # (B, T, N)
    return plan


def wra_distance(text_hidden: Tensor, region_hidden: Tensor, text_mask: Tensor,
                 region_mask: Tensor, beta: float = 0.5, iters: int = 50, k: int = 1) -> Tensor:
    """The OT distance between each example's text outputs and region outputs [UNITER §WRA]:

        d_b = Σ_ij C_ij T_ij,   C_ij = 1 - cos(x_i, y_j),   T = ipot(C), held constant

        symbol   variable                                 shape
        x_i      text_hidden[b, i] (final layer)          (B, T, D), [CLS] and [SEP] included
        y_j      region_hidden[b, j] (final layer)        (B, N, D)
        C        cost, 0 on padded pairs                  (B, T, N), in [0, 2]
        T        ipot(C.detach(), ...)                    (B, T, N), no gradient
        d_b      the returned distance                    (B,), in [0, 2]

    As [code]: the costs are computed in fp32 (also under bf16 autocast) and the plan is a
    constant, so the gradient reaches the hidden states only through C: ∂d/∂C = T.
    Returns (B,) in fp32.
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
    """Word-region alignment [UNITER §WRA; code]: on an ITM batch, pull the words and regions of
    matched pairs together and push those of mismatched pairs apart, through the OT distance:

        L_WRA = (1/n) ( Σ_{b: y_b = 1} d_b  -  Σ_{b: y_b = 0} d_b )

        symbol   variable                                           shape
        d_b      wra_distance(text_hidden, region_hidden, ...)[b]   (B,), in [0, 2]
        y_b      is_match[b]                                        (B,) bool or 0/1
        n        B, positives and negatives together                ()

    The sign: minimising L_WRA lowers d for matched pairs and raises it for mismatched ones. So
    L_WRA lies in [-2, 2] and can be negative; there is no margin or hinge (d <= 2 bounds the
    push). The model adds wra_weight · L_WRA to the ITM loss, over every pair of an ITM batch.
    AMBIGUITY: the part of the paper checked here (the abstract) says only that WRA uses OT to
    "encourage fine-grained alignment between words and image regions"; how mismatched pairs
    enter and what divides the sum is unstated there. We follow [code]: both signs, divided by
    the whole batch size n = n_pos + n_neg (not a mean over each group).
    """
    d = wra_distance(text_hidden, region_hidden, text_mask, region_mask, beta, iters, k)  # (B,)
    sign = is_match.bool().to(d.dtype) * 2 - 1  # (B,): +1 matched, -1 mismatched
    return (sign * d).sum() / d.shape[0]  # ()
