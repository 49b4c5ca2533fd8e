"""Autoregressive decoding over a next-token function: greedy, beam search, nucleus sampling.

Every paper plugs its own decoder in through one function:

    step_fn(tokens: LongTensor (R, t), rows: LongTensor (R,)) -> FloatTensor (R, V)

returns the LOG-probabilities of the next token (token t+1) for R partial sequences. `rows[r]` is
the batch item (0 .. B-1) that sequence r belongs to, so a model can pick that item's image
features (`image_queries[rows]`) when beam search holds K hypotheses per item, or when finished
items are dropped from the call. R varies from call to call: only sequences that still need a
next token are passed.

Conventions shared by the four functions:
    * `prefix` (B, T0) is given, e.g. [CLS] / [SOS] (T0 = 1), or the start token and a prompt
      (T0 > 1), and is copied into the output.
    * `max_len` is the TOTAL length, prefix included: at most max_len - T0 tokens are generated
      and the output has at most max_len columns. max_len == T0 generates nothing.
    * A sequence is finished when it emits `end_id`; the end token is kept in the output and
      every later position holds `pad_id`. The returned length T is that of the longest output
      row (decoding stops as soon as every sequence is finished), so T <= max_len.
    * `pad_id` is never generated: its log p is set to -inf (unless pad_id is end_id, as in
      toy vocabularies, or outside the vocabulary). A decoder that masks [PAD] keys (VirTex's
      uncached step) and one that keeps them in a cache therefore see the same rows.
    * Forbidden tokens (pad_id; the repeated token under `block_repeat`) get log p = -inf, the
      others keep the step_fn's values, not renormalised. A step where a sequence has no token
      left (a vocabulary of [PAD] alone; two tokens, [PAD] and the one just emitted, under
      block_repeat; a step_fn giving -inf to the rest) is a ValueError: the alternative would
      be generating a forbidden token.
    * Scores are sums of the step_fn's log-probs of the generated tokens (end token included;
      the prefix is not scored), accumulated in float32 (float64 if step_fn returns float64).

    greedy          argmax at every step
    beam_search     K live hypotheses per item, finished ones moved out, Σ log p / len^α,
                    optional repeat blocking [Oscar code; VirTex code]
    sample_with_grad  plain sampling whose log-probs keep their gradients (SCST)
    nucleus_sample  top-p sampling with temperature [Holtzman et al. 2020, "The Curious Case of
                    Neural Text Degeneration", arXiv 1904.09751, §3.1], optional repeat
                    blocking [VirTex code]

[VirTex code] = github.com/kdexd/virtex, virtex/utils/beam_search.py (AutoRegressiveBeamSearch,
adapted from AllenNLP's) and virtex/utils/nucleus_sampling.py. [Oscar code] =
github.com/microsoft/Oscar, oscar/modeling/modeling_utils.py (_generate_beam_search and
BeamHypotheses, from HuggingFace transformers 2.x). The decoding settings each paper uses are
chosen, with their sources, in its paper file.

Shapes: B batch items, K beam size, R rows passed to step_fn, t current length, T output
length, T0 prefix length, V vocabulary.
"""

import math
from typing import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], Tensor]  # (tokens (R, t), rows (R,)) -> log-probs (R, V)

NEG_INF = float("-inf")


# --- helpers ------------------------------------------------------------------------------------

def _check_prefix(prefix: Tensor, max_len: int) -> None:
    if prefix.dim() != 2 or prefix.shape[1] < 1 or prefix.dtype != torch.long:
        raise ValueError(f"prefix must be a LongTensor (B, T0) with T0 >= 1 (e.g. the start "
                         f"token), got {prefix.dtype} of shape {tuple(prefix.shape)}")
    if max_len < prefix.shape[1]:
        raise ValueError(f"max_len counts the whole sequence, prefix included: max_len={max_len} "
                         f"is shorter than the prefix ({prefix.shape[1]} tokens)")


