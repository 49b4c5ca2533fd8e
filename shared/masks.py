"""Attention masks, one convention for the whole project.

    A mask is a boolean tensor `allowed` with True where query i MAY attend to key j.

Shapes are (B, Tq, Tk) or anything that broadcasts to it: a padding mask is (B, 1, Tk) (the same
keys are hidden from every query), a causal mask is (Tq, Tk) (the same for every example).
Combine masks with `&` (both must allow). `MultiHeadAttention` adds the head axis itself.

The helpers below are the only places masks are built, so a reader can print any of them:

    >>> causal_mask(3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)

A row that allows nothing (e.g. the query is itself a pad and every key is hidden from it)
is legal: attention returns zeros for it, never NaN (see shared/attention.py).

Arguments of the wrong shape or out of range (tokens that are not (B, Tk), a negative length,
lengths beyond max_len, a segment id the rule table has no row for) are a ValueError naming
them, not an indexing error or a mask of another shape further on.
"""

import torch
from torch import Tensor


def padding_mask(tokens: Tensor, pad_id: int = 0) -> Tensor:
    """Keys that are real tokens may be attended to; pads may not.

    Args:
        tokens: (B, Tk) token ids.
        pad_id: the id of [PAD].
    Returns:
        (B, 1, Tk) bool, broadcasts over every query.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, Tk) token ids, got shape {tuple(tokens.shape)}")
    return (tokens != pad_id)[:, None, :]  # (B, 1, Tk)


def lengths_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Like `padding_mask`, from per-example lengths (e.g. the number of real regions).

    Args:
        lengths: (B,) number of real keys in each example; keys [0, lengths[b]) are real.
        max_len: Tk, the padded length.
    Returns:
        (B, 1, Tk) bool.
    """
    if lengths.dim() != 1 or max_len < 0:
        raise ValueError(f"lengths must be (B,) and max_len >= 0, got lengths of shape "
                         f"{tuple(lengths.shape)} and max_len {max_len}")
    if bool(((lengths < 0) | (lengths > max_len)).any()):  # a longer one would lose keys unseen
        raise ValueError(f"lengths must lie in [0, max_len = {max_len}], got {lengths.tolist()}")
    positions = torch.arange(max_len, device=lengths.device)  # (Tk,)
    return (positions[None, :] < lengths[:, None])[:, None, :]  # (B, 1, Tk)


def causal_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    """Query i may attend to keys 0..i (itself and the past): the autoregressive mask.

    Returns:
        (T, T) bool, lower triangular including the diagonal.
    """
    if T < 0:
        raise ValueError(f"causal_mask needs a length T >= 0, got T = {T}")
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)


def block_mask(segments: Tensor, rules: Tensor) -> Tensor:
    """An arbitrary block mask from per-token segment ids and a segment-to-segment rule table.

    Used for layouts like Oscar's captioning mask where one (B, S, S) mask mixes several regimes
    (caption->caption causal, caption->regions open, regions->caption blocked). Causality inside
    a block is not expressed here: combine with `causal_mask` through `&`/`|` as needed.

    Args:
        segments: (B, S) long, segment id of each token (e.g. 0 caption, 1 tags, 2 regions);
            use -1 for pads, which then neither attend nor are attended to.
        rules: (K, K) bool, rules[a, b] = True when a token of segment a may attend to segment b.
    Returns:
        (B, S, S) bool.
    """
    K = rules.shape[0] if rules.dim() else 0
    if rules.dtype != torch.bool or rules.shape != (K, K) or K == 0:
        raise ValueError(f"rules must be a (K, K) bool table, K >= 1, got {rules.dtype} of "
                         f"shape {tuple(rules.shape)}")
    if segments.dim() != 2:
        raise ValueError(f"segments must be (B, S), got shape {tuple(segments.shape)}")
    if bool(((segments < -1) | (segments >= K)).any()):  # else clamped to a wrong segment
        raise ValueError(f"segment ids must be -1 (pad) or 0..{K - 1} (rows of rules), got "
                         f"{sorted(set(segments.unique().tolist()))}")
    real = segments >= 0  # (B, S)
    seg = segments.clamp(min=0, max=K - 1)  # (B, S), pads mapped anywhere, masked out below
    allowed = rules[seg[:, :, None], seg[:, None, :]]  # (B, S, S), rules[seg_i, seg_j]
    return allowed & real[:, :, None] & real[:, None, :]  # (B, S, S)


def expand_mask(allowed: Tensor, B: int, Tq: int, Tk: int) -> Tensor:
    """Check that a mask broadcasts to (B, Tq, Tk) and return it with exactly three dims.

    Raises a ValueError naming the shapes instead of a broadcasting error deep in attention.
    """
    if allowed.dtype != torch.bool:
        raise ValueError(f"attention masks are boolean (True = may attend), got {allowed.dtype}")
    if allowed.dim() == 2:
        allowed = allowed[None]  # (1, Tq, Tk)
    if allowed.dim() != 3 or any(m not in (1, n) for m, n in zip(allowed.shape, (B, Tq, Tk))):
        raise ValueError(
            f"attention mask of shape {tuple(allowed.shape)} does not broadcast to "
            f"(B, Tq, Tk) = ({B}, {Tq}, {Tk})"
        )
    return allowed  # (B or 1, Tq or 1, Tk or 1)
