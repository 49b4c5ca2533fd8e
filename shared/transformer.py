"""Transformer blocks from primitives: the two layer orders and the BERT embedding.

Where the LayerNorm sits is the one real difference between the four papers' stacks:

    post-LN (BERT 2019; Oscar, UNITER, VirTex)      pre-LN (ViT 2021; CoCa)
        x = LN(x + Attn(x))                             x = x + Attn(LN(x))
        x = LN(x + MLP(x))                              x = x + MLP(LN(x))

Decoder blocks add a cross-attention sub-layer between the two, attending from the text tokens
to the image tokens (VirTex: the 7x7 grid; CoCa: the captioning pooler's queries).

Every block takes boolean "may attend" masks from shared/masks.py (True = may attend).
Shapes: B batch, T tokens, N image tokens (context), D width, H heads.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from shared.attention import MultiHeadAttention


def run_layer(layer: nn.Module, *args, checkpointed: bool = False, **kwargs):
    """layer(*args, **kwargs). checkpointed (activation checkpointing, --grad_checkpointing):
    while gradients are on, the layer keeps only its inputs, and its forward runs again in the
    backward to rebuild the activations it needs: less memory for about one more forward of
    compute. The random state is replayed (torch.utils.checkpoint), so dropout draws the same
    masks and the gradients equal the plain ones."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


class MLP(nn.Module):
    """The position-wise feed-forward sub-layer: Linear -> GELU (-> dropout) -> Linear (-> dropout).

    GELU is the exact (erf) form used by BERT, ViT and the CoCa implementations. hidden_dropout
    acts on the d_hidden activations, as torch's TransformerDecoderLayer does (VirTex's
    official decoder); BERT has none there (0).
    """

    def __init__(self, d_model: int, d_hidden: int, dropout: float = 0.0,
                 hidden_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_hidden)  # BERT: intermediate.dense
        self.fc2 = nn.Linear(d_hidden, d_model)  # BERT: output.dense
        self.hidden_dropout = nn.Dropout(hidden_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.hidden_dropout(F.gelu(self.fc1(x)))  # (B, T, d_hidden)
        return self.dropout(self.fc2(h))  # (B, T, D)


class PostLNEncoderBlock(nn.Module):
    """BERT's layer [Devlin et al. 2019; Vaswani et al. 2017 §3.1]: LN after each residual.

    Used by the single-stream encoders of Oscar and UNITER. Names map onto a BERT checkpoint:
    attn.* = attention.self.* / attention.output.dense, attn_norm = attention.output.LayerNorm,
    mlp.fc1 = intermediate.dense, mlp.fc2 = output.dense, mlp_norm = output.LayerNorm.
    """

    def __init__(self, d_model: int, n_heads: int, d_hidden: int, dropout: float = 0.1,
                 eps: float = 1e-12):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.attn_dropout = nn.Dropout(dropout)  # on the sub-layer output, before the residual
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_hidden, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: Tensor, allowed: Tensor | None = None, causal: bool = False,
                context: Tensor | None = None, kv: tuple[Tensor, Tensor] | None = None
                ) -> Tensor:
        """x: (B, T, D); allowed: (B, T, Tk) or broadcastable. Returns (B, T, D).

        context: (B, Tk, D) the layer's input at every position the T rows attend to, x's rows
        included; None = x itself (Tk = T). kv: those positions' keys and values already
        projected (self.attn.project_kv), (B, H, Tk, Dh) each, instead of context. Cached
        decoding (Oscar's captioning) passes the keys and values kept from earlier steps with
        x's own, so only x's rows are computed."""
        attended = self.attn(x, context, allowed=allowed, causal=causal, kv=kv)  # (B, T, D)
        x = self.attn_norm(x + self.attn_dropout(attended))
        return self.mlp_norm(x + self.mlp(x))  # (B, T, D)


