"""VirTex: Learning Visual Representations from Textual Annotations, written from primitives.

    Karan Desai, Justin Johnson. CVPR 2021; arXiv 2006.06666v3. Every `[VirTex ...]` tag cites that
    version.

A CNN learns to see by captioning: a ResNet-50 and a small Transformer decoder are trained from
scratch to caption images in both directions; then the decoder is thrown away and the CNN is
the product, judged by linear probes and transfer [VirTex §Method]:

    image -> ResNet-50 -> layer4 grid (B, 2048, 7, 7) -> 49 visual tokens -> Linear 2048 -> H
                                                                     |            |
    [SOS] c1 .. cT -> forward Transformer decoder  (cross-attends) <-+            |
    [EOS] cT .. c1 -> backward Transformer decoder (cross-attends) <--------------+
    L = L_f (forward next tokens) + L_b (backward next tokens)              bicaptioning

Citations name the paper's parts, one fixed set, not section or equation numbers: [VirTex §Method]
(the model as a whole), [VirTex §Method: visual backbone], [VirTex §Method: textual head],
[VirTex §Method: bicaptioning], [VirTex §Implementation], [VirTex §Ablations: pretraining tasks],
[VirTex §Downstream] (linear probes of frozen features), [VirTex §Captioning].
[code] = the official code, kdexd/virtex at ae67b23.

Paper map (part -> code)
    §Implementation; [code]                  Config, Config.paper()
    §Method: visual backbone (ResNet-50)     Bottleneck, ResNet
    §Method: textual head                    WordAndPositionEmbedding, TransformerDecoder,
                                             TextualHead
    §Method: bicaptioning                    reverse_captions, captioning_loss (L_f, L_b),
                                             bicaptioning_loss (L = L_f + L_b)
    §Ablations: pretraining tasks            Config.pretext; token_classification_loss,
                                             mask_tokens, masked_lm_loss
    §Method (the model)                      VirTex = ResNet + model.heads, build_model
    §Implementation: data augmentation       VirTexDataset (shared.augment.virtex_augment: crop,
                                             flip swapping left/right words, colour jitter)
    §Implementation: optimisation            make_optimizer (SGD, two learning rates)
    §Downstream: linear probes               VirTex.pooled_features, evaluate
    §Captioning (beam 5, nucleus 0.9)        VirTex.generate (shared.decoding), caption_images
    [code] released checkpoints              from_virtex, CONVERTERS (section 7)

Heads by pretext. The ResNet (`visual.*`) is the encoder: its state dict is the same for every
pretext. What a pretext adds lives under `model.heads`, so that fine-tuning from another
pretext's checkpoint (shared.checkpoint.load_weights) carries over every shared piece:

    pretext                model.heads
    bicaptioning           textual (visual projection, embedding, forward Transformer, output),
                           backward (the backward Transformer)
    captioning             textual
    masked_lm              textual, run without the causal mask
    token_classification   token_classification (a Linear on pooled layer4)

Layout: sections 1-6 are the paper (config, inputs, the ResNet and the textual head,
objectives, model, generation); below the fence line, sections 7-9 are what train.py and the
tools ask of a paper file (tasks, config checks, optimizer; data; evaluation on the world).

Left out, and why: COCO Captions (the synthetic world of shared/world.py instead); Lookahead
(DEVIATION, see make_optimizer); detection / segmentation / iNat transfer (Detectron2-scale code
and data); training with the SentencePiece BPE vocabulary (WordPiece trained on the world's
captions; the released one loads with the released weights: from_virtex); the
multilabel-classification ablation (COCO's instance labels; the world's analogue is token
classification).

Shapes: B batch, T text tokens, N visual tokens (grid cells h·w), Cv CNN channels (2048), H
textual width, V vocabulary, C classes. Masks: True = may attend.
"""

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import shared.decoding as decoding  # beam search, nucleus sampling, greedy (section 6)
from shared.masks import padding_mask
from shared.transformer import PostLNDecoderBlock, run_layer

PAD_ID = 0  # [PAD] of shared.tokenizer; padded keys are masked, padded targets ignored
PRETEXTS = ("bicaptioning", "captioning", "token_classification", "masked_lm")
CAPTIONING = ("bicaptioning", "captioning")  # the pretexts that train a left-to-right decoder


# --- 1. Config and presets ---------------------------------------------------------------------

