"""Multi-head scaled dot-product attention, written out once for all four papers.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(Dh) + mask) V        [Vaswani et al. 2017, Eq. 1]

Two paths compute the same function:
    * `attention_math`: the equation line by line (QK^T/√Dh, mask, softmax, ·V). Read this one.
    * `attention_sdpa`: `torch.nn.functional.scaled_dot_product_attention`, the fused kernel
      (flash / memory-efficient on CUDA, a fused C++ loop on CPU). Train with this one.
`tests/test_attention.py` proves them equal in fp32 and fp64, with and without masks.

Mask convention (shared/masks.py): a boolean `allowed`, True where query i may attend to key j,
shape (B, Tq, Tk) or broadcastable. A query row that may attend to nothing (a fully padded row)
returns zeros, never NaN, on both paths: such rows are opened to every key before the softmax
(so nothing divides by zero and gradients stay finite) and their output is then set to zero.

Shapes: B batch, Tq queries, Tk keys, D width, H heads, Dh = D / H head width.
"""

import math

import torch.nn.functional as F
from torch import Tensor, nn

from shared.masks import causal_mask, expand_mask


def _open_empty_rows(allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Return (mask with empty rows opened to all keys, (B, 1, Tq, 1) bool: row is non-empty)."""
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, Tq, 1) or broadcastable
    return allowed | ~has_key, has_key


def attention_math(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None,
                   dropout_p: float = 0.0) -> Tensor:
    """The reference path: Eq. 1 of "Attention Is All You Need", one line per term.

    Args:
        q: (B, H, Tq, Dh) queries.  k: (B, H, Tk, Dh) keys.  v: (B, H, Tk, Dh) values.
        allowed: (B, 1, Tq, Tk) bool or broadcastable, True = may attend. None = all allowed.
        dropout_p: dropout on the attention weights (training only; pass 0.0 in eval).
    Returns:
        (B, H, Tq, Dh)
    """
    Dh = q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(Dh)  # (B, H, Tq, Tk), QK^T / √Dh
    if allowed is None:
        weights = scores.softmax(dim=-1)  # (B, H, Tq, Tk), softmax over the keys
        return F.dropout(weights, dropout_p) @ v  # (B, H, Tq, Dh)
    allowed, has_key = _open_empty_rows(allowed)
    scores = scores.masked_fill(~allowed, float("-inf"))  # (B, H, Tq, Tk), hidden keys get e^-inf = 0
    weights = scores.softmax(dim=-1)  # (B, H, Tq, Tk)
    out = F.dropout(weights, dropout_p) @ v  # (B, H, Tq, Dh), weighted sum of the values
    return out.masked_fill(~has_key, 0.0)  # (B, H, Tq, Dh), rows with no key at all -> 0


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False) -> Tensor:
    """The fast path: the same function through the fused kernel. Same arguments as
    `attention_math`, plus `is_causal` (no explicit mask: lets CUDA pick the flash kernel)."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
    allowed, has_key = _open_empty_rows(allowed)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    return out.masked_fill(~has_key, 0.0)  # (B, H, Tq, Dh)


class MultiHeadAttention(nn.Module):
    """Multi-head attention [Vaswani et al. 2017, §3.2.2], for self- and cross-attention.

    Self-attention when `context` is None (BERT encoders of Oscar/UNITER, the text decoders of
    VirTex/CoCa); cross-attention when `context` holds other tokens (the image tokens in the
    VirTex/CoCa decoders, the image patches in CoCa's attentional poolers).

    `fast` picks the SDPA path (default) or the explicit math path; they compute the same thing.
    Parameter names (q_proj, k_proj, v_proj, out_proj) map one to one onto BERT's
    query/key/value/attention.output.dense, so a checkpoint can be loaded key by key.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0,
                 context_dim: int | None = None, fast: bool = True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"width {d_model} is not divisible by the number of heads {n_heads}")
        context_dim = d_model if context_dim is None else context_dim
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)  # W^Q, all heads side by side
        self.k_proj = nn.Linear(context_dim, d_model)  # W^K
        self.v_proj = nn.Linear(context_dim, d_model)  # W^V
        self.out_proj = nn.Linear(d_model, d_model)  # W^O
        self.dropout = dropout
        self.fast = fast

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values (B, H, Tk, Dh) of context tokens (B, Tk, Dc): what a decoding
        cache keeps, so that tokens seen at an earlier step are not projected again."""
        B, Tk, _ = context.shape
        k = self.k_proj(context).view(B, Tk, self.n_heads, self.d_head).transpose(1, 2)
        v = self.v_proj(context).view(B, Tk, self.n_heads, self.d_head).transpose(1, 2)
        return k, v  # (B, H, Tk, Dh) each

    def forward(self, x: Tensor, context: Tensor | None = None, allowed: Tensor | None = None,
                causal: bool = False, kv: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """
        Args:
            x: (B, Tq, D) queries.
            context: (B, Tk, Dc) keys/values; None = self-attention on `x`.
            allowed: (B, Tq, Tk) bool or broadcastable (shared.masks), True = may attend.
            causal: also apply the causal mask (query i sees keys 0..i); self-attention only.
            kv: the keys and values (B, H, Tk, Dh) already projected (project_kv, e.g. kept
                by a decoding cache); given, `context` is not read.
        Returns:
            (B, Tq, D)
        """
        B, Tq, D = x.shape
        H, Dh = self.n_heads, self.d_head

        q = self.q_proj(x).view(B, Tq, H, Dh).transpose(1, 2)  # (B, H, Tq, Dh)
        k, v = self.project_kv(x if context is None else context) if kv is None else kv
        Tk = k.shape[2]  # k, v: (B, H, Tk, Dh)

        if allowed is not None:
            allowed = expand_mask(allowed, B, Tq, Tk)  # (B|1, Tq|1, Tk|1), shapes checked
            if causal:
                allowed = allowed & causal_mask(Tq, device=x.device)  # (B|1, Tq, Tk)
            allowed = allowed[:, None]  # (B|1, 1, Tq|1, Tk|1), one mask for every head
        dropout_p = self.dropout if self.training else 0.0

        if self.fast:
            is_causal = causal and allowed is None  # pure causal: no mask tensor at all
            out = attention_sdpa(q, k, v, allowed, dropout_p, is_causal=is_causal)
        else:
            if causal and allowed is None:
                allowed = causal_mask(Tq, device=x.device)[None, None]  # (1, 1, Tq, Tk)
            out = attention_math(q, k, v, allowed, dropout_p)  # (B, H, Tq, Dh)

        out = out.transpose(1, 2).reshape(B, Tq, D)  # (B, Tq, D), heads concatenated
        return self.out_proj(out)  # (B, Tq, D)


def set_fast_attention(model: nn.Module, fast: bool) -> nn.Module:
    """Switch every MultiHeadAttention inside `model` to the SDPA (True) or math (False) path."""
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.fast = fast
    return model