def _call(step_fn: StepFn, tokens: Tensor, rows: Tensor) -> Tensor:
    """step_fn(tokens (R, t), rows (R,)) -> (R, V) log-probs, checked, as float32 or float64."""
    logp = step_fn(tokens, rows)  # (R, V)
    if logp.dim() != 2 or logp.shape[0] != tokens.shape[0]:
        raise ValueError(f"step_fn must return (R, V) next-token log-probs for its R = "
                         f"{tokens.shape[0]} rows, got shape {tuple(logp.shape)}")
    return logp if logp.dtype == torch.float64 else logp.float()  # sum in >= float32


def _forbid(logp: Tensor, last: Tensor, end_id: int, pad_id: int, block_repeat: bool) -> Tensor:
    """logp (R, V) with -inf at pad_id (unless it is end_id or outside the vocabulary) and, with
    block_repeat, at each row's last token (last (R,))."""
    V = logp.shape[1]
    vocab = torch.arange(V, device=logp.device)[None, :]  # (1, V)
    forbidden = (vocab == pad_id) & (pad_id != end_id)  # (1, V)
    if block_repeat:
        forbidden = forbidden | (vocab == last[:, None])  # (R, V)
    return _some_allowed(logp.masked_fill(forbidden, NEG_INF), pad_id, block_repeat)  # (R, V)


def _some_allowed(logp: Tensor, pad_id: int, block_repeat: bool) -> Tensor:
    """logp (R, V) itself, once checked that every row leaves a token to generate (argmax would
    pick a forbidden one, multinomial would fail on NaN). One host-device sync; decoding syncs
    once a step anyway."""
    if not bool((logp > NEG_INF).any(dim=1).all()):
        raise ValueError(f"no token may be generated: every log p of a row is -inf (or NaN) once "
                         f"[PAD] = {pad_id}{' and the token just emitted' if block_repeat else ''}"
                         f" are forbidden, with a vocabulary of V = {logp.shape[1]}")
    return logp


def _length_normalise(sums: Tensor, lengths: Tensor | int, alpha: float) -> Tensor:
    """Σ log p / len^α, the score hypotheses are ranked by; α = 0 returns the plain sum.

    `lengths` counts generated tokens (end token included, prefix excluded), a tensor or one
    int for all; clamped to >= 1 so that nothing generated yet divides by 1, not 0.
    """
    if alpha == 0.0:
        return sums
    if isinstance(lengths, int):
        return sums / float(max(lengths, 1)) ** alpha
    return sums / lengths.clamp(min=1).to(sums.dtype) ** alpha


def start_prefix(start_id: int, prompt: Tensor | list | None, batch: int, device) -> Tensor:
    """A captioner's prefix (B, 1 + T0): the start token, then the prompt's ids, (B, T0) or
    (T0,) for the same prompt on every item; just the start token (B, 1) without a prompt."""
    start = torch.full((batch, 1), start_id, dtype=torch.long, device=device)  # (B, 1)
    if prompt is None:
        return start
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device)
    return torch.cat([start, prompt.expand(batch, -1) if prompt.dim() == 1 else prompt], dim=1)


# --- greedy and nucleus sampling: one token per row and step --------------------------------------

