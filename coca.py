"""CoCa: Contrastive Captioners are Image-Text Foundation Models, written from primitives.

    Jiahui Yu, Zirui Wang, Vijay Vasudevan, Legg Yeung, Mojtaba Seyedhosseini, Yonghui Wu.
    TMLR 2022; arXiv 2205.01917v2 (14 Jun 2022). Every `[CoCa ...]` tag cites that version;
    `[code]` is open_clip 89fb801, the reference implementation we compare against (its
    released-weights layout, Config.open_clip, as open_clip 3.3.0 builds it).

One image encoder, a text decoder cut in two halves, two losses from one pass [CoCa Fig. 2]:

    image -> ViT -> image tokens -+-> contrastive pooler (1 query) ---------> x (image embedding)
                                  +-> captioning pooler (256 queries) -> image queries --+
    text -> unimodal layers (causal, no image) -+-> learned [CLS] at the end -> y        |
                                                +-> token states -> multimodal layers <--+
                                        (causal self-attn + cross-attn) -> next-token logits
    L_CoCa = λ_Con · L_Con(x, y) + λ_Cap · L_Cap(logits, text)                 [CoCa §3.2, Eq. 4]

Paper map (section / equation -> code)
    §3.2, Table 1; §4.1 "Optimization"             Config, Config.paper()
    §3.2 "288 × 288 and patch size 18 × 18"         PatchEmbedding, ImageEncoder
    §3.2 "Attentional Poolers"; §4.3, Table 8f      AttentionalPooler, CoCa.pool
    §3.2 "Decoupled Text Decoder"                   unimodal_attention_mask, TextDecoder
    §3.1, Eq. 2 (contrastive)                       contrastive_loss
    §3.1, Eq. 3 (captioning)                        captioning_loss
    §3.2, Eq. 4 (both, what the model calls)        coca_loss
    §3.2 "Pretraining Efficiency" (one pass)        CoCa.forward
    §4.1 trainable temperature                      CoCa.logit_scale, after_optimizer_step
    §3.3 zero-shot transfer; §4.2.2                 CoCa.embed_images / embed_texts,
                                                    zero_shot_accuracy, evaluate
    §3.3 frozen-feature evaluation                  linear_probe (DEVIATION: linear head)
    §4.2.3 image captioning                         CoCa.generate, caption_images
    §4.3, Table 8b objective ablation               Config.lambda_con = 0 or lambda_cap = 0
    not the paper: open_clip's released CoCa [code]  Config.open_clip; the Config fields after
        (one 256-query pooler, ViT class token,      "open_clip's released CoCa"; pooler_layout
        two MLPs a multimodal layer, ...)            "single"; from_open_clip (section 7)

Layout: sections 1-6 are the paper (config, inputs, encoders and decoder, objectives, model,
generation); below the fence line, sections 7-9 are what train.py and the tools ask of a paper
file (tasks, config checks, optimizer; data; evaluation on the world).

Left out, and why: the JFT-3B + ALIGN data (the synthetic world of shared/world.py instead); the
global batch of 65,536 and Adafactor (AdamW with the paper's betas and decay, make_optimizer);
the extra epoch at 576 × 576 [§4.1]; video (§3.3, Fig. 3); VQA / SNLI-VE / NLVR2 fine-tuning
[§4.2.3, Appendix B]; the 64k sentence-piece vocabulary (WordPiece trained on the world's
captions). CoCa pretrains one model for every downstream use, so TASKS is ("pretrain",) and the
model has no task-specific head.

Shapes: B batch, T text tokens, N image tokens (patches), Q pooler queries, Dv vision width,
D text width, E embedding width, V vocabulary, H heads, C classes. Masks: True = may attend.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import shared.decoding as decoding  # greedy, beam search, nucleus sampling (section 6)
from shared.attention import MultiHeadAttention
from shared.distributed import all_mean, gather_with_grad, rank, world_size
from shared.masks import causal_mask, padding_mask
from shared.transformer import (PreLNDecoderBlock, PreLNEncoderBlock, init_bert_weights,
                                run_layer)

PAD_ID = 0  # [PAD] of shared.tokenizer; padded keys are masked, padded targets ignored


# --- 1. Config and presets ---------------------------------------------------------------------

@dataclass
class Config:
    """CoCa-Base [CoCa Table 1] and the pretraining recipe of [CoCa §4.1]. `OURS:` marks values the
    paper does not give. Every field but image_mean/std is a train.py flag (`--text_width 256`)."""
    task: str = "pretrain"  # the only one (TASKS)
    # image encoder: a ViT trained from scratch [CoCa §3.2]
    image_size: int = 288  # §3.2: "image resolution of 288 × 288"
    patch_size: int = 18  # §3.2: "patch size 18 × 18, resulting in a total of 256 image tokens"
    patch_stem: str = "linear"  # ViT's linear patch embedding; "conv" = OURS, see PatchEmbedding
    vision_width: int = 768  # Table 1, CoCa-Base: Hidden
    vision_layers: int = 12  # Table 1: Image Encoder Layers
    vision_heads: int = 12  # Table 1: Heads
    mlp_ratio: float = 4.0  # Table 1: MLP 3072 = 4 × 768, in both towers
    # attentional poolers [CoCa §3.2]
    n_caption_queries: int = 256  # §3.2: n_query = 256 for the generative loss (1 for contrastive)
    pooler_layout: str = "cascade"  # §4.3: "used by default in all CoCa models" (see CoCa.pool)
    pooler_heads: int = 0  # OURS: §3.2 states none; 0 = text_heads
    # decoupled text decoder [CoCa §3.2]
    text_width: int = 768  # Table 1: Hidden
    text_heads: int = 12  # Table 1: Heads
    unimodal_layers: int = 12  # Table 1: n_uni
    multimodal_layers: int = 12  # Table 1: n_multi; §3.2 "we split the decoder in half"
    vocab_size: int = 64_000  # §4.1: sentence-piece vocabulary of 64k (train.py resets it)
    max_text_len: int = 64  # OURS: not stated; the [CLS] gets one more position (row max_text_len)
    embed_dim: int = 768  # OURS: width of x_i, y_j in Eq. 2; the paper states no projection
    dropout: float = 0.0  # OURS: the paper states none
    # objective [CoCa §3.2, Eq. 4]
    lambda_con: float = 1.0  # §4.1: λ_Con = 1.0
    lambda_cap: float = 2.0  # §4.1: λ_Cap = 2.0 ("a larger captioning loss weight is better")
    init_temperature: float = 0.07  # §4.1: "trainable temperature τ with an initial value of 0.07"
    max_logit_scale: float = 100.0  # OURS (CLIP, open_clip): 1/τ clamped to ≤ 100 after each step
    # open_clip's released CoCa [code: open_clip transformer.py, coca_model.py]; all off = paper
    vision_cls_token: bool = False  # a learned class token before the patches (one key more)
    ln_pre: bool = False  # a LayerNorm on the embedded patches, before the first ViT block
    patch_bias: bool = True  # the linear patch embedding's bias (open_clip's conv1 has none)
    cross_kv_norm: bool = False  # a LayerNorm on the image queries before each cross-attention
    separate_cross_block: bool = False  # a multimodal layer is a self-attention block and a
    #                                     cross-attention block, each with its own MLP
    output_bias: bool = True  # the vocabulary projection's bias (open_clip's has none)
    legacy_cls_mask: bool = False  # [CLS]'s keys shifted by one, as open_clip's released weights
    #                                were trained (unimodal_attention_mask)
    ln_eps: float = 1e-6  # every LayerNorm's epsilon (open_clip: 1e-5, torch's default)
    image_mean: tuple = (0.485, 0.456, 0.406)  # per-channel pixel statistics the model is fed
    image_std: tuple = (0.229, 0.224, 0.225)  # with: ImageNet's (open_clip: CLIP's)
    # downstream
    beam_size: int = 1  # OURS: caption decoding in evaluate(); 1 = greedy (the paper states none)
    # pretraining recipe, read by train.py [CoCa §4.1]
    batch_size: int = 65_536  # §4.1: "batch size of 65,536 image-text pairs"
    lr: float = 8e-4  # §4.1: peak learning rate
    weight_decay: float = 0.01  # §4.1: "decoupled weight decay ratio of 0.01"
    beta1: float = 0.9  # §4.1 (Adafactor; DEVIATION: make_optimizer uses AdamW with these betas)
    beta2: float = 0.999  # §4.1
    warmup_steps: int = 10_000  # §4.1: "the first 2% of training steps" of 500k
    max_steps: int = 500_000  # §4.1: 500k steps
    lr_schedule: str = "linear"  # §4.1: "linearly decay it afterwards"
    grad_clip: float = 1.0  # OURS: not stated for pretraining; Tables 9, 10 clip 1.0 (fine-tuning)
    grad_accum_steps: int = 1  # OURS: micro-batches an update (batch_size is split in this many)
    grad_checkpointing: bool = False  # OURS: recompute activations in the backward (memory)
    train_single_object_prob: float = 0.0  # OURS: the world's train mix; 0 = uniform 1-4 objects


    def __post_init__(self):
        problems = config_problems(self)  # every problem at once, one line each (section 7)
        if problems:
            raise ValueError("; ".join(problems))


    @classmethod
    def paper(cls, task: str = "pretrain") -> "Config":
        """CoCa-Base [CoCa Table 1] with the recipe of [CoCa §4.1] (batch 65,536: a TPU pod).
        One task: the pre-trained model is evaluated zero-shot and frozen [CoCa §4.2]; its
        fine-tuning (VQA heads, captioning with L_Cap alone [CoCa §4.2.3, App. B]) is not a
        task of this file."""
        return cls(task=task)

    @classmethod
    def small(cls) -> "Config":
        """OURS: one GPU, hours: a ViT-S-sized CoCa on 128 px world images. Parallel poolers, as
        tiny (see there)."""
        return cls(image_size=128, patch_size=16, patch_stem="conv", pooler_layout="parallel",
                   vision_width=384,
                   vision_layers=6, vision_heads=6, n_caption_queries=64, text_width=384,
                   text_heads=6, unimodal_layers=4, multimodal_layers=4, vocab_size=1000,
                   max_text_len=40, embed_dim=384, batch_size=256, lr=5e-4, warmup_steps=500,
                   max_steps=20_000, lr_schedule="cosine", train_single_object_prob=0.5)

    @classmethod
    def tiny(cls) -> "Config":
        """OURS: 2 CPU cores, about 10 minutes: 64 px, 64 image tokens from a conv stem, 32
        caption queries, 2 + 2 text layers, half of the training scenes with one object.
        Parallel poolers (Fig. 2): the layout the tiny job was tuned and measured with; the
        paper's cascade is one flag away (--pooler_layout cascade; its effect on the world is in
        RESULTS.md)."""
        return cls(image_size=64, patch_size=8, patch_stem="conv", pooler_layout="parallel",
                   vision_width=128,
                   vision_layers=3, vision_heads=2, n_caption_queries=32, text_width=128,
                   text_heads=2, unimodal_layers=2, multimodal_layers=2, vocab_size=1000,
                   max_text_len=32, embed_dim=128, batch_size=64, lr=1e-3, warmup_steps=100,
                   max_steps=1800, lr_schedule="cosine", train_single_object_prob=0.5)

    @classmethod
    def open_clip(cls, name: str) -> "Config":
        """open_clip's "coca_ViT-B-32" or "coca_ViT-L-14" [code: open_clip model_configs]: the
        layout of its released weights, built by open_clip_config (section 7)."""
        if name not in OPEN_CLIP_MODELS:
            raise ValueError(f"no open_clip CoCa {name!r}: {', '.join(OPEN_CLIP_MODELS)}")
        return open_clip_config(OPEN_CLIP_MODELS[name])


# --- 2. Inputs: the patch embedding ------------------------------------------------------------

class PatchEmbedding(nn.Module):
    """Image -> N = (image_size / p)^2 tokens of width Dv (ViT, Dosovitskiy et al. 2021, its Eq. 1;
    the image encoder of [CoCa §3.2]).

    "linear" (the paper's ViT): cut the image into p×p patches, flatten each to 3·p·p numbers and
    map them with one shared Linear.
    "conv": DEVIATION: log2(p) stride-2 3×3 convolutions (GELU between) and a 1×1 convolution,
    giving the same N tokens, because at 64 px a linear patch embedding learned shape barely at
    all in CPU minutes while such an early-convolution stem (Xiao et al. 2021) learned it much
    better (measured: RESULTS.md). Used by tiny() and small(); paper() is linear.
    """

    def __init__(self, config: Config):
        super().__init__()
        p, Dv = config.patch_size, config.vision_width
        self.patch_size, self.stem = p, config.patch_stem
        if self.stem == "linear":
            self.proj = nn.Linear(3 * p * p, Dv, bias=config.patch_bias)  # E in ViT's Eq. 1
        else:
            n_stages = int(math.log2(p))  # each stage halves the resolution
            widths = [3] + [max(Dv >> (n_stages - 1 - s), 8) for s in range(n_stages)]  # .., Dv
            layers = []
            for c_in, c_out in zip(widths[:-1], widths[1:]):
                layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            self.proj = nn.Sequential(*layers, nn.Conv2d(widths[-1], Dv, 1))

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised pixels. Returns (B, N, Dv)."""
        B, _, Hp, Wp = images.shape
        p = self.patch_size
        if self.stem == "linear":
            x = images.reshape(B, 3, Hp // p, p, Wp // p, p)  # (B, 3, H/p, p, W/p, p)
            x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, 3, p, p), one patch per (row, col)
            x = x.reshape(B, (Hp // p) * (Wp // p), 3 * p * p)  # (B, N, 3·p·p), raster order
            return self.proj(x)  # (B, N, Dv)
        x = self.proj(images)  # (B, Dv, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, Dv), patches in raster order


# --- 3. Image encoder, attentional poolers, decoupled text decoder -----------------------------

class ImageEncoder(nn.Module):
    """The ViT of [CoCa §3.2]: patch embedding + learned positions, pre-LN blocks, a final
    LayerNorm.

    No ViT class token: CoCa reads the image through its attentional poolers instead.
    open_clip's ViT [code] has one (vision_cls_token, its own position, one key more for the
    pooler) and a LayerNorm before the blocks (ln_pre)."""

    def __init__(self, config: Config):
        super().__init__()
        Dv = config.vision_width
        self.image_size, self.checkpointed = config.image_size, config.grad_checkpointing
        self.patch_embedding = PatchEmbedding(config)
        N = (config.image_size // config.patch_size) ** 2 + config.vision_cls_token  # tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, Dv)) if config.vision_cls_token else None
        self.positions = nn.Parameter(torch.zeros(1, N, Dv))  # learned, one per token
        self.pre_norm = nn.LayerNorm(Dv, eps=config.ln_eps) if config.ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(
            PreLNEncoderBlock(Dv, config.vision_heads, int(config.mlp_ratio * Dv), config.dropout,
                              eps=config.ln_eps)
            for _ in range(config.vision_layers))
        self.norm = nn.LayerNorm(Dv, eps=config.ln_eps)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W). Returns the encoder output (B, N, Dv)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model was built for "
                             f"{self.image_size}x{self.image_size}")
        x = self.patch_embedding(images)  # (B, (H/p)², Dv)
        if self.cls_token is not None:  # [code] the class token first
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)  # (B, 1+(H/p)², Dv)
        x = self.pre_norm(x + self.positions)  # (B, N, Dv), N tokens in all
        for block in self.blocks:
            x = run_layer(block, x, checkpointed=self.checkpointed)  # (B, N, Dv), all to all
        return self.norm(x)  # (B, N, Dv)


class AttentionalPooler(nn.Module):
    """pooler(tokens) = LayerNorm(MultiHeadAttention(q = learned queries, k = v = tokens)).

    [CoCa §3.2] "a pooler is a single multi-head attention layer with n_query learnable queries,
    with the encoder output as both keys and values"; then a LayerNorm. AMBIGUITY: the text of
    §3.2 names no LayerNorm; it comes from the pseudocode drawn inside [CoCa Fig. 2], and
    open_clip normalises the pooled tokens too [code]. Nor does the text say how many heads: we
    use the text decoder's (or pooler_heads). open_clip's pooler also normalises its queries
    (query_norm) and its keys and values (our ImageEncoder.norm does that) [code].
    No residual and no MLP: the queries are parameters, not tokens with content.
    """

    def __init__(self, n_queries: int, d_model: int, n_heads: int, context_dim: int,
                 dropout: float = 0.0, eps: float = 1e-6, query_norm: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(n_queries, d_model))  # (Q, D), learned
        self.query_norm = nn.LayerNorm(d_model, eps=eps) if query_norm else nn.Identity()
        self.attn = MultiHeadAttention(d_model, n_heads, dropout, context_dim=context_dim)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, N, Dc) keys and values. Returns (B, Q, D)."""
        queries = self.query_norm(self.queries).expand(tokens.shape[0], -1, -1)  # (B, Q, D)
        return self.norm(self.attn(queries, context=tokens))  # (B, Q, D)


def unimodal_attention_mask(tokens: Tensor, pad_id: int = PAD_ID, legacy: bool = False) -> Tensor:
    """The self-attention mask of the unimodal layers for the sequence [tokens..., CLS].

    Text rows are causal ([CoCa §3.2] "All decoder layers prohibit tokens from attending to
    future tokens"); the [CLS] row (the last one) sees every non-pad token and itself, so its row
    is exactly `(tokens != pad) + [True]` (open_clip issue #554 shipped it shifted by one).

        tokens [CLS] a SEP PAD PAD  + contrastive [CLS]      (1 = may attend)
                  CLS a SEP PAD PAD cls
        CLS        1  .  .   .   .   .
        a          1  1  .   .   .   .
        SEP        1  1  1   .   .   .
        PAD        1  1  1   .   .   .     pad rows: read by no real position later on
        PAD        1  1  1   .   .   .
        cls        1  1  1   .   .   1     the text embedding y

    legacy (legacy_cls_mask; open_clip's released weights were trained so [code: open_clip
    transformer.py, TextTransformer]): the key row is [1] + (tokens != pad), shifted one right:
    [CLS] sees the first PAD and not itself (unless no PAD is left); text rows are unchanged
    (their keys are real tokens either way). That depends on the padding: TextDecoder pads to
    max_text_len, as open_clip's tokenizer does.

    Args:
        tokens: (B, T) right-padded token ids.
    Returns:
        (B, T+1, T+1) bool, True = may attend.
    """
    B, T = tokens.shape
    real_keys = padding_mask(tokens, pad_id)  # (B, 1, T), pads are hidden keys
    cls_key = torch.ones(B, 1, 1, dtype=torch.bool, device=tokens.device)  # (B, 1, 1), a real key
    keys = torch.cat([cls_key, real_keys] if legacy else [real_keys, cls_key], dim=-1)  # (B,1,T+1)
    return causal_mask(T + 1, device=tokens.device) & keys  # (B, T+1, T+1)


class TextDecoder(nn.Module):
    """The decoupled text decoder [CoCa §3.2, Fig. 2].

    unimodal:   n_uni layers of causal self-attention, no cross-attention; a learned [CLS] is
                appended after the text and its output (after a LayerNorm, drawn in Fig. 2's
                pseudocode) is the text embedding.
    multimodal: n_multi layers of causal self-attention, cross-attention to the captioning
                pooler's queries, one MLP (the standard decoder layer; open_clip's CoCa has two
                MLPs per layer, one in its self-attention block and one in its cross-attention
                block: separate_cross_block); then LayerNorm and the output projection to V
                logits.

    AMBIGUITY: the paper appends [CLS] "at the end of the input sentence"; with right-padded
    batches we append it after the padding (index T) and mask the pads out of its row, and it
    always takes the learned position row `max_text_len`. Its output therefore does not depend on
    how far a batch is padded, as in open_clip [code], which pads every text to one fixed length.
    AMBIGUITY: the paper does not say whether the output projection is tied to the token
    embedding; we do not tie it (nor does open_clip; CoCa-pytorch does), because Table 1's 297M
    text-decoder parameters for CoCa-Base are only reached untied (tests/test_coca.py). It is
    initialised explicitly (open_clip issue #554: left as uninitialised memory there).
    """

    def __init__(self, config: Config):
        super().__init__()
        D, H = config.text_width, config.text_heads
        d_hidden = int(config.mlp_ratio * D)
        self.max_text_len, self.checkpointed = config.max_text_len, config.grad_checkpointing
        self.legacy_cls_mask, eps = config.legacy_cls_mask, config.ln_eps
        self.token_embedding = nn.Embedding(config.vocab_size, D)
        self.positions = nn.Parameter(torch.zeros(config.max_text_len + 1, D))  # last row: [CLS]
        self.cls_embedding = nn.Parameter(torch.zeros(D))  # learned [CLS], not a vocabulary id
        self.unimodal_layers = nn.ModuleList(
            PreLNEncoderBlock(D, H, d_hidden, config.dropout, eps=eps)
            for _ in range(config.unimodal_layers))
        self.cls_norm = nn.LayerNorm(D, eps=eps)
        self.multimodal_layers = nn.ModuleList(
            PreLNDecoderBlock(D, H, d_hidden, config.dropout, eps, context_dim=D,
                              two_mlps=config.separate_cross_block,
                              norm_context=config.cross_kv_norm)
            for _ in range(config.multimodal_layers))
        self.output_norm = nn.LayerNorm(D, eps=eps)
        self.output = nn.Linear(D, config.vocab_size, bias=config.output_bias)  # untied

    def unimodal(self, tokens: Tensor, with_cls: bool = True) -> tuple[Tensor, Tensor | None]:
        """tokens: (B, T) ids, T <= max_text_len.

        Returns the token states (B, T, D) for the multimodal layers and the LayerNorm'd [CLS]
        state (B, D) for the contrastive loss (None when `with_cls` is False, as in generation).
        """
        B, T = tokens.shape
        if T > self.max_text_len:
            raise ValueError(f"{T} text tokens, but max_text_len is {self.max_text_len}")
        if self.legacy_cls_mask and with_cls:  # its mask depends on the padding (see there)
            tokens = F.pad(tokens, (0, self.max_text_len - T), value=PAD_ID)  # (B, max_text_len)
        x = self.token_embedding(tokens) + self.positions[:tokens.shape[1]]  # (B, T, D)
        if not with_cls:
            for layer in self.unimodal_layers:
                x = layer(x, causal=True)  # (B, T, D)
            return x, None
        cls = (self.cls_embedding + self.positions[-1]).expand(B, 1, -1)  # (B, 1, D)
        x = torch.cat([x, cls], dim=1)  # (B, T+1, D), [CLS] appended after the text
        allowed = unimodal_attention_mask(tokens, legacy=self.legacy_cls_mask)  # (B, T+1, T+1)
        for layer in self.unimodal_layers:
            x = run_layer(layer, x, allowed=allowed,
                          checkpointed=self.checkpointed)  # (B, T+1, D)
        return x[:, :T], self.cls_norm(x[:, -1])  # (B, T, D), (B, D): [CLS] is last

    def multimodal(self, text_states: Tensor, image_queries: Tensor) -> Tensor:
        """text_states: (B, T, D) from `unimodal`; image_queries: (B, Q, D) from the captioning
        pooler. Returns next-token logits (B, T, V); logits[:, t] predicts token t+1."""
        x = text_states
        for layer in self.multimodal_layers:  # pads are handled by the loss
            x = run_layer(layer, x, image_queries, causal=True,
                          checkpointed=self.checkpointed)  # (B, T, D)
        return self.output(self.output_norm(x))  # (B, T, V)

    def step(self, token: Tensor, position: int, past: list | None, cross_kv: list
             ) -> tuple[Tensor, list]:
        """One decoding step with a key/value cache: the token at `position` (R,) through the
        unimodal then the multimodal layers, attending to the cached keys and values of
        positions 0 .. position - 1 (past: [(k, v)] * (unimodal + multimodal layers), each
        (R, H, position, Dh); None at position 0) and to the image queries' cross-attention
        keys and values (cross_kv, one (k, v) per multimodal layer, projected once per image).
        Causality needs no mask: the one query may see every cached position and itself.
        Returns (next-token logits (R, V), the cache with this position appended)."""
        x = (self.token_embedding(token) + self.positions[position])[:, None]  # (R, 1, D)
        cache = []
        layers = [*self.unimodal_layers, *self.multimodal_layers]
        for l, layer in enumerate(layers):
            attn, norm = ((layer.attn, layer.attn_norm) if l < len(self.unimodal_layers)
                          else (layer.self_attn, layer.self_attn_norm))
            k, v = attn.project_kv(norm(x))  # (R, H, 1, Dh) each
            if past is not None:
                k, v = torch.cat([past[l][0], k], dim=2), torch.cat([past[l][1], v], dim=2)
            cache.append((k, v))  # (R, H, position + 1, Dh)
            if l < len(self.unimodal_layers):
                x = layer(x, kv=(k, v))  # (R, 1, D)
            else:
                x = layer(x, None, causal=False, kv=(k, v),
                          context_kv=cross_kv[l - len(self.unimodal_layers)])  # (R, 1, D)
        return self.output(self.output_norm(x[:, 0])), cache  # (R, V)


# --- 4. Objectives -----------------------------------------------------------------------------

def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                     all_image_emb: Tensor | None = None, all_text_emb: Tensor | None = None,
                     first_row: int = 0) -> Tensor:
    """The dual-encoder contrastive loss  [CoCa §3.1, Eq. 2]:

        L_Con = -(1/N) · ( Σ_i log exp(x_i^T y_i / σ) / Σ_j exp(x_i^T y_j / σ)      image -> text
                         + Σ_i log exp(y_i^T x_i / σ) / Σ_j exp(y_i^T x_j / σ) )    text -> image

        symbol  variable                          shape
        x_i     image_emb[i], L2-normalised here  (B, E)
        y_j     text_emb[j], L2-normalised here   (B, E)
        1/σ     logit_scale.exp()                 ()      logit_scale = log(1/σ), learnable;
                                                          σ is the τ of [CoCa §4.1]
        N       B, the batch; pair i is the only positive of row i

    The 1/N multiplies the sum of both directions, so this is the sum of two mean cross-entropies.
    open_clip's ClipLoss (and CoCa-pytorch) return half of it (the mean of the two directions):
    with their code, λ_Con = 1 weighs the contrastive term half as much as here.
    Worked example: x_i = y_i = e_i (orthonormal), σ = 1, N = 2: each of the 2·N log terms is
    log(e / (e + 1)), so L_Con = -(1/2)·4·log(e / (e + 1)) = 2 · 0.3133 = 0.6265.

    Across processes (shared/distributed.py): image_emb and text_emb are this rank's b pairs,
    all_image_emb and all_text_emb the whole batch's N·b (Σ_j runs over them: every other
    process's pairs are negatives too), first_row the index of this rank's first pair in it. The
    result is the mean over this rank's rows i; its mean over ranks is L_Con of the whole batch.
    """
    x = F.normalize(image_emb, dim=-1)  # (b, E), Eq. 2 uses normalised embeddings
    y = F.normalize(text_emb, dim=-1)  # (b, E)
    all_x = x if all_image_emb is None else F.normalize(all_image_emb, dim=-1)  # (B, E)
    all_y = y if all_text_emb is None else F.normalize(all_text_emb, dim=-1)  # (B, E)
    scale = logit_scale.exp()  # 1/σ
    targets = first_row + torch.arange(x.shape[0], device=x.device)  # (b,), row i's positive
    image_to_text = F.cross_entropy(scale * x @ all_y.T, targets)  # (b, B) logits x_i^T y_j / σ
    text_to_image = F.cross_entropy(scale * y @ all_x.T, targets)  # (b, B) logits y_i^T x_j / σ
    return image_to_text + text_to_image  # ()


def captioning_loss(logits: Tensor, tokens: Tensor, pad_id: int = PAD_ID,
                    n_targets: Tensor | None = None) -> Tensor:
    """Autoregressive captioning loss with teacher forcing  [CoCa §3.1, Eq. 3]:

        L_Cap = -Σ_t log P_θ(y_t | y_<t, x)

        symbol          variable                               shape
        P_θ(· | y_<t, x)  softmax(logits[:, t-1])              (B, T, V) -> the shift is here
        y_t             tokens[:, t], t = 1 .. T-1             (B, T); y_0 = [CLS] is only input

    DEVIATION: the mean over the non-pad targets of the batch instead of the sum over t, as in
    open_clip and VirTex, so that L_Cap does not grow with caption length and λ_Cap keeps its
    meaning across text lengths. n_targets (across processes): the sum over this rank's
    targets divided by the mean number of targets per rank, so that the mean over ranks is the
    mean over the whole batch's targets, however the tokens fall between ranks.
    """
    V = logits.shape[-1]
    predictions = logits[:, :-1]  # (B, T-1, V), position t-1 predicts token t
    targets = tokens[:, 1:]  # (B, T-1), the next tokens
    if n_targets is None:
        return F.cross_entropy(predictions.reshape(-1, V), targets.reshape(-1),
                               ignore_index=pad_id)
    return F.cross_entropy(predictions.reshape(-1, V), targets.reshape(-1), ignore_index=pad_id,
                           reduction="sum") / n_targets


def coca_loss(contrastive: Tensor, captioning: Tensor, lambda_con: float,
              lambda_cap: float) -> Tensor:
    """The CoCa objective, the composite the model calls  [CoCa §3.2, Eq. 4]:

        L_CoCa = λ_Con · L_Con + λ_Cap · L_Cap

        symbol  variable                                  paper value [CoCa §4.1]
        L_Con   contrastive, contrastive_loss(...) ()
        L_Cap   captioning, captioning_loss(...)   ()
        λ_Con   lambda_con                                1.0
        λ_Cap   lambda_cap                                2.0

    λ_Con = 0 or λ_Cap = 0 gives the captioning-only and contrastive-only models of the
    objective ablation [CoCa §4.3, Table 8b]. Example: L_Con = 0.5, L_Cap = 3 -> 0.5 + 6 = 6.5.
    """
    return lambda_con * contrastive + lambda_cap * captioning


# --- 5. The model ------------------------------------------------------------------------------

class CoCa(nn.Module):
    """The contrastive captioner of [CoCa Fig. 2]. `model(batch)` returns the loss and its terms.

    Every parameter serves the one pretraining task and every downstream use (zero-shot,
    retrieval, captioning), so `heads` (the contract's task-specific modules) stays empty and the
    state_dict is the same whatever the config's task.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        Dv, D, E = config.vision_width, config.text_width, config.embed_dim
        self.image_encoder = ImageEncoder(config)
        # both poolers output text-width tokens: the decoder cross-attends to them directly
        H, single = config.pooler_heads or config.text_heads, config.pooler_layout == "single"
        self.caption_pooler = AttentionalPooler(config.n_caption_queries, D, H, context_dim=Dv,
                                                dropout=config.dropout, eps=config.ln_eps,
                                                query_norm=single)
        contrastive_context = Dv if config.pooler_layout == "parallel" else D
        self.contrastive_pooler = None if single else AttentionalPooler(
            1, D, H, context_dim=contrastive_context, dropout=config.dropout, eps=config.ln_eps)
        self.text_decoder = TextDecoder(config)
        # AMBIGUITY: Eq. 2 compares x_i and y_j directly; we project both to E (bias-free, as CLIP)
        # so the shared space can be narrower than the towers. With E = D it is one extra matrix.
        self.image_projection = nn.Linear(D, E, bias=False)
        self.text_projection = nn.Linear(D, E, bias=False)
        # log(1/τ), learnable [CoCa §4.1]; stored as what is used: logits = exp(logit_scale) · x^T y
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.init_temperature)))
        self.heads = nn.ModuleDict()  # no task-specific head (TASKS = ("pretrain",))
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) Linear/Embedding weights, zero biases, unit LayerNorms (BERT/ViT practice;
        the paper gives no scheme); He-normal conv stem; N(0, 0.02) positions, queries, [CLS]."""
        self.apply(init_bert_weights)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        contrastive_queries = getattr(self.contrastive_pooler, "queries", None)  # "single": none
        for param in (self.image_encoder.positions, self.caption_pooler.queries,
                      contrastive_queries, self.text_decoder.positions,
                      self.text_decoder.cls_embedding, self.image_encoder.cls_token):
            if param is not None:
                nn.init.normal_(param, std=0.02)
        # explicit on purpose: the output projection must never be left uninitialised (open_clip
        # issue #554)
        nn.init.normal_(self.text_decoder.output.weight, std=0.02)
        if self.text_decoder.output.bias is not None:
            nn.init.zeros_(self.text_decoder.output.bias)

    def pool(self, image_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """The two task-specific attentional poolers [CoCa §3.2 "Attentional Poolers"].

        "cascade" (the default, paper()): the contrastive pooler reads the captioning pooler's 256
        outputs: [CoCa §4.3] "the 'cascade' version (contrastive pooler on top of the generative
        pooler) performs better and is used by default in all CoCa models" ([CoCa Table 8f]:
        zero-shot 71.6 vs 71.2, VQA 69.0 vs 68.7).
        "parallel" (Fig. 2's drawing): both poolers read the ViT output; tiny() and small() use
        it (the layout their runs were measured with). open_clip's released CoCa
        weights use neither: "single" [code], one 256-query pooler whose output query 0 is the
        contrastive embedding and whose queries 1..255 go to the decoder (open_clip issue #458).

        Args:
            image_tokens: (B, N, Dv) encoder output.
        Returns:
            contrastive (B, 1, D) and caption (B, Q, D) pooled tokens ("single": (B, Q-1, D)).
        """
        caption = self.caption_pooler(image_tokens)  # (B, Q, D), n_query = 256 in the paper
        if self.contrastive_pooler is None:  # "single": query 0 is the contrastive one
            return caption[:, :1], caption[:, 1:]  # (B, 1, D), (B, Q-1, D)
        source = image_tokens if self.config.pooler_layout == "parallel" else caption
        contrastive = self.contrastive_pooler(source)  # (B, 1, D), n_query = 1
        return contrastive, caption

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images: (B, 3, H, W) -> (x (B, E) L2-normalised image embedding, caption queries
        (B, Q, D))."""
        contrastive, caption = self.pool(self.image_encoder(images))  # (B, 1, D), (B, Q, D)
        image_emb = F.normalize(self.image_projection(contrastive[:, 0]), dim=-1)  # (B, E)
        return image_emb, caption

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens: (B, T) -> (text embedding y (B, E) L2-normalised, token states (B, T, D))."""
        text_states, cls_state = self.text_decoder.unimodal(tokens)  # (B, T, D), (B, D)
        text_emb = F.normalize(self.text_projection(cls_state), dim=-1)  # (B, E)
        return text_emb, text_states

    def forward(self, batch: dict) -> dict:
        """batch: {"images": (B, 3, H, W) float, "tokens": (B, T) long, [PAD] = 0}.

        One forward pass computes both losses [CoCa §3.2 "Pretraining Efficiency"]. Returns
        dict(loss=L_CoCa, contrastive=L_Con, captioning=L_Cap), all scalars.
        """
        tokens = batch["tokens"]  # (B, T)
        image_emb, image_queries = self.encode_image(batch["images"])  # (B, E), (B, Q, D)
        text_emb, text_states = self.encode_text(tokens)  # (B, E), (B, T, D)
        logits = self.text_decoder.multimodal(text_states, image_queries)  # (B, T, V)
        # across processes: negatives from every rank's pairs, the caption mean over every
        # rank's targets (shared/distributed.py); one process: the batch itself
        l_con = contrastive_loss(image_emb, text_emb, self.logit_scale,
                                 gather_with_grad(image_emb), gather_with_grad(text_emb),
                                 rank() * image_emb.shape[0])  # ()
        n_targets = (all_mean((tokens[:, 1:] != PAD_ID).sum().float()) if world_size() > 1
                     else None)  # () mean targets per rank
        l_cap = captioning_loss(logits, tokens, n_targets=n_targets)  # ()
        loss = coca_loss(l_con, l_cap, self.config.lambda_con, self.config.lambda_cap)  # ()
        return dict(loss=loss, contrastive=l_con, captioning=l_cap)

# --- 6. Generation: embeddings for zero-shot transfer, captions --------------------------------
    # (methods of CoCa: what the paper does with the pretrained model [CoCa §3.3, §4.2.3])

    def embed_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, E) L2-normalised image embeddings (zero-shot, retrieval, probe)."""
        return self.encode_image(images)[0]

    def embed_texts(self, tokens: Tensor) -> Tensor:
        """(B, T) -> (B, E) L2-normalised text embeddings (prompts, retrieval)."""
        return self.encode_text(tokens)[0]

    def caption_context(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, Q, D): what the multimodal layers cross-attend to while
        captioning, the captioning pooler's queries (next_token_logprobs reads them)."""
        return self.encode_image(images)[1]

    def next_token_logprobs(self, image_queries: Tensor, cached: bool = True):
        """The `step_fn` of shared.decoding for images whose caption queries are given.

        step_fn(tokens (R, t), rows (R,)) -> (R, V) log-probs of token t+1; rows[r] is the image
        of hypothesis r. cached: a key/value cache, filled from the whole prefix at the first
        call, then one new position a step (TextDecoder.step; shared.decoding.cached_step_fn
        follows the decoders' reordering of rows); else the whole prefix is re-encoded at every
        step (O(T²)). The unimodal half runs without [CLS],
        which no text row can see anyway. Both give the same numbers (tests/test_coca.py).
        """
        decoder = self.text_decoder
        if cached:
            cross_kv = [layer.project_context(image_queries)
                        for layer in decoder.multimodal_layers]  # once per image
            return decoding.cached_step_fn(lambda token, position, past, kv, rows:
                                           decoder.step(token, position, past, kv), cross_kv)

        def step_fn(tokens: Tensor, rows: Tensor) -> Tensor:
            text_states, _ = self.text_decoder.unimodal(tokens, with_cls=False)  # (R, t, D)
            logits = self.text_decoder.multimodal(text_states, image_queries[rows])  # (R, t, V)
            return logits[:, -1].float().log_softmax(dim=-1)  # (R, V)
        return step_fn

    @torch.no_grad()
    def generate(self, images: Tensor, start_id: int, end_id: int, max_len: int | None = None,
                 method: str = "greedy", beam_size: int = 5, length_penalty: float = 0.0,
                 top_p: float = 0.9, temperature: float = 1.0,
                 generator: torch.Generator | None = None, prompt: Tensor | None = None,
                 cached: bool = True, return_scores: bool = False):
        """Caption images [CoCa §4.2.3]: greedy, beam search or nucleus sampling (shared.decoding).

        Args:
            images: (B, 3, H, W).  start_id / end_id: [CLS] / [SEP] of the tokenizer.
            max_len: whole-sequence length including the start token and the prompt (default
                and at most max_text_len).
            prompt: (B, T0) or (T0,) token ids that follow the start token: the caption is
                continued from them (every one is read before the first prediction).
            cached: decode with the key/value cache (next_token_logprobs); False re-encodes the
                whole prefix every step. Both give the same tokens and scores.
            return_scores: also return the decoder's scores (B,) (shared.decoding).
        Returns:
            (B, T) token ids: start_id, the prompt, the generated tokens, 0 after end_id; with
            return_scores, (tokens, scores).
        """
        max_len = min(max_len or self.config.max_text_len, self.config.max_text_len)
        image_queries = self.caption_context(images)  # (B, Q, D), encoded once
        prefix = decoding.start_prefix(start_id, prompt, images.shape[0], images.device)
        step_fn = self.next_token_logprobs(image_queries, cached=cached)
        if method == "greedy":
            out = decoding.greedy(step_fn, prefix, max_len, end_id)
        elif method == "beam":
            out = decoding.beam_search(step_fn, prefix, max_len, end_id, beam_size=beam_size,
                                       length_penalty=length_penalty)
        elif method == "nucleus":
            out = decoding.nucleus_sample(step_fn, prefix, max_len, end_id, top_p=top_p,
                                          temperature=temperature, generator=generator)
        else:
            raise ValueError(f"method must be 'greedy', 'beam' or 'nucleus', not {method!r}")
        return out if return_scores else out[0]  # (B, T)[, (B,)]


# ===== below: train.py's contract, not in the paper =====

from shared.checkpoint import ReleasedWeights
from shared.config import optimisation_problems
from shared.data import CLIP_MEAN, CLIP_STD, ImageTextDataset, collate_image_text, model_device
from shared.evaluate import (caption_examples, caption_metrics, grouped_retrieval, image_batch,
                             in_eval_mode, world_examples)
from shared.evaluate import sample_captions as world_sample_captions
from shared.optim import adamw, decay_groups, fused_for
from shared.probe import linear_probe as shared_linear_probe


# --- 7. The contract: tasks, config checks, model and optimizer --------------------------------

TASKS = ("pretrain",)  # one pretraining serves zero-shot, retrieval and captioning [CoCa §3.3]
MAIN_METRIC = {"pretrain": "zero_shot_acc"}  # the key of evaluate() that picks best.pt
INPUTS = "pixels"  # CoCa reads images, not detector regions
BERT_INIT = None  # the text decoder is trained from scratch [CoCa §4.1]: no --init_bert
UNUSED_PARAMETERS = False  # every parameter gets a gradient every step (DDP needs no search)
PROTOCOLS = {"pretrain": ("caption", "retrieval", "zeroshot", "probe")}  # what evaluates it
CROSS_ENCODER = False  # retrieval_scores compares embeddings: one pass per image and per text


def config_problems(config: Config) -> list[str]:
    """The problems with a Config, one line each ([] = none): its fields' ranges and
    combinations and the optimisation fields (shared.config); Config.__post_init__ raises
    them as one ValueError."""
    c = config
    problems = []
    if c.task not in TASKS:
        problems.append(f"task must be one of {', '.join(TASKS)} (CoCa pretrains one model "
                        f"for every downstream use), not {c.task!r}")
    if c.vision_width % c.vision_heads:
        problems.append(f"vision_width {c.vision_width} is not divisible by vision_heads "
                        f"{c.vision_heads}")
    if c.text_width % c.text_heads:
        problems.append(f"text_width {c.text_width} is not divisible by text_heads {c.text_heads}")
    if c.image_size % c.patch_size:
        problems.append(f"image_size {c.image_size} is not divisible by patch_size "
                        f"{c.patch_size}")
    if c.patch_stem not in ("linear", "conv"):
        problems.append(f"patch_stem must be 'linear' or 'conv', not {c.patch_stem!r}")
    elif c.patch_stem == "conv" and (c.patch_size < 2 or c.patch_size & (c.patch_size - 1)):
        problems.append(f"patch_stem 'conv' needs a power-of-two patch_size, "
                        f"not {c.patch_size}")
    if c.pooler_layout not in ("parallel", "cascade", "single"):
        problems.append(f"pooler_layout must be 'parallel', 'cascade' or 'single', "
                        f"not {c.pooler_layout!r}")
    elif c.pooler_layout == "single" and c.n_caption_queries < 2:
        problems.append("pooler_layout 'single' needs n_caption_queries >= 2 (query 0 is the "
                        "contrastive one, the others the decoder's)")
    if c.pooler_heads < 0 or c.text_width % (c.pooler_heads or c.text_heads):
        problems.append(f"pooler_heads must be 0 (= text_heads) or divide text_width "
                        f"{c.text_width}, not {c.pooler_heads}")
    if not (len(c.image_mean) == len(c.image_std) == 3 and min(c.image_std) > 0):
        problems.append(f"image_mean and image_std must be 3 numbers each (R, G, B), the std's "
                        f"> 0, not {tuple(c.image_mean)} and {tuple(c.image_std)}")
    if not c.ln_eps > 0:
        problems.append(f"ln_eps must be > 0, not {c.ln_eps}")
    problems += optimisation_problems(c)
    if min(c.vision_layers, c.unimodal_layers, c.multimodal_layers,
           c.n_caption_queries, c.embed_dim, c.beam_size) < 1:
        problems.append("layer counts, n_caption_queries, embed_dim and beam_size must be >= 1")
    if c.max_text_len < 2:
        problems.append(f"max_text_len must be >= 2 ([CLS] and [SEP]), not {c.max_text_len}")
    if min(c.lambda_con, c.lambda_cap) < 0 or c.lambda_con + c.lambda_cap == 0:
        problems.append("lambda_con and lambda_cap must be >= 0 and not both 0")
    if not (0 < c.init_temperature and 1 / c.init_temperature <= c.max_logit_scale):
        problems.append("need 0 < init_temperature and 1 / init_temperature <= max_logit_scale")
    return problems


def build_model(config: Config) -> CoCa:
    """The one CoCa of every task (TASKS has one); its `heads` stay empty."""
    return CoCa(config)


def make_optimizer(model: CoCa, config: Config) -> torch.optim.Optimizer:
    """AdamW with (β1, β2) and decoupled weight decay 0.01 of [CoCa §4.1] on the matrices, none
    on biases, LayerNorm gains and logit_scale. DEVIATION: the paper uses Adafactor (for memory
    at 2.1B parameters); AdamW is the common choice at our sizes."""
    return adamw(decay_groups(model, config.weight_decay), config, fused_for(model))


@torch.no_grad()
def after_optimizer_step(model: CoCa) -> None:
    """Clamp 1/τ to at most config.max_logit_scale (100), after every optimizer step. OURS:
    [CoCa §4.1] only says τ is trainable; CLIP and open_clip clamp so that the logits cannot grow
    without bound."""
    model.logit_scale.clamp_(max=math.log(model.config.max_logit_scale))


# open_clip's released CoCa [code: open_clip coca_model.py, transformer.py, model.py]: its
# architecture as a Config, its weights as our state dict (convert.py writes the checkpoint).

# The sizes of open_clip's two CoCa architectures [code: open_clip model_configs/coca_ViT-B-32.json,
# coca_ViT-L-14.json], in the layout of those files (the rest is open_clip's defaults).
OPEN_CLIP_MODELS = {
    "coca_ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32,
                       "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8,
                     "layers": 12, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 512, "heads": 8,
                           "layers": 12, "attn_pooler_heads": 8},
        "custom_text": True},
    "coca_ViT-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14,
                       "attentional_pool": True, "attn_pooler_heads": 8, "output_tokens": True},
        "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 768, "heads": 12,
                     "layers": 12, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 768, "heads": 12,
                           "layers": 12, "attn_pooler_heads": 12},
        "custom_text": True},
}