@dataclass
class Config:
    """R-50 + the best textual head L1/H2048/A32/F8192 with the [VirTex §Implementation]
    recipe. `OURS:` marks values the paper does not give. Every scalar field is a flag of
    train.py (`--hidden_size 1024`)."""
    task: str = "pretrain"  # train.py --task; VirTex only pretrains (TASKS)
    # visual backbone: ResNet-50 trained from scratch [VirTex §Method: visual backbone]
    image_size: int = 224  # [VirTex §Implementation]: random 224 × 224 crops
    resnet_blocks: tuple = (3, 4, 6, 3)  # ResNet-50 [He et al. 2016, Table 1]; not a CLI flag
    resnet_width: int = 64  # channels of the stem and of layer1's 3×3 convs; layer4 gives 32×
    stem_kernel: int = 7  # ResNet's 7×7 stride-2 stem and 3×3 max-pool
    stem_stride: int = 2  # the stem convolution's stride
    stem_pool: bool = True  # the 3×3 stride-2 max-pool after the stem
    zero_init_residual: bool = True  # [code]: the last BN γ of each block starts at 0
    # textual head: L1 H2048 A32 F8192, the best model of the width ablation [code]
    # (the base model is H1024 A16 F4096)
    hidden_size: int = 2048  # H: the textual head's width
    layers: int = 1  # L: the textual head's layers
    heads: int = 32  # A: attention heads, H / 64
    feedforward_size: int = 8192  # F: feed-forward width, 4H
    dropout: float = 0.1  # [code]: in embeddings, attention, MLP and residuals
    vocab_size: int = 10_000  # [VirTex §Implementation]: SentencePiece BPE of 10K tokens
    # (train.py sets it to the tokenizer's)
    max_text_len: int = 30  # official code: 30 tokens including [SOS] and [EOS]
    pretext: str = "bicaptioning"  # [VirTex §Ablations: pretraining tasks]: the pretraining task
    mask_prob: float = 0.15  # masked_lm: share of caption tokens masked (BERT's 15 %)
    # data augmentation [VirTex §Implementation; code]
    crop_scale_min: float = 0.2  # random resized crop, area in [0.2, 1]
    flip_prob: float = 0.5  # horizontal flip, swapping "left" <-> "right" in the caption
    jitter_prob: float = 0.8  # colour jitter, official code: p = 0.8
    brightness: float = 0.4  # colour jitter: brightness factor in [1 - 0.4, 1 + 0.4]
    contrast: float = 0.4  # colour jitter: contrast factor, likewise
    saturation: float = 0.4  # colour jitter: saturation factor, likewise
    hue: float = 0.1  # kept small: captions name colours
    # decoding [VirTex §Captioning; code]
    beam_size: int = 5  # beam search, no length penalty, the repeated token blocked
    # pretraining recipe, read by train.py [VirTex §Implementation; code]
    optimizer: str = "sgd"  # SGD with momentum; "adamw" = OURS, for short CPU runs
    batch_size: int = 256  # 256 across 8 GPUs
    lr: float = 1e-3  # the textual head (and visual projection)
    cnn_lr: float = 0.2  # the visual backbone
    weight_decay: float = 1e-4  # SGD's L2 weight decay (see make_optimizer for what it skips)
    beta1: float = 0.9  # SGD momentum; AdamW's β1 when optimizer = "adamw"
    beta2: float = 0.999  # AdamW only
    warmup_steps: int = 10_000  # linear warmup
    max_steps: int = 500_000  # 500K iterations
    lr_schedule: str = "cosine"  # cosine decay
    grad_clip: float = 10.0  # official code: global norm 10
    grad_accum_steps: int = 1  # OURS: micro-batches an update (batch_size is split in this many)
    grad_checkpointing: bool = False  # OURS: recompute activations in the backward (memory)
    train_single_object_prob: float = 0.0  # OURS: the world's train mix; 0 = uniform 1-4 objects


    def __post_init__(self):
        self.resnet_blocks = tuple(self.resnet_blocks)  # a list after a JSON round trip
        problems = config_problems(self)  # every problem at once, one line each (section 7)
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def visual_dim(self) -> int:
        """Cv: channels of layer4 = resnet_width · 8 · 4 (2048 for ResNet-50)."""
        return self.resnet_width * 8 * Bottleneck.expansion

    @classmethod
    def paper(cls, task: str = "pretrain") -> "Config":
        """R-50, L1/H2048 bicaptioning with the [VirTex §Implementation] recipe (8 GPUs). One
        task: the backbone is judged by linear probes and fine-tuning outside this file
        (shared.probe has the probe's recipe)."""
        return cls(task=task)

    @classmethod
    def small(cls) -> "Config":
        """OURS: one GPU, hours. The base textual head L1/H1024 on the full ResNet-50 at
        128 px (a 4 × 4 layer4 grid), batch 128."""
        return cls(image_size=128, hidden_size=1024, heads=16, feedforward_size=4096,
                   batch_size=128, warmup_steps=2000, max_steps=50_000, max_text_len=32,
                   crop_scale_min=0.8, hue=0.02, train_single_object_prob=0.5)

    @classmethod
    def tiny(cls) -> "Config":
        """OURS: 2 CPU cores, about 10 minutes. A narrow ResNet (width 16, one bottleneck per
        stage, 3×3 stride-1 stem) at 64 px gives a 4 × 4 grid of 512 channels; textual head
        L1/H128/A2/F512. Mild augmentation: the world's captions state size, count and colour,
        which a strong crop or hue shift would make false.
        DEVIATION: AdamW, not SGD: with SGD at the paper's 1e-3 the textual head barely moves in a
        thousand steps; the paper's 500K steps are what makes SGD work there (RESULTS.md).
        DEVIATION: no zero-initialised residual γ: under AdamW each γ grows by about the LR per
        step, so the blocks stay near the identity for hundreds of steps; without it the linear
        probe is higher after the same 1,500 steps (RESULTS.md)."""
        return cls(image_size=64, resnet_blocks=(1, 1, 1, 1), resnet_width=16, stem_kernel=3,
                   stem_stride=1, zero_init_residual=False, hidden_size=128, heads=2,
                   feedforward_size=512, max_text_len=32, vocab_size=1000, crop_scale_min=0.8,
                   brightness=0.2, contrast=0.2, saturation=0.2, hue=0.0, batch_size=64,
                   optimizer="adamw", lr=1e-3, cnn_lr=1e-3, weight_decay=0.01,
                   warmup_steps=100, max_steps=1500, train_single_object_prob=0.5)


# --- 2. Inputs: word and position embeddings ---------------------------------------------------