def _decode_one_per_row(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int, pad_id: int,
                        choose: Callable[[Tensor, Tensor], Tensor]
                        ) -> tuple[Tensor, Tensor, Tensor]:
    """The loop greedy and nucleus sampling share: at every step each unfinished row gets one
    token from `choose(logp (R, V), last tokens (R,)) -> (R,)`; finished rows get `pad_id` and
    score nothing.

    Returns:
        tokens (B, T) LongTensor, prefix included, T <= max_len;
        logprob (B,) Σ of step_fn's log-probs of the chosen tokens (end token included);
        lengths (B,) the number of generated tokens (end token included).
    """
    _check_prefix(prefix, max_len)
    B = prefix.shape[0]
    tokens = prefix  # (B, t), grows by one column per step
    logprob = torch.zeros(B, device=prefix.device)  # (B,), dtype fixed by the first step
    lengths = torch.zeros(B, dtype=torch.long, device=prefix.device)  # (B,)
    finished = torch.zeros(B, dtype=torch.bool, device=prefix.device)  # (B,)
    for _ in range(prefix.shape[1], max_len):
        alive = (~finished).nonzero().squeeze(1)  # (R,) the rows still decoding, = their item ids
        logp = _call(step_fn, tokens[alive], alive)  # (R, V)
        chosen = choose(logp, tokens[alive, -1])  # (R,)
        next_token = torch.full((B,), pad_id, dtype=torch.long, device=prefix.device)  # (B,)
        next_token[alive] = chosen
        logprob = logprob.to(logp.dtype)
        logprob[alive] += logp.gather(1, chosen[:, None]).squeeze(1)  # + log p(chosen)
        lengths[alive] += 1
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, t + 1)
        finished[alive] = chosen == end_id
        if finished.all():  # every row has emitted end_id: no later column can hold a token
            break
    return tokens, logprob, lengths


@torch.no_grad()
def greedy(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int, pad_id: int = 0,
           block_repeat: bool = False) -> tuple[Tensor, Tensor]:
    """Greedy decoding: the most likely allowed next token at every step.

    Args:
        step_fn: (tokens (R, t), rows (R,)) -> (R, V) next-token log-probs (module docstring).
        prefix: (B, T0) LongTensor, the start of every sequence (e.g. [CLS]).
        max_len: total length limit, prefix included (at most max_len - T0 new tokens).
        end_id: the token that finishes a sequence (kept in the output).
        pad_id: written after a sequence's end token; never generated.
        block_repeat: forbid the token equal to the one just before it (beam_search).
    Returns:
        tokens: (B, T) LongTensor, prefix + generated tokens + pad_id padding; T <= max_len is
            the longest row (decoding stops once every row has emitted end_id).
        logprob: (B,) Σ log p of each row's generated tokens, end token included.
    """
    return _decode_one_per_row(step_fn, prefix, max_len, end_id, pad_id,
                               _argmax(end_id, pad_id, block_repeat))[:2]


def _argmax(end_id: int, pad_id: int, block_repeat: bool) -> Callable[[Tensor, Tensor], Tensor]:
    """greedy's choice for _decode_one_per_row: the most likely allowed token of each row."""
    return lambda logp, last: _forbid(logp, last, end_id, pad_id, block_repeat).argmax(dim=1)


def top_p_filter(logp: Tensor, top_p: float, temperature: float = 1.0) -> Tensor:
    """The nucleus distribution: tempered, truncated to the top-p set, renormalised.

        q ∝ exp(log p / temperature)                       (temperature < 1 sharpens)
        keep the fewest most likely tokens whose q sums to >= top_p; renormalise over them.

    [Holtzman et al. 2020, §3.1, Eq. 3]. The most likely token is always kept, so top_p → 0
    keeps only the argmax (greedy) and top_p = 1 keeps everything.

    Args:
        logp: (R, V) log-probs, at least one finite per row.
    Returns:
        (R, V) probabilities, zero outside the nucleus, rows summing to 1.
    """
    # A temperature the dtype cannot hold (1e-300 is 0 in float32, 1e300 is inf) would make
    # 0 / 0 or -inf / inf = NaN: it is clamped into the dtype's range, which changes nothing
    # else. Shifted so the most likely token is at 0: at a tiny temperature the others go to
    # -inf, never the whole row.
    info = torch.finfo(logp.dtype)
    temperature = min(max(temperature, info.tiny), info.max)
    shifted = logp - logp.amax(dim=1, keepdim=True)  # (R, V), <= 0
    q = (shifted / temperature).softmax(dim=1)  # (R, V), the tempered distribution
    if top_p >= 1.0:
        return q
    q_sorted, order = q.sort(dim=1, descending=True)  # (R, V), most likely first
    mass_before = q_sorted.cumsum(dim=1) - q_sorted  # (R, V), mass of the strictly likelier tokens
    keep_sorted = mass_before < top_p  # (R, V); the first token has mass_before 0: always kept
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)  # (R, V), unsorted back
    q = q.masked_fill(~keep, 0.0)  # (R, V)
    return q / q.sum(dim=1, keepdim=True)  # (R, V), renormalised over the nucleus