# Settings of an open_clip model config this model cannot reproduce: (section, key, the value
# it must have; open_clip's default where the key is absent)
# [code: open_clip model.py CLIPVisionCfg, CLIPTextCfg; code: coca_model.py MultimodalCfg]
_OPEN_CLIP_FIXED = [
    ("", "quick_gelu", False), ("", "init_logit_bias", None),
    ("vision_cfg", "attentional_pool", True), ("vision_cfg", "timm_model_name", None),
    ("vision_cfg", "pos_embed_type", "learnable"), ("vision_cfg", "pool_type", "tok"),
    ("text_cfg", "embed_cls", True), ("text_cfg", "hf_model_name", None),
    ("text_cfg", "no_causal_mask", False), ("text_cfg", "pad_id", PAD_ID),
    ("text_cfg", "proj_type", "linear"), ("text_cfg", "proj_bias", False),
    *[(part, key, None) for part in ("vision_cfg", "text_cfg", "multimodal_cfg")
      for key in ("ls_init_value", "act_kwargs", "norm_kwargs")],
    *[(part, key, False) for part in ("vision_cfg", "text_cfg") for key in (
        "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
        "scale_fc")],
]


def open_clip_config(model_cfg: dict, preprocess_cfg: dict | None = None) -> Config:
    """The Config of an open_clip CoCa model config (its model_configs/*.json, or the
    "model_cfg" of a released open_clip_config.json) and, if given, its "preprocess_cfg" (the
    pixel mean and std; default CLIP's, which open_clip's CoCa weights use).

    Every layout field is open_clip's [code]: a ViT with a class token and ln_pre, no bias in
    the patch embedding (conv1), one attentional pooler of attn_pooler_queries (256) queries
    ("single"), LayerNorm eps 1e-5, a multimodal layer of two blocks (cross_kv_norm,
    separate_cross_block), no bias in the vocabulary projection and the shifted [CLS] mask
    open_clip builds (legacy_cls_mask). The recipe fields (lr, steps, ...) are the paper's
    defaults: set them for a fine-tuning run.
    Raises ValueError, one line, for a setting this model has no equivalent of."""
    parts = {"": model_cfg, "vision_cfg": model_cfg.get("vision_cfg", {}),
             "text_cfg": model_cfg.get("text_cfg", {}),
             "multimodal_cfg": model_cfg.get("multimodal_cfg", {})}
    get = lambda part, key, default: parts[part].get(key, default)  # noqa: E731
    odd = [f"{part}{'.' if part else ''}{key}={parts[part][key]!r}"
           for part, key, want in _OPEN_CLIP_FIXED if key in parts[part]
           and (bool(parts[part][key]) if want is None else parts[part][key] != want)]
    if get("vision_cfg", "block_type", None) not in (None, "default"):
        odd.append(f"vision_cfg.block_type={get('vision_cfg', 'block_type', None)!r}")
    width, head_width = get("vision_cfg", "width", 768), get("vision_cfg", "head_width", 64)
    text_width, mlp_ratio = get("text_cfg", "width", 512), get("vision_cfg", "mlp_ratio", 4.0)
    widths = {"embed_dim": model_cfg.get("embed_dim"), "text_cfg.width": text_width,
              "multimodal_cfg.width": get("multimodal_cfg", "width", 512)}  # pooler, text, decoder
    if len(set(widths.values())) > 1:
        odd.append(", ".join(f"{k}={v}" for k, v in widths.items()) + " (must be equal)")
    for key, default in (("heads", 8), ("vocab_size", 49408), ("mlp_ratio", 4.0)):
        if get("multimodal_cfg", key, default) != get("text_cfg", key, default):
            odd.append(f"multimodal_cfg.{key} is not text_cfg.{key}")
    if get("text_cfg", "mlp_ratio", 4.0) != mlp_ratio:
        odd.append("text_cfg.mlp_ratio is not vision_cfg.mlp_ratio")
    if width % head_width or not all(isinstance(get("vision_cfg", key, 1), int)
                                     for key in ("layers", "image_size", "patch_size")):
        odd.append("vision_cfg: a ViT (int layers) of square images (int image_size, "
                   "patch_size), width a multiple of head_width")
    if odd:
        raise ValueError(f"this open_clip model has settings coca.py does not implement: "
                         f"{'; '.join(odd)}")
    stats = preprocess_cfg or {}
    return Config(
        image_size=get("vision_cfg", "image_size", 224), patch_stem="linear",
        patch_size=get("vision_cfg", "patch_size", 16), vision_width=width,
        vision_layers=get("vision_cfg", "layers", 12), vision_heads=width // head_width,
        mlp_ratio=mlp_ratio, n_caption_queries=get("vision_cfg", "attn_pooler_queries", 256),
        pooler_layout="single", pooler_heads=get("vision_cfg", "attn_pooler_heads", 8),
        text_width=text_width, text_heads=get("text_cfg", "heads", 8),
        unimodal_layers=get("text_cfg", "layers", 12),
        multimodal_layers=get("multimodal_cfg", "layers", 12),
        vocab_size=get("text_cfg", "vocab_size", 49408),
        max_text_len=get("text_cfg", "context_length", 77), embed_dim=text_width,
        vision_cls_token=True, ln_pre=not get("vision_cfg", "no_ln_pre", False),
        patch_bias=False, cross_kv_norm=True, separate_cross_block=True, output_bias=False,
        legacy_cls_mask=True, ln_eps=1e-5, image_mean=tuple(stats.get("mean", CLIP_MEAN)),
        image_std=tuple(stats.get("std", CLIP_STD)))