class WordAndPositionEmbedding(nn.Module):
    """Token + learned position embeddings, LayerNorm, dropout; padded positions set to zero
    [VirTex §Method: textual head; code: LayerNorm eps 1e-8, pads zeroed after the dropout]."""

    def __init__(self, vocab_size: int, hidden_size: int, max_len: int, dropout: float):
        super().__init__()
        self.words = nn.Embedding(vocab_size, hidden_size, padding_idx=PAD_ID)
        self.positions = nn.Embedding(max_len, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens: (B, T) -> (B, T, H)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (T,)
        x = self.words(tokens) + self.positions(positions)  # (B, T, H)
        x = self.dropout(self.norm(x))  # (B, T, H)
        return x * (tokens != PAD_ID).unsqueeze(-1).to(x.dtype)  # (B, T, H), zero at pads


# --- 3. Visual backbone (ResNet-50 from primitives) and textual head ---------------------------

class Bottleneck(nn.Module):
    """ResNet's bottleneck block [He et al. 2016, Fig. 5 right], stride on the 3×3 conv (the
    "ResNet v1.5" of torchvision, which VirTex uses):

        x -> 1×1 conv (width) -> BN -> ReLU -> 3×3 conv (width, stride) -> BN -> ReLU
          -> 1×1 conv (4·width) -> BN (γ = 0 at init) -> + shortcut(x) -> ReLU

    Names match torchvision's, so its ResNet-50 state dict loads into `ResNet` unchanged.
    """
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None  # a projection shortcut where the shape changes
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, Cin, h, w) -> (B, 4·width, h / stride, w / stride)."""
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, h, w)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, width, h/s, w/s)
        out = self.bn3(self.conv3(out))  # (B, 4·width, h/s, w/s)
        return self.relu(out + shortcut)


def run_stage(stage: nn.Module, x: Tensor, checkpointed: bool) -> Tensor:
    """stage(x), activation-checkpointed if asked (shared.transformer.run_layer). The forward
    that the backward runs again must not move BatchNorm's running statistics a second time:
    they are put back as the first forward left them."""
    if not (checkpointed and torch.is_grad_enabled()):
        return stage(x)
    calls = []

    def forward(x: Tensor) -> Tensor:
        if not calls:  # the forward pass
            calls.append(1)
            return stage(x)
        kept = [b.clone() for b in stage.buffers()]  # the backward's recomputation, which
        try:  # torch may stop early (by an exception) once it has what the backward needs
            return stage(x)
        finally:
            for b, k in zip(stage.buffers(), kept):
                b.copy_(k)

    return run_layer(forward, x, checkpointed=True)


class ResNet(nn.Module):
    """The visual backbone [VirTex §Method: visual backbone]: ResNet-50 up to layer4, without
    avgpool and fc.

    224 px -> (B, 2048, 7, 7). Initialised as torchvision with zero_init_residual=True (the
    official code): He-normal (fan_out) convolutions, BN γ = 1 and β = 0, except the last BN of
    every block, whose γ = 0 so that each residual block starts as the identity.
    """

    def __init__(self, config: Config):
        super().__init__()
        w = config.resnet_width
        self.conv1 = nn.Conv2d(3, w, config.stem_kernel, stride=config.stem_stride,
                               padding=config.stem_kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if config.stem_pool else nn.Identity()
        stages, in_channels = [], w
        for s, n_blocks in enumerate(config.resnet_blocks):  # widths w, 2w, 4w, 8w
            width, stride = w * 2 ** s, 1 if s == 0 else 2
            blocks = [Bottleneck(in_channels, width, stride)]
            in_channels = width * Bottleneck.expansion
            blocks += [Bottleneck(in_channels, width) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.checkpointed = config.grad_checkpointing
        self.out_channels = in_channels  # Cv = 8w · 4
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, Bottleneck) and config.zero_init_residual:
                nn.init.zeros_(module.bn3.weight)  # each residual block starts as the identity
        # channels-last kernels and activations: the layout oneDNN (CPU) and cuDNN (bf16 GPU)
        # run fastest (RESULTS.md)
        self.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        """images: (B, 3, H, W) normalised -> layer4 grid (B, Cv, H/32, W/32) for ResNet-50."""
        images = images.contiguous(memory_format=torch.channels_last)  # same values, NHWC memory
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, w, H/4, W/4)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = run_stage(stage, x, self.checkpointed)  # (B, 4w, H/4, W/4) .. (B, 32w, H/32, W/32)
        return x


# the textual head: a post-LN Transformer decoder, the visual projection, the output layer (its
# word and position embedding is section 2)

class TransformerDecoder(nn.Module):
    """The Transformer of one direction [VirTex §Method: textual head]: L post-LN layers of
    causal self-attention, cross-attention to the projected visual tokens and a GELU MLP
    (dropout 0.1), as torch's TransformerDecoderLayer(norm_first=False) that the official code
    uses. No final LayerNorm: in a post-LN stack each layer ends with one."""

    def __init__(self, config: Config):
        super().__init__()
        self.layers = nn.ModuleList(
            PostLNDecoderBlock(config.hidden_size, config.heads, config.feedforward_size,
                               dropout=config.dropout) for _ in range(config.layers))
        self.checkpointed = config.grad_checkpointing

    def forward(self, x: Tensor, visual: Tensor, tokens: Tensor, causal: bool = True) -> Tensor:
        """x: (B, T, H) embedded tokens; visual: (B, N, H); tokens: (B, T) for the pad mask.
        causal=False gives the bidirectional decoder of the masked-LM ablation. -> (B, T, H)."""
        allowed = padding_mask(tokens, PAD_ID)  # (B, 1, T): no query attends to a pad
        for layer in self.layers:
            x = run_layer(layer, x, visual, allowed=allowed, causal=causal,
                          checkpointed=self.checkpointed)  # (B, T, H)
        return x


class TextualHead(nn.Module):
    """The forward textual head and the parts both directions share [VirTex §Method: textual
    head; code]: the visual projection (per grid cell, no positions added), the word and position
    embedding, the forward Transformer and the output layer (weight tied to the word embedding,
    its own bias). The `backward` head is only a second TransformerDecoder that reads through
    these. Init [code]: N(0, 0.02) Linear and Embedding weights, the [PAD] row zero.
    DEVIATION: zero biases; the official code keeps PyTorch's default bias init."""

    def __init__(self, config: Config):
        super().__init__()
        H = config.hidden_size
        self.visual_projection = nn.Linear(config.visual_dim, H)  # Cv -> H
        self.embedding = WordAndPositionEmbedding(config.vocab_size, H, config.max_text_len,
                                                  config.dropout)
        self.transformer = TransformerDecoder(config)  # the forward direction
        self.output = nn.Linear(H, config.vocab_size)
        self.output.weight = self.embedding.words.weight  # tied; the bias is its own
        init_textual_weights(self)
        with torch.no_grad():
            self.embedding.words.weight[PAD_ID].zero_()

    def project(self, grid: Tensor) -> Tensor:
        """layer4 grid (B, Cv, h, w) -> visual tokens (B, N, H), N = h·w (49 at 224 px)."""
        cells = grid.flatten(2).transpose(1, 2)  # (B, N, Cv), raster order
        return self.visual_projection(cells)  # (B, N, H)

    def logits(self, tokens: Tensor, visual: Tensor, causal: bool = True,
               transformer: TransformerDecoder | None = None) -> Tensor:
        """tokens (B, T), visual (B, N, H) -> next-token logits (B, T, V), through `transformer`
        (default: the forward one; the backward head passes its own)."""
        transformer = self.transformer if transformer is None else transformer
        x = transformer(self.embedding(tokens), visual, tokens, causal=causal)  # (B, T, H)
        return self.output(x)  # (B, T, V)


def init_textual_weights(module: nn.Module) -> None:
    """N(0, 0.02) Linear and Embedding weights under `module` [code]; zero biases (DEVIATION)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


# --- 4. Objectives -----------------------------------------------------------------------------

def reverse_captions(tokens: Tensor, pad_id: int = PAD_ID) -> Tensor:
    """The backward Transformer's input [VirTex §Method: bicaptioning; code]: each caption
    reversed BEFORE padding, so pads stay on the right:

        [SOS] a b [EOS] [PAD]  ->  [EOS] b a [SOS] [PAD]

    tokens: (B, T) right-padded -> (B, T)."""
    B, T = tokens.shape
    lengths = (tokens != pad_id).sum(dim=1, keepdim=True)  # (B, 1)
    t = torch.arange(T, device=tokens.device).expand(B, T)  # (B, T)
    source = torch.where(t < lengths, lengths - 1 - t, t)  # (B, T): mirror inside the caption
    return tokens.gather(1, source)  # (B, T)


def captioning_loss(logits: Tensor, tokens: Tensor, pad_id: int = PAD_ID) -> Tensor:
    """One direction of bicaptioning [VirTex §Method: bicaptioning], teacher forcing:

        L_f = -Σ_t log p(c_t | c_<t, I; θ, φ_f)      (L_b: c_>t and φ_b, on reversed tokens)

        symbol       variable                         shape
        p(c_t | .)   softmax(logits[:, t-1])          (B, T, V); the shift is done here
        c_t          tokens[:, t], t = 1 .. T-1       (B, T); c_0 = [SOS] is only an input
        θ            the ResNet (VirTex.visual)
        φ_f, φ_b     the forward / backward Transformer

    As the official code: the mean over the non-pad targets of the batch (not the sum over t).
    Worked example: tokens [SOS] a, logits at position 0 = (0, log 3, 0, 0), a = 1:
    p(a) = 3 / 6, L = -log 0.5 = 0.693.
    """
    V = logits.shape[-1]
    predictions = logits[:, :-1].reshape(-1, V)  # (B·(T-1), V): position t-1 predicts token t
    targets = tokens[:, 1:].reshape(-1)  # (B·(T-1),)
    return F.cross_entropy(predictions.float(), targets, ignore_index=pad_id)  # ()


def bicaptioning_loss(forward: Tensor, backward: Tensor) -> Tensor:
    """Bicaptioning [VirTex §Method: bicaptioning]: the forward and backward captioning losses
    maximise the caption's log-likelihood in both directions at once:

        L = L_f + L_b

        symbol  variable   shape
        L_f     forward    () captioning_loss of the forward logits on tokens
        L_b     backward   () captioning_loss of the backward logits on reverse_captions(tokens)

    No weights and no 1/2 factor, as the official code."""
    return forward + backward  # ()


def token_classification_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The token-classification pretext [VirTex §Ablations: pretraining tasks; code]: predict
    the set of tokens in the caption from the pooled image features, as a cross-entropy against
    a uniform K-hot target:

        L = (1/B') Σ_b  -(1/K_b) Σ_{v in S_b} log softmax(z_b)_v

        symbol  variable                               shape
        z_b     logits[b]                              (B, V)
        S_b     {v : targets[b, v] = 1}, K_b = |S_b|   (B, V) multi-hot, special tokens excluded
        B'      rows with K_b > 0

    An image whose caption has no ordinary token (K_b = 0) is left out of the mean instead of
    dividing by zero (the NaN of kdexd/virtex #28); a batch of only such rows gives 0.
    Worked example: z = log (1, 2, 3, 4), S = {1, 3}: L = -(log 0.2 + log 0.4) / 2 = 1.263.
    """
    targets = targets.to(logits.dtype)
    counts = targets.sum(dim=1)  # (B,) K_b
    log_probs = logits.float().log_softmax(dim=-1)  # (B, V)
    per_row = -(targets * log_probs).sum(dim=1) / counts.clamp(min=1)  # (B,)
    has_labels = (counts > 0).to(per_row.dtype)  # (B,)
    return (per_row * has_labels).sum() / has_labels.sum().clamp(min=1)  # ()