@torch.no_grad()
def nucleus_sample(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int,
                   top_p: float = 0.9, temperature: float = 1.0,
                   generator: torch.Generator | None = None,
                   pad_id: int = 0, block_repeat: bool = False) -> tuple[Tensor, Tensor]:
    """Nucleus (top-p) sampling with temperature [Holtzman et al. 2020].

    Each step draws the next token from `top_p_filter(logp, top_p, temperature)`. Same length,
    end and padding conventions as `greedy`; top_p → 0 gives greedy's tokens.

    block_repeat [VirTex code]: the nucleus is formed first, then the token just emitted is
    taken out of it (the rest renormalised), from the first step on (the last prefix token).
    AMBIGUITY: where the nucleus held only that token, VirTex's code samples uniformly from the
    whole vocabulary (every logit set to -1e12); we take the nucleus of the other tokens.

    Args:
        step_fn, prefix, max_len, end_id, pad_id: as in `greedy`.
        top_p: in (0, 1], the probability mass of the nucleus.
        temperature: > 0 and finite, divides the log-probs before the nucleus is taken.
        generator: a torch.Generator on the device of the log-probs, for reproducible samples.
        block_repeat: never sample the token just emitted (above).
    Returns:
        tokens: (B, T) as in `greedy`.
        logprob: (B,) Σ of the step_fn's (untempered, untruncated) log-probs of the sampled
            tokens: the model's likelihood of its sample, comparable with greedy's.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 < temperature < math.inf:  # NaN included
        raise ValueError(f"temperature must be > 0 and finite, got {temperature} "
                         f"(use greedy for 0)")

    def choose(logp: Tensor, last: Tensor) -> Tensor:
        allowed = _forbid(logp, last, end_id, pad_id, block_repeat=False)  # (R, V), no [PAD]
        q = top_p_filter(allowed, top_p, temperature)  # (R, V)
        if block_repeat:
            repeat = torch.arange(q.shape[1], device=q.device)[None, :] == last[:, None]  # (R, V)
            q = q.masked_fill(repeat, 0.0)  # (R, V), the previous token out of the nucleus
            empty = q.sum(dim=1) == 0  # (R,) the nucleus was that token alone
            if empty.any():
                others = _some_allowed(allowed[empty].masked_fill(repeat[empty], NEG_INF),
                                       pad_id, block_repeat)  # (E, V)
                q[empty] = top_p_filter(others, top_p, temperature)
        return torch.multinomial(q, 1, generator=generator).squeeze(1)  # (R,), renormalised

    return _decode_one_per_row(step_fn, prefix, max_len, end_id, pad_id, choose)[:2]


def sample_with_grad(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int,
                     pad_id: int = 0, generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Sampling from the model's own distribution (no temperature, top-k or top-p), with the
    graph kept: the log-probs of the sampled tokens carry gradients to the model, as
    self-critical sequence training needs them [Rennie et al. 2017; Oscar's code:
    the code's run_captioning.py --scst: do_sample, the log-probs of the sampling pass]. Run it with
    gradients enabled (the other decoders here run under no_grad). Same length, end and padding
    conventions as `greedy`; [PAD] is never drawn.

    Returns:
        tokens: (B, T) as in `greedy` (no gradient: drawn, not computed);
        logprob: (B,) Σ log p of each row's sampled tokens, end token included (differentiable);
        lengths: (B,) the number of sampled tokens, end token included.
    """
    def choose(logp: Tensor, last: Tensor) -> Tensor:
        allowed = _forbid(logp.detach(), last, end_id, pad_id, block_repeat=False)  # (R, V)
        return torch.multinomial(allowed.exp(), 1, generator=generator).squeeze(1)  # (R,)

    return _decode_one_per_row(step_fn, prefix, max_len, end_id, pad_id, choose)