def from_open_clip(state_dict: dict, open_clip_cfg: dict) -> tuple[Config, dict]:
    """open_clip CoCa weights -> (our Config, our state dict), tensor by tensor.

    open_clip_cfg: an open_clip_config.json ({"model_cfg": ..., "preprocess_cfg": ...}) or a
    bare model config (model_configs/coca_ViT-B-32.json). Every source tensor must be used and
    every tensor of our model set, with our shapes; else ValueError, one line, naming the
    tensor. The mapping [code: open_clip transformer.py]:

        open_clip                                  ours
        visual.conv1 (Dv, 3, p, p), no bias        image_encoder.patch_embedding.proj (Dv, 3·p·p)
        visual.class_embedding, positional_emb.    image_encoder.cls_token, .positions
        visual.ln_pre                              image_encoder.pre_norm
        <tower>.transformer.resblocks.i            PreLNEncoderBlock: ln_1 -> attn_norm, attn
            (ln_1, attn, ln_2, mlp.c_fc/c_proj)    (in_proj split into q, k, v) -> attn,
                                                   ln_2 -> mlp_norm, c_fc/c_proj -> mlp.fc1/fc2
        visual.attn_pool.ln_k                      image_encoder.norm (the pooler's keys only)
        visual.attn_pool.query, ln_q, attn         caption_pooler.queries, query_norm, attn
        visual.ln_post                             caption_pooler.norm
        visual.proj (E, E), x @ proj               image_projection.weight = proj^T
        text.token_embedding, positional_emb.      text_decoder.token_embedding, .positions
        text.cls_emb, text.ln_final                text_decoder.cls_embedding, .cls_norm
        text.text_projection (D, E)                text_projection.weight = its transpose
        text_decoder.resblocks.i                   multimodal_layers.i: self_attn_norm,
                                                   self_attn, self_mlp_norm, self_mlp
        text_decoder.cross_attn.i (ln_1_kv too)    multimodal_layers.i: cross_attn_norm,
                                                   context_norm, cross_attn, mlp_norm, mlp
        text_decoder.ln_final, text_projection     text_decoder.output_norm, output.weight = ^T
        logit_scale                                logit_scale
    """
    model_cfg = open_clip_cfg.get("model_cfg", open_clip_cfg)
    config = open_clip_config(model_cfg, open_clip_cfg.get("preprocess_cfg"))
    with torch.device("meta"):  # names and shapes only, no memory
        wanted = {k: v.shape for k, v in CoCa(config).state_dict().items()}
    weights = ReleasedWeights("open_clip", state_dict, wanted, " (another model, or not CoCa?)")
    take, put, copy = weights.take, weights.put, weights.copy

    def attention(name: str, key: str) -> None:
        """open_clip's attention (torch's MultiheadAttention layout): one fused (3D, D) in_proj,
        or three q/k/v_proj_weight when keys come from another width (the pooler) -> ours."""
        fused = f"{key}.in_proj_weight" in state_dict
        keys = [f"{key}.in_proj_weight"] * 3 if fused else [f"{key}.{x}_proj_weight" for x in "qkv"]
        weights = (take(keys[0]).chunk(3) if fused  # (3D, D) -> W^Q, W^K, W^V rows, (D, D) each
                   else [take(k) for k in keys])  # (D, D), (D, Dc), (D, Dc)
        biases = take(f"{key}.in_proj_bias").chunk(3)  # (3D,) -> 3 x (D,)
        for x, k, w, b in zip("qkv", keys, weights, biases):
            put(f"{name}.{x}_proj.weight", k, w)
            put(f"{name}.{x}_proj.bias", f"{key}.in_proj_bias", b)
        copy(f"{name}.out_proj", f"{key}.out_proj")

    def block(name: str, key: str, names=("attn_norm", "attn", "mlp_norm", "mlp")) -> None:
        """One of open_clip's residual blocks (pre-LN: ln_1, attn, ln_2, mlp)."""
        copy(f"{name}.{names[0]}", f"{key}.ln_1")
        attention(f"{name}.{names[1]}", f"{key}.attn")
        copy(f"{name}.{names[2]}", f"{key}.ln_2")
        copy(f"{name}.{names[3]}.fc1", f"{key}.mlp.c_fc")
        copy(f"{name}.{names[3]}.fc2", f"{key}.mlp.c_proj")

    conv = take("visual.conv1.weight")  # (Dv, 3, p, p), the (channel, row, column) order
    put("image_encoder.patch_embedding.proj.weight", "visual.conv1.weight",
        conv.reshape(conv.shape[0], -1))  # (Dv, 3·p·p), as PatchEmbedding flattens a patch
    put("image_encoder.cls_token", "visual.class_embedding",
        take("visual.class_embedding").reshape(1, 1, -1))  # (1, 1, Dv)
    put("image_encoder.positions", "visual.positional_embedding",
        take("visual.positional_embedding")[None])  # (1, 1 + N, Dv)
    if config.ln_pre:
        copy("image_encoder.pre_norm", "visual.ln_pre")
    for i in range(config.vision_layers):
        block(f"image_encoder.blocks.{i}", f"visual.transformer.resblocks.{i}")
    copy("image_encoder.norm", "visual.attn_pool.ln_k")
    put("caption_pooler.queries", "visual.attn_pool.query", take("visual.attn_pool.query"))
    copy("caption_pooler.query_norm", "visual.attn_pool.ln_q")
    attention("caption_pooler.attn", "visual.attn_pool.attn")
    copy("caption_pooler.norm", "visual.ln_post")
    put("image_projection.weight", "visual.proj", take("visual.proj").T)  # (E, E) -> (out, in)
    put("text_decoder.token_embedding.weight", "text.token_embedding.weight",
        take("text.token_embedding.weight"))  # (V, D)
    put("text_decoder.positions", "text.positional_embedding",
        take("text.positional_embedding"))  # (max_text_len + 1, D), last row: [CLS]
    put("text_decoder.cls_embedding", "text.cls_emb", take("text.cls_emb"))  # (D,)
    for i in range(config.unimodal_layers):
        block(f"text_decoder.unimodal_layers.{i}", f"text.transformer.resblocks.{i}")
    copy("text_decoder.cls_norm", "text.ln_final")
    put("text_projection.weight", "text.text_projection", take("text.text_projection").T)
    for i in range(config.multimodal_layers):
        block(f"text_decoder.multimodal_layers.{i}", f"text_decoder.resblocks.{i}",
              ("self_attn_norm", "self_attn", "self_mlp_norm", "self_mlp"))
        block(f"text_decoder.multimodal_layers.{i}", f"text_decoder.cross_attn.{i}",
              ("cross_attn_norm", "cross_attn", "mlp_norm", "mlp"))
        copy(f"text_decoder.multimodal_layers.{i}.context_norm",
             f"text_decoder.cross_attn.{i}.ln_1_kv")
    copy("text_decoder.output_norm", "text_decoder.ln_final")
    put("text_decoder.output.weight", "text_decoder.text_projection",
        take("text_decoder.text_projection").T)  # (D, V) -> (V, D)
    put("logit_scale", "logit_scale", take("logit_scale").reshape(()))  # () or (1,) -> ()

    return config, weights.finish()