def mask_tokens(tokens: list[int], rng: np.random.Generator, mask_id: int, vocab_size: int,
                special_ids: set[int], mask_prob: float = 0.15) -> tuple[list[int], list[int]]:
    """The masked-LM pretext's input and labels [VirTex §Ablations: pretraining tasks;
    BERT §3.1]:

    ceil(mask_prob · n) of the n ordinary tokens (never [SOS]/[EOS]) are chosen, at least one;
    each becomes [MASK] with p = 0.8, a random ordinary token with p = 0.1, itself with p = 0.1.
    labels = the original token at the chosen positions, PAD_ID (ignored) elsewhere.

        tokens  [SOS]  a     b       c   [EOS]
        inputs  [SOS]  a   [MASK]    c   [EOS]      (b chosen, replaced by [MASK])
        labels  [PAD] [PAD]  b     [PAD] [PAD]

    DEVIATION: BERT's 80/10/10 with a label at every chosen position; the official VirTex code
    masks 85 % / randomises 10 % and labels only the [MASK]ed positions.
    """
    ordinary = [i for i, t in enumerate(tokens) if t not in special_ids]
    inputs, labels = list(tokens), [PAD_ID] * len(tokens)
    if not ordinary:
        return inputs, labels
    k = max(1, math.ceil(mask_prob * len(ordinary)))
    choices = [int(x) for x in np.atleast_1d(rng.choice(ordinary, size=k, replace=False))]
    for i in sorted(choices):
        labels[i] = tokens[i]
        u = rng.random()
        if u < 0.8:
            inputs[i] = mask_id
        elif u < 0.9:
            while (r := int(rng.integers(vocab_size))) in special_ids:
                pass  # a random ordinary token, never a special one
            inputs[i] = r
    return inputs, labels


def masked_lm_loss(logits: Tensor, labels: Tensor, pad_id: int = PAD_ID) -> Tensor:
    """The masked-LM pretext [VirTex §Ablations: pretraining tasks]: cross-entropy at the masked
    positions only, the decoder run WITHOUT the causal mask:

        L = -(1/|M|) Σ_{t in M} log softmax(logits[t])_{c_t}

        symbol  variable                 shape
        logits  logits                   (B, T, V)
        c_t     labels[t]                (B, T); pad_id where not masked
        M       {t : labels[t] != pad_id}
    """
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1),
                           ignore_index=pad_id)  # ()


# --- 5. The model: the ResNet and the pretext's heads ------------------------------------------