# --- beam search ----------------------------------------------------------------------------------

@torch.no_grad()
def beam_search(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int, beam_size: int = 5,
                length_penalty: float = 0.0, block_repeat: bool = False,
                pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Beam search with K live hypotheses per item; finished ones move to a finished list.

    Every step, each of the K live hypotheses of an item is extended by every allowed token,
    and the K·V extensions are scored

        score = Σ log p / len^α,    len = generated tokens (end included, prefix excluded)

    (α = `length_penalty`; α = 0 is the plain sum; α > 0 favours longer captions). All
    extensions at a step have the same length, so ranking by score is ranking by Σ log p. The
    K best unfinished extensions form the next beam, so every step has K live hypotheses: a
    finished one never costs a live slot [Oscar code]. An extension by `end_id` that ranks with
    them (its Σ at least the K-th live one's: Oscar's code files the finished extensions it
    meets while filling the beam from the best down) leaves the beam for the item's finished
    list, of which only the best is kept (Oscar's `num_keep_best` = 1).

    First step: the K beams start identical (the prefix); only beam 0 is live (the others start
    at -inf), so the first beam holds K *different* tokens instead of K copies of the best one.

    Stops for an item once no live hypothesis can beat its best finished one (log p <= 0: a sum
    only falls, and the length is at most max_len - T0, so a live Σ can reach at most
    Σ / (max_len - T0)^α) [Oscar code: BeamHypotheses.is_done], for every item at max_len.
    The stop never changes the result; it relies on step_fn returning log-probs (<= 0).

    K = 1 is `greedy` (with block_repeat, scored Σ log p / len^α), as in Oscar's code, whose
    num_beams = 1 runs its no-beam search.

    Differences from the official searches:
        DEVIATION: VirTex's code (AllenNLP's search) keeps a finished hypothesis in the beam,
            where it holds one of the K slots until the end; here it moves out.
        DEVIATION: at max_length Oscar's code also files the unfinished hypotheses (writing
            [SEP] over their last token), to compete with the finished ones; here an unfinished
            hypothesis is returned only for an item where none finished. (Oscar's code ranks
            only the top 2K extensions, TOPN_PER_BEAM = 2; at most K of them end, so the K live
            ones and the filed finished ones are those of all K·V, as here.)
        DEVIATION: VirTex's code lets each hypothesis propose only its 2 best tokens
            (`per_node_beam_size`); we rank all K·V extensions, the textbook search.
        AMBIGUITY (block_repeat): VirTex's code starts blocking at the second generated token,
            with log p = -10000 rather than -inf; we also block the last prefix token at the
            first step (which only forbids re-emitting the start token or a prompt's last).

    Args:
        step_fn: (tokens (R, t), rows (R,)) -> (R, V) next-token log-probs; R <= B·K and
            rows[r] is the item of hypothesis r.
        prefix: (B, T0) LongTensor.  max_len: total length limit, prefix included.
        end_id: the token that finishes a hypothesis.
        beam_size: K >= 1.
        length_penalty: α >= 0 (finite) in Σ log p / len^α.
        block_repeat: forbid a token equal to the one just before it (log p set to -inf, not
            renormalised) [VirTex code].
        pad_id: written after a hypothesis's end token; never generated.
    Returns:
        tokens: (B, T) LongTensor, prefix + the best finished hypothesis + pad_id padding (the
            best live one, max_len long, for an item where none finished); T <= max_len is the
            longest row.
        score: (B,) its Σ log p / len^α.
    """
    _check_prefix(prefix, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not 0.0 <= length_penalty < math.inf:  # NaN included
        raise ValueError(f"length_penalty α must be >= 0 and finite, got {length_penalty}")
    alpha, K = float(length_penalty), beam_size
    if K == 1:
        tokens, logprob, lengths = _decode_one_per_row(step_fn, prefix, max_len, end_id, pad_id,
                                                       _argmax(end_id, pad_id, block_repeat))
        return tokens, _length_normalise(logprob, lengths, alpha)
    B, T0 = prefix.shape
    device = prefix.device
    max_new = max(max_len - T0, 1)  # the most tokens a hypothesis can generate

    # The beam: K live hypotheses per item, flattened to B·K rows when calling step_fn.
    tokens = prefix.repeat_interleave(K, dim=0).view(B, K, T0)  # (B, K, t)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B·K,), item of each flat row
    sums = torch.full((B, K), NEG_INF, device=device)  # (B, K), Σ log p; -inf = no hypothesis
    sums[:, 0] = 0.0  # only beam 0 is live at the first step (the K beams are identical)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) items whose search stopped

    # The finished list: the best finished hypothesis of each item so far.
    best_score = torch.full((B,), NEG_INF, device=device)  # (B,)
    best_tokens = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)  # (B, max_len)
    best_tokens[:, :T0] = prefix
    best_length = torch.full((B,), T0, dtype=torch.long, device=device)  # (B,) total length
    has_best = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    items = torch.arange(B, device=device)  # (B,)

    for t in range(T0, max_len):
        # 1. Log-probs of the next token, asked only for the live hypotheses of searching items.
        flat_tokens = tokens.reshape(B * K, t)  # (B·K, t)
        live = (torch.isfinite(sums) & ~done[:, None]).view(-1)  # (B·K,)
        if not live.any():
            break
        ask = live.nonzero().squeeze(1)  # (R,)
        out = _call(step_fn, flat_tokens[ask], rows[ask])  # (R, V)
        V = out.shape[1]
        sums, best_score = sums.to(out.dtype), best_score.to(out.dtype)
        logp = out.new_full((B * K, V), NEG_INF)  # (B·K, V), -inf for rows not asked
        logp[ask] = _forbid(out, flat_tokens[ask, -1], end_id, pad_id, block_repeat)
        cand = (sums.view(B * K, 1) + logp).view(B, K, V)  # Σ log p after each extension
        n = t + 1 - T0  # generated tokens of every extension at this step

        # 2. The K best unfinished extensions are the next beam.
        ended = cand[:, :, end_id].clone() if 0 <= end_id < V else None  # (B, K) finished Σ
        if ended is not None:
            cand[:, :, end_id] = NEG_INF  # not a live extension
        top_sums, top = cand.view(B, K * V).topk(K, dim=1)  # (B, K), index into K·V

        # 3. Finished extensions that rank with the beam (Σ at least the K-th live one's) are
        # filed; the best of them replaces the item's best finished one if it beats it.
        if ended is not None:
            ended = ended.masked_fill(ended < top_sums[:, -1:], NEG_INF)  # (B, K)
            ended_score, ended_k = _length_normalise(ended, n, alpha).max(dim=1)  # (B,), (B,)
            better = ended_score > best_score  # (B,)
            best_score = torch.where(better, ended_score, best_score)  # (B,)
            best_tokens[:, :t] = torch.where(better[:, None], tokens[items, ended_k],
                                             best_tokens[:, :t])  # (B, t)
            best_tokens[better, t] = end_id
            best_length = torch.where(better, t + 1, best_length)  # (B,)
            has_best |= better
        sums, parent, token = top_sums, top // V, top % V  # (B, K): Σ, hypothesis, new token
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(B, K, t)),
                            token[..., None]], dim=2)  # (B, K, t + 1)

        # 4. An item stops once no live hypothesis can beat its best finished one.
        reachable = _length_normalise(sums.amax(dim=1), max_new, alpha)  # (B,)
        done |= has_best & (best_score >= reachable)

    # Result: the best finished hypothesis; for an item with none, its best live one.
    T = tokens.shape[2]
    live_sum, live_k = sums.max(dim=1)  # (B,), (B,)
    out_tokens = torch.where(has_best[:, None], best_tokens[:, :T], tokens[items, live_k])
    out_score = torch.where(has_best, best_score, _length_normalise(live_sum, T - T0, alpha))
    out_length = torch.where(has_best, best_length, T)  # (B,)
    return out_tokens[:, :int(out_length.max())], out_score  # (B, T'), (B,)


# --- reusing a step function's per-row state across calls (cached decoding) ---------------------

class PrefixParents:
    """Which row of the previous step_fn call each row of this call extends, found by its
    tokens, so a step function can keep per-row state (a cache) under greedy, beam_search and
    nucleus_sample without changing their interface.

    Every row a decoder passes at length t is a row it passed at length t - 1 plus one token
    (beam search reorders, repeats and drops rows; greedy drops finished ones). Its parent is
    the previous row with the same item and the same first t - 1 tokens; rows with the same
    tokens and item have the same state, so any one of them will do.

        parents = PrefixParents()
        def step_fn(tokens, rows):
            index = parents(tokens, rows)   # None at the first call, else (R,) into the last call
            ...

    One host-device sync per call (the tokens are compared on the CPU); decoding syncs once a
    step anyway (to know which rows are finished).
    """

    def __init__(self):
        self.keys: dict | None = None

    def __call__(self, tokens: Tensor, rows: Tensor) -> Tensor | None:
        token_rows, item_rows = tokens.tolist(), rows.tolist()
        previous = self.keys
        self.keys = {(item, tuple(row)): r for r, (item, row) in
                     enumerate(zip(item_rows, token_rows))}
        if previous is None:
            return None
        try:
            index = [previous[(item, tuple(row[:-1]))] for item, row in zip(item_rows, token_rows)]
        except KeyError:
            raise ValueError("a row does not extend a row of the previous call: one "
                             "PrefixParents serves one decoding call, from its first step")
        return torch.tensor(index, device=tokens.device)  # (R,)


def take_rows(cache: list[tuple[Tensor, Tensor]], index: Tensor) -> list[tuple[Tensor, Tensor]]:
    """A key/value cache [(k, v)] * layers at these rows (index (R,) into dim 0), with no copy
    when they are all the rows in order (greedy before any row finishes: most steps)."""
    n = len(cache[0][0])
    if len(index) == n and torch.equal(index, torch.arange(n, device=index.device)):
        return cache
    return [(k[index], v[index]) for k, v in cache]


def cached_step_fn(step, context_kv: list) -> StepFn:
    """A decoder's one-position step with a key/value cache as a StepFn for greedy, beam_search
    and nucleus_sample:

        step(token (R,), position, past, context_kv_rows, rows) -> (logits (R, V), new past)

    runs the token of each row at `position` (0-based) against `past`, the cache of positions
    0 .. position - 1 (None at position 0), and context_kv_rows, the image's cross-attention (or
    context) keys and values at these rows; it returns the cache with this position added.
    The first call fills the cache from the whole prefix, one position at a time (a prompt of
    T0 > 1 tokens: every prefix token is seen); later calls run the last token against the
    cache of the row it extends, found by PrefixParents; take_rows gathers only when the rows
    changed."""
    parents, cache = PrefixParents(), [None]

    def step_fn(tokens: Tensor, rows: Tensor) -> Tensor:
        index = parents(tokens, rows)  # (R,) the row of the last call each row extends
        context = take_rows(context_kv, rows)
        if index is None:  # first call: every prefix position into the cache
            past = None
            for position in range(tokens.shape[1]):
                logits, past = step(tokens[:, position], position, past, context, rows)
        else:
            logits, past = step(tokens[:, -1], tokens.shape[1] - 1, take_rows(cache[0], index),
                                context, rows)
        cache[0] = past
        return logits.float().log_softmax(dim=-1)  # (R, V)
    return step_fn