# the released weights each converter turns into this model (convert.py picks by these names):
# (source state dict, source config dict) -> (Config, our state dict)
CONVERTERS = {"open_clip": from_open_clip}


# --- 8. Data: an image and one of its captions -------------------------------------------------

def train_dataset(source, tokenizer, config: Config, seed: int = 0):
    """Item p: the p-th visit of `source` (a World or a CaptionFolder; shared.data.Epochs, one
    unit an image: the paper's data hold one text an image [CoCa §4.1], and a contrastive batch
    then never holds one image twice) and one of its captions, drawn at each visit, as (T_i,)
    token ids."""
    return ImageTextDataset(source, tokenizer, config.max_text_len, seed,
                            mean=config.image_mean, std=config.image_std)


collate_fn = collate_image_text  # -> {"images": (B, 3, H, W), "tokens": (B, T) right-padded}


# --- 9. Evaluation and inference ---------------------------------------------------------------

def embed_image_arrays(model: CoCa, images: list, chunk: int = 250) -> Tensor:
    """uint8 (H, W, 3) arrays -> (n, E) embeddings, `chunk` images at a time (normalised with
    the pixel statistics of the model's config)."""
    c = model.config
    return torch.cat([model.embed_images(image_batch(images[s:s + chunk], model_device(model),
                                                     c.image_mean, c.image_std))
                      for s in range(0, len(images), chunk)])  # (n, E)