class VirTex(nn.Module):
    """The ResNet (`visual`, the encoder: the same for every pretext) and the heads of
    config.pretext (`heads`, see the module docstring) [VirTex §Method].

    Weight sharing for bicaptioning [VirTex §Method: textual head; code]: the backward head has
    its own Transformer layers, a copy of the forward ones made after initialisation (so both
    start equal), and shares the word/position embeddings, the visual projection and the output
    layer (all in `heads.textual`) with the forward direction.
    """

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.visual = ResNet(config)
        self.heads = nn.ModuleDict()
        if config.pretext == "token_classification":
            classifier = nn.Linear(config.visual_dim, config.vocab_size)  # on pooled layer4
            init_textual_weights(classifier)
            self.heads["token_classification"] = classifier
        else:  # bicaptioning, captioning, masked_lm: a decoder over the visual tokens
            self.heads["textual"] = TextualHead(config)
        if config.pretext == "bicaptioning":  # same start as the forward Transformer, own weights
            self.heads["backward"] = copy.deepcopy(self.heads["textual"].transformer)

    def visual_tokens(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> projected grid cells (B, N, H)."""
        return self.heads["textual"].project(self.visual(images))  # (B, N, H)

    def pooled_features(self, images: Tensor) -> Tensor:
        """The transferred representation [VirTex §Downstream; code]: layer4, global average
        pooled and L2-normalised. images (B, 3, H, W) -> (B, Cv)."""
        return F.normalize(self.visual(images).mean(dim=(2, 3)), dim=-1)  # (B, Cv)

    def forward(self, batch: dict) -> dict:
        """batch: {"images": (B, 3, H, W), "tokens": (B, T) [PAD] = 0} and, per pretext,
        "token_targets": (B, V) multi-hot (token_classification) or "mlm_tokens", "mlm_labels":
        (B, T) (masked_lm). The one place that dispatches on config.pretext. Returns
        dict(loss=..., <terms>=...), all scalars."""
        images, tokens, pretext = batch["images"], batch["tokens"], self.config.pretext
        grid = self.visual(images)  # (B, Cv, h, w)
        if pretext == "token_classification":
            pooled = grid.mean(dim=(2, 3))  # (B, Cv), global average pool
            logits = self.heads["token_classification"](pooled)  # (B, V)
            return dict(loss=token_classification_loss(logits, batch["token_targets"]))
        textual = self.heads["textual"]
        visual = textual.project(grid)  # (B, N, H)
        if pretext == "masked_lm":
            logits = textual.logits(batch["mlm_tokens"], visual, causal=False)  # (B, T, V)
            return dict(loss=masked_lm_loss(logits, batch["mlm_labels"]))
        forward = captioning_loss(textual.logits(tokens, visual), tokens)  # L_f
        if pretext == "captioning":
            return dict(loss=forward)
        backward_tokens = reverse_captions(tokens)  # (B, T)
        backward = captioning_loss(textual.logits(backward_tokens, visual,
                                                  transformer=self.heads["backward"]),
                                   backward_tokens)  # L_b
        return dict(loss=bicaptioning_loss(forward, backward), forward=forward,
                    backward=backward)

# --- 6. Generation: captions from the forward direction ----------------------------------------
    # (methods of VirTex: what the paper does with the trained decoder [VirTex §Captioning])

    def step(self, token: Tensor, position: int, past: list | None, cross_kv: list
             ) -> tuple[Tensor, list]:
        """One decoding step of the forward direction: the token at `position` (R,) attends to
        the cached keys and values of positions 0 .. position - 1 (past: [(k, v)] * layers,
        (R, heads, position, Dh); None at 0), itself (no causal mask needed) and the visual
        tokens (cross_kv, projected once per image). -> (logits (R, V), cache + this position)."""
        textual = self.heads["textual"]
        e = textual.embedding
        x = e.dropout(e.norm(e.words(token) + e.positions.weight[position]))[:, None]  # (R, 1, H)
        cache = []
        for l, layer in enumerate(textual.transformer.layers):
            k, v = layer.self_attn.project_kv(x)  # (R, heads, 1, Dh): post-LN, the raw input
            if past is not None:
                k, v = torch.cat([past[l][0], k], dim=2), torch.cat([past[l][1], v], dim=2)
            cache.append((k, v))
            x = layer(x, None, causal=False, kv=(k, v), context_kv=cross_kv[l])  # (R, 1, H)
        return textual.output(x[:, 0]), cache  # (R, V)

    def caption_context(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, H): what the decoder cross-attends to while captioning, the
        projected visual tokens (next_token_logprobs reads them)."""
        return self.visual_tokens(images)

    def next_token_logprobs(self, visual: Tensor, cached: bool = True):
        """shared.decoding's step_fn for the forward direction: (tokens (R, t), rows (R,)) ->
        (R, V) log-probs of token t+1. cached: VirTex.step through decoding.cached_step_fn (the
        whole prefix at the first call, then one position a step); else the prefix re-encoded
        every step (O(T²)). Equal, as decoding never generates [PAD] (masked only uncached)."""
        textual = self.heads["textual"]
        if cached:
            cross_kv = [layer.cross_attn.project_kv(visual)
                        for layer in textual.transformer.layers]  # once per image
            return decoding.cached_step_fn(lambda token, position, past, kv, rows:
                                  self.step(token, position, past, kv), cross_kv)

        def step_fn(tokens: Tensor, rows: Tensor) -> Tensor:  # (R, t), (R,) -> (R, V)
            logits = textual.logits(tokens, visual[rows])  # (R, t, V)
            return logits[:, -1].float().log_softmax(dim=-1)
        return step_fn

    @torch.no_grad()
    def generate(self, images: Tensor, start_id: int, end_id: int, max_len: int | None = None,
                 method: str = "beam", beam_size: int = 5, top_p: float = 0.9,
                 generator: torch.Generator | None = None, prompt: Tensor | None = None,
                 cached: bool = True, return_scores: bool = False):
        """Caption images with the forward direction [VirTex §Captioning; code] through
        shared.decoding: beam search (beam 5, no length penalty), nucleus sampling (p = 0.9) or
        greedy ([code]'s beam 1), each blocking the token just emitted, as [code]. DEVIATION:
        after its first step, [code]'s beam search feeds the decoder its predictions without
        [SOS] (every position shifts by one); we keep [SOS], as in training and its sampling.

        images (B, 3, H, W); start_id / end_id: [CLS] / [SEP] ([SOS] / [EOS]). max_len: the
        whole length, start and prompt included; default and at most max_text_len + 1: [code]
        decodes up to MAX_CAPTION_LENGTH = 30 tokens after [SOS]. prompt: (B, T0) or (T0,) ids
        after the start token, all read before the first prediction. cached: key/value cache or
        re-encoding (equal). Returns (B, T) ids: start_id, prompt, generated tokens, 0 after
        end_id; with return_scores, (tokens, scores (B,))."""
        if self.config.pretext not in CAPTIONING:
            raise ValueError(f"pretext {self.config.pretext!r} trains no left-to-right decoder; "
                             f"captions need 'bicaptioning' or 'captioning'")
        longest = self.config.max_text_len + 1  # [code]: max_text_len tokens after [SOS]
        max_len = min(max_len or longest, longest)
        visual = self.caption_context(images)  # (B, N, H), encoded once
        step_fn = self.next_token_logprobs(visual, cached=cached)
        prefix = decoding.start_prefix(start_id, prompt, images.shape[0], images.device)
        if method == "beam":
            out = decoding.beam_search(step_fn, prefix, max_len, end_id, beam_size=beam_size,
                                       length_penalty=0.0, block_repeat=True)
        elif method == "nucleus":
            out = decoding.nucleus_sample(step_fn, prefix, max_len, end_id, top_p=top_p,
                                          generator=generator, block_repeat=True)
        elif method == "greedy":
            out = decoding.greedy(step_fn, prefix, max_len, end_id, block_repeat=True)
        else:
            raise ValueError(f"method must be 'beam', 'nucleus' or 'greedy', not {method!r}")
        return out if return_scores else out[0]  # (B, T)[, (B,)]


# ===== below: train.py's contract, not in the paper =====

import re

from torch.utils.data import Dataset

import shared.evaluate
from shared.augment import virtex_augment
from shared.checkpoint import ReleasedWeights
from shared.config import optimisation_problems
from shared.data import Epochs, model_device, normalise_image, pad_sequences, pick_text
from shared.evaluate import (caption_examples, caption_metrics, image_batch, in_eval_mode,
                             world_examples)
from shared.optim import adamw, fused_for
from shared.probe import linear_probe


# --- 7. The contract: tasks, config checks, model and optimizer --------------------------------

TASKS = ("pretrain",)  # train.py --task: VirTex only pretrains; --pretext picks the pretext task
MAIN_METRIC = {"pretrain": "linear_probe_acc"}  # probes judge the CNN [VirTex §Downstream]
INPUTS = "pixels"  # train.py feeds images, not detector regions
BERT_INIT = None  # trained from scratch: --init_bert does not apply
UNUSED_PARAMETERS = False  # every parameter gets a gradient every step (DDP needs no search)
PROTOCOLS = {"pretrain": ("caption", "probe")}  # what evaluates it (shared.benchmarks, infer)
CROSS_ENCODER = False  # no retrieval


def config_problems(config: Config) -> list[str]:
    """The problems with a Config, one line each ([] = none): its fields' ranges and
    combinations and the optimisation fields (shared.config); Config.__post_init__ raises
    them as one ValueError."""
    c = config
    problems = []
    if c.task not in TASKS:
        problems.append(f"task must be one of {', '.join(TASKS)}, not {c.task!r} (VirTex "
                        f"only pretrains; --pretext picks the pretext task)")
    if len(c.resnet_blocks) != 4 or min(c.resnet_blocks) < 1:
        problems.append(f"resnet_blocks needs 4 stage depths >= 1, got {c.resnet_blocks}")
    if c.hidden_size % c.heads:
        problems.append(f"hidden_size {c.hidden_size} is not divisible by heads {c.heads}")
    if c.pretext not in PRETEXTS:
        problems.append(f"pretext must be one of {', '.join(PRETEXTS)}, not {c.pretext!r}")
    if c.optimizer not in ("sgd", "adamw"):
        problems.append(f"optimizer must be 'sgd' or 'adamw', not {c.optimizer!r}")
    problems += optimisation_problems(c)
    if c.image_size < c.stem_stride * (2 if c.stem_pool else 1) * 8:
        problems.append(f"image_size {c.image_size} is too small for the ResNet (it halves the "
                        f"grid {3 + c.stem_pool + (c.stem_stride > 1)} times)")
    if not 0 < c.crop_scale_min <= 1:
        problems.append(f"crop_scale_min must be in (0, 1], not {c.crop_scale_min}")
    if not 0 < c.mask_prob < 1:
        problems.append(f"mask_prob must be in (0, 1), not {c.mask_prob}")
    if c.max_text_len < 2:
        problems.append(f"max_text_len must be >= 2 ([SOS] and [EOS]), not {c.max_text_len}")
    if min(c.layers, c.beam_size, c.resnet_width) < 1:
        problems.append("layers, beam_size and resnet_width must be >= 1")
    return problems


def build_model(config: Config) -> VirTex:
    return VirTex(config)


def make_optimizer(model: VirTex, config: Config) -> torch.optim.Optimizer:
    """SGD, momentum 0.9, weight decay 1e-4; LR 0.2 for the CNN and 1e-3 for the rest
    [VirTex §Implementation; code]; train.py scales its schedule (peak config.lr) by lr_scale.
    No weight decay on the norms and biases of the embedding and the Transformers ([code]: the
    regex `.*textual.(embedding|transformer).*(norm.*|bias)`, so the visual projection's, the
    output layer's and the CNN's BatchNorm parameters are decayed).
    DEVIATION: no Lookahead wrapper ([code]: k = 5, α = 0.5); it smooths the SGD trajectory but
    changes no equation, and leaving it out keeps the optimizer state one torch object.
    optimizer = "adamw" (OURS): AdamW with the same two learning rates. Fused where it can be."""
    no_decay_parts = ("heads.textual.embedding.", "heads.textual.transformer.", "heads.backward.")
    cnn, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if name.startswith("visual."):
            cnn.append(p)
        elif name.startswith(no_decay_parts) and p.dim() == 1:
            no_decay.append(p)  # LayerNorm γ, β and the biases of the embedding and Transformers
        else:
            decay.append(p)
    wd = config.weight_decay
    groups = [{"params": cnn, "weight_decay": wd, "lr_scale": config.cnn_lr / config.lr},
              {"params": decay, "weight_decay": wd, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return adamw(groups, config, fused=fused_for(model))
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.beta1, fused=fused_for(model))


def after_optimizer_step(model: VirTex) -> None:
    """Nothing to do after an optimizer step (CoCa clamps its temperature there)."""


# the released checkpoints [code: kdexd/virtex model_zoo] -> this model

RELEASE_TEXTUAL_HEAD = "transdec_postnorm::L1_H2048_A32_F8192"  # the best released model
# official MODEL.NAME -> our pretext [code: kdexd/virtex factories.py PretrainingModelFactory]
RELEASE_PRETEXTS = {"virtex": "bicaptioning", "bicaptioning": "bicaptioning",
                    "captioning": "captioning", "masked_lm": "masked_lm",
                    "token_classification": "token_classification"}
# torch's TransformerDecoderLayer (the official textual head's layers) -> PostLNDecoderBlock
RELEASE_LAYER_NAMES = {"norm1": "self_attn_norm", "norm2": "cross_attn_norm",
                       "norm3": "mlp_norm", "linear1": "mlp.fc1", "linear2": "mlp.fc2"}


def release_options(config_dict: dict) -> dict:
    """The converter's options from `config_dict`, flat or as the official YAML read into a
    dict ({"MODEL": {"NAME", "TEXTUAL": {"NAME", "DROPOUT"}}}):

        model         official MODEL.NAME: virtex (= bicaptioning), bicaptioning, captioning,
                      masked_lm, token_classification; default: read from the tensors
                      (a backward head: bicaptioning; a decoder: captioning; else
                      token_classification)
        textual_head  MODEL.TEXTUAL.NAME, "transdec_postnorm::L<l>_H<h>_A<a>_F<f>"; the shapes
                      give L, H and F (checked against it), the name gives A. Default: A = H / 64,
                      as in every released model (the best: RELEASE_TEXTUAL_HEAD)
        dropout       MODEL.TEXTUAL.DROPOUT, default 0.1
    """
    model = config_dict.get("MODEL", {})
    textual = model.get("TEXTUAL", {})
    return {"model": config_dict.get("model", model.get("NAME")),
            "textual_head": config_dict.get("textual_head", textual.get("NAME")),
            "dropout": float(config_dict.get("dropout", textual.get("DROPOUT", 0.1)))}


def from_virtex(state_dict: dict, config_dict: dict) -> tuple[Config, dict]:
    """A released VirTex checkpoint's "model" state dict -> (our Config, our state dict),
    tensor by tensor [code: kdexd/virtex models/captioning.py, modules/textual_heads.py,
    modules/embedding.py, modules/visual_backbones.py]:

        official                                      ours
        visual.cnn.* (torchvision ResNet, no fc)      visual.* (the same names)
        textual.visual_projection                     heads.textual.visual_projection
        textual.embedding.words, positions            heads.textual.embedding.words, positions
        textual.embedding.layer_norm                  heads.textual.embedding.norm
        textual.transformer.layers.i                  heads.textual.transformer.layers.i:
            self_attn / multihead_attn                self_attn / cross_attn, the fused
            (in_proj_weight (3H, H), in_proj_bias)    in_proj split into q, k, v
            norm1, norm2, norm3                       self_attn_norm, cross_attn_norm, mlp_norm
            linear1, linear2                          mlp.fc1, mlp.fc2
        textual.output (weight tied to words)         heads.textual.output (tied likewise)
        backward_textual.transformer.layers.i         heads.backward.layers.i (as above)
        backward_textual.visual_projection,           the forward head's (shared in the
            .embedding, .output                       official model: checked equal, used)
        textual.output (token_classification)         heads.token_classification

    config_dict: release_options. Every source tensor must be used and every tensor of our
    model set, with our shapes; else ValueError, one line, naming the tensor. The defaults of
    everything the tensors do not tell are the release's: 224 px crops, ImageNet statistics,
    [PAD] = <unk> = 0 (shared.tokenizer section 3b)."""
    options = release_options(config_dict)
    if "visual.cnn.conv1.weight" not in state_dict:
        raise ValueError("the weights lack visual.cnn.conv1.weight (not a VirTex checkpoint?)")
    blocks = tuple(len({k.split(".")[3] for k in state_dict
                        if k.startswith(f"visual.cnn.layer{s}.")}) for s in range(1, 5))
    width = state_dict["visual.cnn.conv1.weight"].shape[0]
    if "visual.cnn.layer1.0.conv1.weight" in state_dict and \
            state_dict["visual.cnn.layer1.0.conv1.weight"].shape[0] != width:
        raise ValueError("a wide ResNet (R-50 W2X): this ResNet's bottleneck width is its "
                         "stage width")
    decoder = "textual.transformer.layers.0.linear1.weight" in state_dict
    pretext = options["model"]
    if pretext == "multilabel_classification":
        raise ValueError("multilabel_classification has no counterpart here (COCO's instance "
                         "labels)")
    if pretext is not None and pretext not in RELEASE_PRETEXTS:
        raise ValueError(f"model must be one of {', '.join(RELEASE_PRETEXTS)}, not {pretext!r}")
    pretext = RELEASE_PRETEXTS.get(pretext) or (
        "bicaptioning" if any(k.startswith("backward_textual.") for k in state_dict)
        else "captioning" if decoder else "token_classification")
    fields = dict(resnet_blocks=blocks, resnet_width=width, pretext=pretext,
                  dropout=options["dropout"])
    if pretext == "token_classification":
        if "textual.output.weight" not in state_dict:
            raise ValueError("the weights lack textual.output.weight")
        fields["vocab_size"] = state_dict["textual.output.weight"].shape[0]
    else:
        if not decoder:
            raise ValueError(f"the weights lack textual.transformer.layers.0 ({pretext} needs "
                             f"a Transformer textual head)")
        words = state_dict["textual.embedding.words.weight"]  # (V, H)
        layers = len({k.split(".")[3] for k in state_dict
                      if k.startswith("textual.transformer.layers.")})
        H, F_ = words.shape[1], state_dict["textual.transformer.layers.0.linear1.weight"].shape[0]
        heads = H // 64  # every released head has A = H / 64
        if options["textual_head"] is not None:
            name, _, arch = options["textual_head"].partition("::")
            parsed = re.fullmatch(r"L(\d+)_H(\d+)_A(\d+)_F(\d+)", arch)
            if name != "transdec_postnorm" or parsed is None:
                raise ValueError(f"textual_head {options['textual_head']!r}: only "
                                 f"transdec_postnorm::L<l>_H<h>_A<a>_F<f> (the released "
                                 f"heads; this textual head is post-LN)")
            L, H_name, heads, F_name = (int(g) for g in parsed.groups())
            if (L, H_name, F_name) != (layers, H, F_):
                raise ValueError(f"textual_head {options['textual_head']!r}, but the tensors "
                                 f"give L{layers}_H{H}_F{F_}")
        fields |= dict(vocab_size=words.shape[0], hidden_size=H, layers=layers, heads=heads,
                       feedforward_size=F_,
                       max_text_len=state_dict["textual.embedding.positions.weight"].shape[0])
    config = Config(**fields)
    with torch.device("meta"):  # names and shapes only, no memory
        wanted = {k: v.shape for k, v in VirTex(config).state_dict().items()}
    weights = ReleasedWeights("VirTex", state_dict, wanted, " (another model?)")
    take, put, copy_, ours = weights.take, weights.put, weights.copy, weights.ours

    def transformer(name: str, key: str) -> None:
        """torch's TransformerDecoder (post-LN, norm_first=False) -> our TransformerDecoder."""
        for i in range(config.layers):
            for attn, theirs in (("self_attn", "self_attn"), ("cross_attn", "multihead_attn")):
                k = f"{key}.layers.{i}.{theirs}"
                weights = take(f"{k}.in_proj_weight").chunk(3)  # (3H, H) -> W^Q, W^K, W^V
                biases = take(f"{k}.in_proj_bias").chunk(3)  # (3H,) -> 3 x (H,)
                for x, w, b in zip("qkv", weights, biases):
                    put(f"{name}.layers.{i}.{attn}.{x}_proj.weight", f"{k}.in_proj_weight", w)
                    put(f"{name}.layers.{i}.{attn}.{x}_proj.bias", f"{k}.in_proj_bias", b)
                copy_(f"{name}.layers.{i}.{attn}.out_proj", f"{k}.out_proj")
            for theirs, mine in RELEASE_LAYER_NAMES.items():
                copy_(f"{name}.layers.{i}.{mine}", f"{key}.layers.{i}.{theirs}")

    for name in wanted:  # the ResNet: torchvision's names, which ours keep
        if name.startswith("visual."):
            put(name, f"visual.cnn.{name[7:]}", take(f"visual.cnn.{name[7:]}"))
    if pretext == "token_classification":
        copy_("heads.token_classification", "textual.output")
    else:
        copy_("heads.textual.visual_projection", "textual.visual_projection")
        copy_("heads.textual.embedding.words", "textual.embedding.words", parts=("weight",))
        copy_("heads.textual.embedding.positions", "textual.embedding.positions",
              parts=("weight",))
        copy_("heads.textual.embedding.norm", "textual.embedding.layer_norm")
        transformer("heads.textual.transformer", "textual.transformer")
        copy_("heads.textual.output", "textual.output")  # weight: the words', tied
        if not torch.equal(state_dict["textual.output.weight"], ours[
                "heads.textual.embedding.words.weight"]):
            raise ValueError("textual.output.weight differs from textual.embedding.words."
                             "weight: the release ties them, so does this model")
    if pretext == "bicaptioning":
        transformer("heads.backward", "backward_textual.transformer")
        shared = [k for k in state_dict if k.startswith("backward_textual.")
                  and not k.startswith("backward_textual.transformer.")]
        for key in shared:  # the forward head's modules, under a second name
            twin = "textual." + key[len("backward_textual."):]
            if twin not in state_dict or not torch.equal(take(key), state_dict[twin]):
                raise ValueError(f"{key} is not the forward head's {twin}: the release "
                                 f"shares it, so does this model")

    return config, weights.finish(dtype=None)


# the released weights each converter turns into this model (convert.py picks by these names):
# (source state dict, source config dict) -> (Config, our state dict)
CONVERTERS = {"virtex": from_virtex}


# --- 8. Data: augmented images, a caption, the pretext's targets -------------------------------

class VirTexDataset(Dataset):
    """Item p: the p-th visit of the stream (shared.data.Epochs, one unit an image: [code]
    draws one of an image's captions each time it reads the image), augmented as
    [VirTex §Implementation; code] (crop -> flip with the caption's left/right swapped -> colour
    jitter -> normalise), one of its captions, and the pretext's targets. Every random choice is
    a pure function of (seed, p): each visit of an image draws its caption, crop and flip afresh."""

    def __init__(self, source, tokenizer, config: Config, seed: int = 0):
        self.source, self.tokenizer, self.config, self.seed = source, tokenizer, config, seed
        self.epochs = Epochs(source, seed)
        self.special_ids = {tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id,
                            tokenizer.sep_id, tokenizer.mask_id}

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, p: int) -> dict:
        c = self.config
        index, text = self.epochs(p)
        example = self.source.example(index, regions=False)
        rng = np.random.default_rng([self.seed, 11, p])
        caption = pick_text(example["captions"], text, rng)
        image, caption = virtex_augment(
            example["image"], caption, rng, size=c.image_size, crop_scale=(c.crop_scale_min, 1.0),
            flip_prob=c.flip_prob, jitter_prob=c.jitter_prob, brightness=c.brightness,
            contrast=c.contrast, saturation=c.saturation, hue=c.hue)  # (3, S, S) in [0, 1]
        tokens = self.tokenizer.encode(caption, max_len=c.max_text_len)
        item = {"image": normalise_image(image), "tokens": torch.tensor(tokens)}  # (3, S, S)
        if c.pretext == "token_classification":
            targets = torch.zeros(c.vocab_size)  # (V,) multi-hot of the caption's tokens
            ordinary = [t for t in tokens if t not in self.special_ids]
            targets[ordinary] = 1.0
            item["token_targets"] = targets
        if c.pretext == "masked_lm":
            inputs, labels = mask_tokens(tokens, rng, self.tokenizer.mask_id, c.vocab_size,
                                         self.special_ids, c.mask_prob)
            item["mlm_tokens"], item["mlm_labels"] = torch.tensor(inputs), torch.tensor(labels)
        return item


def train_dataset(source, tokenizer, config: Config, seed: int = 0) -> VirTexDataset:
    """source: a shared.world.World, or a shared.folders.CaptionFolder (--data)."""
    return VirTexDataset(source, tokenizer, config, seed)


def collate_fn(items: list[dict]) -> dict:
    """Stack images, right-pad token rows with [PAD] = 0, stack multi-hot targets."""
    batch = {"images": torch.stack([it["image"] for it in items]),  # (B, 3, H, W)
             "tokens": pad_sequences([it["tokens"] for it in items])}  # (B, T)
    if "token_targets" in items[0]:
        batch["token_targets"] = torch.stack([it["token_targets"] for it in items])  # (B, V)
    if "mlm_tokens" in items[0]:
        batch["mlm_tokens"] = pad_sequences([it["mlm_tokens"] for it in items])  # (B, T)
        batch["mlm_labels"] = pad_sequences([it["mlm_labels"] for it in items])  # (B, T)
    return batch


# --- 9. Evaluation and inference ---------------------------------------------------------------

def caption_images(model: VirTex, tokenizer, config: Config, images: list,
                   prompt: str = "") -> list[str]:
    """Beam-search captions (config.beam_size; 1 = greedy) for uint8 (H, W, 3) images, up to
    max_text_len tokens after [SOS] ([code]); each continues `prompt` when one is given."""
    method = "greedy" if config.beam_size == 1 else "beam"
    ids = tokenizer.encode(prompt, add_special=False) if prompt else None
    tokens = model.generate(image_batch(images, model_device(model)), tokenizer.cls_id,
                            tokenizer.sep_id, method=method, beam_size=config.beam_size,
                            prompt=ids)  # (B, T)
    return [text.lower() for text in tokenizer.decode_batch(tokens.tolist())]


def caption(model: VirTex, tokenizer, config: Config, examples: list[dict],
            world_config=None, prompt: str = "") -> list[str]:
    """Captions of examples {"image": uint8 (H, W, 3), ...} (caption_images), the signature
    every captioner shares (shared.benchmarks, infer.py)."""
    return caption_images(model, tokenizer, config, [ex["image"] for ex in examples], prompt)


def image_features(model: VirTex, images: list) -> Tensor:
    """(n, C) what a linear probe reads of uint8 images: the ResNet's pooled last grid
    [VirTex §Downstream]."""
    return model.pooled_features(image_batch(images, model_device(model)))


def random_backbone(config: Config, device: torch.device, seed: int = 0) -> ResNet:
    """The baseline of the linear probe: the same ResNet, randomly initialised (eval mode), built
    without touching the global random state (a resumed run must not change)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(config).to(device).eval()


@in_eval_mode
def evaluate(model: VirTex, tokenizer, config: Config, world_config, split: str,
             n: int) -> dict[str, float]:
    """The downstream metrics on n examples of a world split (eval mode, no gradients):

    linear_probe_acc          linear probe of frozen, L2-normalised, pooled layer-4 features on
                              ClassificationWorld (36 classes) [VirTex §Downstream]
    linear_probe_acc_random   the same probe on a randomly initialised ResNet of the same shape
    bleu4, cider, caption_truth(_baseline)   beam-search captions (captioning pretexts only)
    """
    device = model_device(model)
    metrics = {"linear_probe_acc": linear_probe(
        lambda ims: model.pooled_features(image_batch(ims, device)), world_config, split, n)}
    baseline = random_backbone(config, device)
    metrics["linear_probe_acc_random"] = linear_probe(
        lambda ims: F.normalize(baseline(image_batch(ims, device)).mean(dim=(2, 3)), dim=-1),
        world_config, split, n)
    if config.pretext in CAPTIONING:
        examples = world_examples(world_config, split, n, regions=False)
        captions = caption_examples(lambda part: caption_images(
            model, tokenizer, config, [ex["image"] for ex in part]), examples)
        metrics |= caption_metrics(captions, examples, tokenizer, config.max_text_len - 2)
    return metrics


@in_eval_mode
def sample_captions(model: VirTex, tokenizer, config: Config, world_config, split: str,
                    n: int) -> list[tuple[str, str]]:
    """(generated, first reference) captions of n world images; [] without a captioning pretext."""
    if config.pretext not in CAPTIONING:
        return []
    return shared.evaluate.sample_captions(lambda examples: caption_images(
        model, tokenizer, config, [ex["image"] for ex in examples]), world_config, split, n,
        regions=False)


if __name__ == "__main__":  # python virtex.py: parameter counts and one training step of `tiny`
    for name in ("paper", "small", "tiny"):
        with torch.device("meta"):
            m = VirTex(getattr(Config, name)())
        print(f"{name:5s} ResNet {sum(p.numel() for p in m.visual.parameters()) / 1e6:6.2f}M, "
              f"all {sum(p.numel() for p in m.parameters()) / 1e6:6.2f}M parameters")
    config = Config.tiny()
    model = build_model(config)
    batch = {"images": torch.randn(4, 3, config.image_size, config.image_size),
             "tokens": torch.randint(5, config.vocab_size, (4, 12))}
    losses = model(batch)
    losses["loss"].backward()
    print({k: round(v.item(), 4) for k, v in losses.items()})