class PreLNEncoderBlock(nn.Module):
    """ViT's layer [Dosovitskiy et al. 2021, Eq. 2-3]: LN before each sub-layer.

    Used by CoCa's image encoder (bidirectional) and its unimodal text layers (causal=True).
    """

    def __init__(self, d_model: int, n_heads: int, d_hidden: int, dropout: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_hidden, dropout=dropout)

    def forward(self, x: Tensor, allowed: Tensor | None = None, causal: bool = False,
                kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, T, D); allowed: (B, T, Tk) or broadcastable. Returns (B, T, D).
        kv: keys and values (B, H, Tk, Dh) of the positions attended to, kept by a decoding
        cache (attn.project_kv of attn_norm of their inputs); None = computed from x."""
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), allowed=allowed, causal=causal,
                                            kv=kv))
        return x + self.mlp(self.mlp_norm(x))  # (B, T, D)


class PostLNDecoderBlock(nn.Module):
    """The original Transformer decoder layer [Vaswani et al. 2017 §3.1], post-LN.

    VirTex's textual head: causal self-attention, cross-attention to the visual tokens, MLP,
    each followed by dropout, the residual and a LayerNorm; the MLP also drops out its hidden
    activations, as torch's TransformerDecoderLayer (VirTex's official decoder) does.
    """

    def __init__(self, d_model: int, n_heads: int, d_hidden: int, dropout: float = 0.1,
                 eps: float = 1e-5, context_dim: int | None = None):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.self_attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout,
                                             context_dim=context_dim)
        self.cross_attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_hidden, dropout=dropout, hidden_dropout=dropout)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None, allowed: Tensor | None = None,
                causal: bool = True, context_allowed: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None,
                context_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """
        Args:
            x: (B, T, D) text tokens.  context: (B, N, Dc) image tokens.
            allowed: (B, T, T) or broadcastable self-attention mask (e.g. the text padding mask).
            causal: apply the causal mask in self-attention (False for VirTex's MLM ablation).
            context_allowed: (B, T, N) or broadcastable cross-attention mask (None = all).
            kv, context_kv: keys and values (B, H, Tk, Dh) a decoding cache keeps, for the
                self- and the cross-attention (then `context` may be None).
        Returns:
            (B, T, D)
        """
        x = self.self_attn_norm(x + self.dropout(self.self_attn(x, allowed=allowed, causal=causal,
                                                                kv=kv)))
        x = self.cross_attn_norm(x + self.dropout(self.cross_attn(x, context, context_allowed,
                                                                  kv=context_kv)))
        return self.mlp_norm(x + self.mlp(x))  # (B, T, D)


class PreLNDecoderBlock(nn.Module):
    """A pre-LN decoder layer: CoCa's multimodal text layers [CoCa §3.2, Fig. 2].

    Causal self-attention, cross-attention from the text to the image tokens, one MLP, each with
    a LayerNorm in front and a residual around it.

    Two options give open_clip's multimodal layer [code: open_clip transformer.py,
    MultimodalTransformer], a self-attention block and a cross-attention block each with its own
    MLP; both off, the layer above:
        two_mlps      an MLP (with its LayerNorm, self_mlp_norm / self_mlp) right after the
                      self-attention: self-attn, MLP, cross-attn, MLP
        norm_context  a LayerNorm (context_norm) on the context before its keys and values
    """

    def __init__(self, d_model: int, n_heads: int, d_hidden: int, dropout: float = 0.0,
                 eps: float = 1e-6, context_dim: int | None = None, two_mlps: bool = False,
                 norm_context: bool = False):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        if two_mlps:  # the self-attention block's own MLP
            self.self_mlp_norm = nn.LayerNorm(d_model, eps=eps)
            self.self_mlp = MLP(d_model, d_hidden, dropout=dropout)
        self.two_mlps = two_mlps
        # LayerNorm of the context (image tokens) before the cross-attention reads it
        self.context_norm = (nn.LayerNorm(context_dim or d_model, eps=eps) if norm_context
                             else nn.Identity())
        self.cross_attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout,
                                             context_dim=context_dim)
        self.mlp_norm = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, d_hidden, dropout=dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None, allowed: Tensor | None = None,
                causal: bool = True, context_allowed: Tensor | None = None,
                kv: tuple[Tensor, Tensor] | None = None,
                context_kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Same arguments as `PostLNDecoderBlock.forward`, plus the keys and values a decoding
        cache keeps: kv for the self-attention (B, H, Tk, Dh), context_kv for the cross-
        attention (then `context` may be None; project_context makes it). Returns (B, T, D)."""
        x = x + self.dropout(self.self_attn(self.self_attn_norm(x), allowed=allowed,
                                            causal=causal, kv=kv))
        if self.two_mlps:
            x = x + self.self_mlp(self.self_mlp_norm(x))  # (B, T, D)
        context = None if context is None else self.context_norm(context)  # (B, N, Dc)
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), context, context_allowed,
                                             kv=context_kv))
        return x + self.mlp(self.mlp_norm(x))  # (B, T, D)

    def project_context(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The cross-attention's keys and values (B, H, N, Dh) of context (B, N, Dc), normalised
        first where norm_context is on: what a decoding cache keeps as `context_kv`."""
        return self.cross_attn.project_kv(self.context_norm(context))


class BertEmbeddings(nn.Module):
    """BERT's input embedding [Devlin et al. 2019, §3, Fig. 2]:

        E(token at position t, segment s) = Dropout(LN(word[token] + position[t] + token_type[s]))

    Names map onto a BERT checkpoint: word = word_embeddings, position = position_embeddings,
    token_type = token_type_embeddings, norm = LayerNorm.
    """

    def __init__(self, vocab_size: int, d_model: int, max_positions: int = 512,
                 n_token_types: int = 2, dropout: float = 0.1, eps: float = 1e-12,
                 pad_id: int = 0):
        super().__init__()
        self.word = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position = nn.Embedding(max_positions, d_model)
        self.token_type = nn.Embedding(n_token_types, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        # a constant, so it follows .to(device) and is not a parameter
        self.register_buffer("position_ids", torch.arange(max_positions), persistent=False)

    def forward(self, tokens: Tensor, token_types: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """
        Args:
            tokens: (B, T) ids.  token_types: (B, T) segment ids, default all 0.
            positions: (B, T) or (T,) position ids, default 0..T-1.
        Returns:
            (B, T, D)
        """
        T = tokens.shape[1]
        if T > self.position.num_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the "
                             f"{self.position.num_embeddings} learned positions")
        positions = self.position_ids[:T] if positions is None else positions  # (T,) or (B, T)
        x = self.word(tokens) + self.position(positions)  # (B, T, D)
        if token_types is None:
            x = x + self.token_type.weight[0]  # (B, T, D), segment 0 everywhere
        else:
            x = x + self.token_type(token_types)  # (B, T, D)
        return self.dropout(self.norm(x))  # (B, T, D)


class BertPooler(nn.Module):
    """BERT's pooler: tanh(W h_[CLS] + b), the input of the 2-way heads (ITM, Oscar's contrastive
    loss, retrieval). Names map onto a checkpoint: dense = pooler.dense."""

    def __init__(self, d_model: int):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, T, D) -> (B, D), the first token


class HeadTransform(nn.Module):
    """BERT's transform in front of a prediction head's output layer: Linear -> GELU -> LN
    (D -> D); names map onto a checkpoint's cls.predictions.transform (dense, LayerNorm). The
    MLM heads of Oscar and UNITER and UNITER's region heads each have one."""

    def __init__(self, d_model: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(F.gelu(self.dense(x)))  # (..., D)


class TiedOutputHead(nn.Module):
    """BERT's prediction head with its output layer tied to an embedding: transform(h), then
    that embedding's weight (passed in, so it is not a copy) and the head's own bias; names map
    onto a checkpoint's cls.predictions (transform, bias). The MLM heads of Oscar and UNITER
    (the word embeddings (V, D)) and UNITER's MRFR head (the Image Embedder's W_f (D, F),
    transposed)."""

    def __init__(self, d_model: int, out_dim: int):
        super().__init__()
        self.transform = HeadTransform(d_model)
        self.bias = nn.Parameter(torch.zeros(out_dim))

    def forward(self, hidden: Tensor, weight: Tensor) -> Tensor:
        return F.linear(self.transform(hidden), weight, self.bias)  # (M, D) -> (M, out)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, std) for Linear and Embedding weights, zero biases, LayerNorm
    weight 1 and bias 0; the padding embedding row is zero. Use with `model.apply(...)`."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