def embed_text_strings(model: CoCa, tokenizer, config: Config, texts: list[str]) -> Tensor:
    """Strings -> (n, E) text embeddings (the [CLS] output of the unimodal layers)."""
    tokens = tokenizer.encode_batch(texts, config.max_text_len)  # (n, T)
    return model.embed_texts(tokens.to(model_device(model)))  # (n, E)


def caption_images(model: CoCa, tokenizer, config: Config, images: list,
                   prompt: str = "") -> list[str]:
    """Decode captions for uint8 images: greedy, or beam search when config.beam_size > 1; each
    caption continues `prompt` (and begins with it) when one is given."""
    method = "greedy" if config.beam_size == 1 else "beam"
    ids = tokenizer.encode(prompt, add_special=False) if prompt else None
    pixels = image_batch(images, model_device(model), config.image_mean, config.image_std)
    tokens = model.generate(pixels, tokenizer.cls_id, tokenizer.sep_id, config.max_text_len,
                            method=method, beam_size=config.beam_size, prompt=ids)  # (b, T)
    return [text.lower() for text in tokenizer.decode_batch(tokens.tolist())]


def caption(model: CoCa, tokenizer, config: Config, examples: list[dict],
            world_config=None, prompt: str = "") -> list[str]:
    """Captions of examples {"image": uint8 (H, W, 3), ...} (caption_images), the signature
    every captioner shares (shared.benchmarks, infer.py)."""
    return caption_images(model, tokenizer, config, [ex["image"] for ex in examples], prompt)


def image_features(model: CoCa, images: list) -> Tensor:
    """(n, E) what a linear probe reads of uint8 images: the contrastive embeddings."""
    return embed_image_arrays(model, images)


def retrieval_scores(model: CoCa, tokenizer, config: Config, examples: list[dict],
                     world_config=None, texts: list[str] | None = None) -> Tensor:
    """(n images, G texts) cosine similarities of the examples' images and `texts` (default:
    each example's first caption) [CoCa §3.3]: one embedding per image and per text."""
    texts = [ex["captions"][0] for ex in examples] if texts is None else texts
    return (embed_image_arrays(model, [ex["image"] for ex in examples])
            @ embed_text_strings(model, tokenizer, config, texts).T)  # (n, G)


def zero_shot_accuracy(model: CoCa, tokenizer, config: Config, world_config, split: str,
                       n: int) -> float:
    """Zero-shot classification [CoCa §3.3, §4.2.2]: the class whose prompt "a <colour> <shape>"
    has the most similar text embedding, on n single-object images of ClassificationWorld(split).

    DEVIATION: one prompt per class, because the world's captions have one way of naming an
    object; the paper follows CLIP's setup and averages the embeddings of CLIP's set of prompt
    templates for each class name [CoCa §4.2.2 "Zero-Shot Image Classification"], which
    `infer.py zeroshot` does on image folders (shared.evaluate.class_embeddings)."""
    from shared.metrics import top1_accuracy
    from shared.world import CLASS_NAMES, ClassificationWorld

    world = ClassificationWorld(world_config, split)
    items = [world.item(i) for i in range(min(n, len(world)))]
    image_emb = embed_image_arrays(model, [image for image, _ in items])  # (n, E)
    class_emb = embed_text_strings(model, tokenizer, config,
                                   ["a " + name for name in CLASS_NAMES])  # (C, E)
    labels = torch.tensor([label for _, label in items], device=image_emb.device)  # (n,)
    return float(top1_accuracy(image_emb @ class_emb.T, labels))  # logits (n, C)


def linear_probe(model: CoCa, world_config, split: str, n: int) -> float:
    """Top-1 accuracy of a linear classifier on the frozen, L2-normalised contrastive image
    embedding (shared.probe: fitted on ClassificationWorld("train"), tested on n `split` items).

    DEVIATION: the paper's frozen-feature evaluation learns a new attentional pooler over the
    frozen encoder tokens [CoCa §3.3, Table 9]; we probe the pretrained contrastive embedding with
    a linear head (VirTex's protocol, shared by the four papers here).
    """
    return shared_linear_probe(lambda images: embed_image_arrays(model, images), world_config,
                               split, n)


@in_eval_mode
def evaluate(model: CoCa, tokenizer, config: Config, world_config, split: str,
             n: int) -> dict[str, float]:
    """The downstream metrics on n examples of a world split (eval mode, no gradients):

    zero_shot_acc        zero-shot classification over the 36 "a <colour> <shape>" prompts
    i2t_r1/5/10, t2i_*   retrieval among groups of 100 images and their 5 captions each
                         (the mean over groups; the last group may be smaller). DEVIATION: the
                         paper retrieves "over the whole test set" (5K MSCOCO images, 1K
                         Flickr30K) [CoCa §4.2.2]; groups of 100 keep R@1 comparable across
                         --final_n and with the cross-encoders' 100-pair evaluation
    bleu4, cider         captions (greedy, or beam with config.beam_size) vs the 5 references
    caption_truth(_baseline)  share of true generated captions, and of the single most common one
    linear_probe_acc     linear probe of the frozen image embedding
    """
    metrics = {"zero_shot_acc": zero_shot_accuracy(model, tokenizer, config, world_config,
                                                   split, n)}
    examples = world_examples(world_config, split, n, regions=False)
    metrics |= grouped_retrieval(lambda images: embed_image_arrays(model, images),
                                 lambda texts: embed_text_strings(model, tokenizer, config, texts),
                                 examples)
    captions = caption_examples(lambda part: caption_images(
        model, tokenizer, config, [ex["image"] for ex in part]), examples)
    # references cut to the word-pieces a caption of max_text_len ids ([CLS] .. [SEP]) can hold
    metrics |= caption_metrics(captions, examples, tokenizer, config.max_text_len - 2)
    metrics["linear_probe_acc"] = linear_probe(model, world_config, split, len(examples))
    return metrics


@in_eval_mode
def sample_captions(model: CoCa, tokenizer, config: Config, world_config, split: str,
                    n: int) -> list[tuple[str, str]]:
    """(generated caption, first reference caption) for the first n images of a world split."""
    return world_sample_captions(lambda examples: caption_images(
        model, tokenizer, config, [ex["image"] for ex in examples]), world_config, split, n,
        regions=False)


if __name__ == "__main__":  # python coca.py: parameter counts and one training step of `tiny`
    for name, preset in (("paper", Config.paper), ("small", Config.small), ("tiny", Config.tiny)):
        with torch.device("meta"):
            n_params = sum(p.numel() for p in CoCa(preset()).parameters())
        print(f"{name:5s} {n_params / 1e6:7.2f}M parameters")
    config = Config.tiny()
    model = build_model(config)
    batch = {"images": torch.randn(4, 3, config.image_size, config.image_size),
             "tokens": torch.randint(1, config.vocab_size, (4, 12))}
    losses = model(batch)
    losses["loss"].backward()
    print({k: round(v.item(), 4) for k, v in losses.items()})
