"""Autoregressive decoding over a next-token function: greedy, beam search, nucleus sampling.

Every paper plugs its own decoder in through one function:

    step_fn(tokens: LongTensor (R, t), rows: LongTensor (R,)) -> FloatTensor (R, V)

returns the LOG-probabilities of the next token (token t+1) for R partial sequences. `rows[r]` is
the batch item (0 .. B-1) that sequence r belongs to, so a model can pick that item's image
features (`image_queries[rows]`) when beam search holds K hypotheses per item, or when finished
items are dropped from the call. R varies from call to call: only sequences that still need a
next token are passed.

Conventions shared by the three functions:
    * `prefix` (B, T0) is given, e.g. [CLS] / [SOS] (T0 = 1), and is copied into the output.
    * `max_len` is the TOTAL length, prefix included: at most max_len - T0 tokens are generated
      and the output has at most max_len columns. max_len == T0 generates nothing.
    * A sequence is finished when it emits `end_id`; the end token is kept in the output and
      every later position holds `pad_id`. The returned length T is that of the longest output
      row (decoding stops as soon as every sequence is finished), so T <= max_len.
    * Scores are sums of the step_fn's log-probs of the generated tokens (end token included;
      the prefix is not scored), accumulated in float32 (float64 if step_fn returns float64).

    greedy          argmax at every step
    beam_search     K hypotheses per item, Σ log p / len^α, optional repeat blocking
                    [VirTex code]
    nucleus_sample  top-p sampling with temperature [Holtzman et al. 2020, "The Curious Case of
                    Neural Text Degeneration", arXiv 1904.09751, §3.1]

[VirTex code] = github.com/kdexd/virtex, virtex/utils/beam_search.py (AutoRegressiveBeamSearch,
adapted from AllenNLP's). It decodes with beam search (plain Σ log p, no token repeated right
after itself); the decoding settings each paper uses are chosen, with their sources, in its
paper file.

Shapes: B batch items, K beam size, R rows passed to step_fn, t current length, T output
length, T0 prefix length, V vocabulary.
"""

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


def _length_normalise(sums: Tensor, lengths: Tensor, alpha: float) -> Tensor:
    """Σ log p / len^α, the score beams are ranked by; α = 0 returns the plain sum.

    `lengths` counts generated tokens (end token included, prefix excluded); clamped to >= 1
    so that a hypothesis with nothing generated yet divides by 1, not 0.
    """
    if alpha == 0.0:
        return sums
    return sums / lengths.clamp(min=1).to(sums.dtype) ** alpha


# --- greedy and nucleus sampling: one token per row and step --------------------------------------

def _decode_one_per_row(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int, pad_id: int,
                        choose: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The loop greedy and nucleus sampling share: at every step each unfinished row gets one
    token from `choose(logp (R, V)) -> (R,)`; finished rows get `pad_id` and score nothing.

    Returns:
        tokens (B, T) LongTensor, prefix included, T <= max_len;
        logprob (B,) Σ of step_fn's log-probs of the chosen tokens (end token included).
    """
    _check_prefix(prefix, max_len)
    B = prefix.shape[0]
    tokens = prefix  # (B, t), grows by one column per step
    logprob = torch.zeros(B, device=prefix.device)  # (B,), dtype fixed by the first step
    finished = torch.zeros(B, dtype=torch.bool, device=prefix.device)  # (B,)
    for _ in range(prefix.shape[1], max_len):
        alive = (~finished).nonzero().squeeze(1)  # (R,) the rows still decoding, = their item ids
        logp = _call(step_fn, tokens[alive], alive)  # (R, V)
        chosen = choose(logp)  # (R,)
        next_token = torch.full((B,), pad_id, dtype=torch.long, device=prefix.device)  # (B,)
        next_token[alive] = chosen
        logprob = logprob.to(logp.dtype)
        logprob[alive] += logp.gather(1, chosen[:, None]).squeeze(1)  # + log p(chosen)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)  # (B, t + 1)
        finished[alive] = chosen == end_id
        if finished.all():  # every row has emitted end_id: no later column can hold a token
            break
    return tokens, logprob


@torch.no_grad()
def greedy(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int,
           pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Greedy decoding: the most likely next token at every step.

    Args:
        step_fn: (tokens (R, t), rows (R,)) -> (R, V) next-token log-probs (module docstring).
        prefix: (B, T0) LongTensor, the start of every sequence (e.g. [CLS]).
        max_len: total length limit, prefix included (at most max_len - T0 new tokens).
        end_id: the token that finishes a sequence (kept in the output).
        pad_id: written after a sequence's end token.
    Returns:
        tokens: (B, T) LongTensor, prefix + generated tokens + pad_id padding; T <= max_len is
            the longest row (decoding stops once every row has emitted end_id).
        logprob: (B,) Σ log p of each row's generated tokens, end token included.
    """
    return _decode_one_per_row(step_fn, prefix, max_len, end_id, pad_id,
                               choose=lambda logp: logp.argmax(dim=1))  # (R,)


def top_p_filter(logp: Tensor, top_p: float, temperature: float = 1.0) -> Tensor:
    """The nucleus distribution: tempered, truncated to the top-p set, renormalised.

        q ∝ exp(log p / temperature)                       (temperature < 1 sharpens)
        keep the fewest most likely tokens whose q sums to >= top_p; renormalise over them.

    [Holtzman et al. 2020, §3.1, Eq. 3]. The most likely token is always kept, so top_p → 0
    keeps only the argmax (greedy) and top_p = 1 keeps everything.

    Args:
        logp: (R, V) log-probs.
    Returns:
        (R, V) probabilities, zero outside the nucleus, rows summing to 1.
    """
    q = (logp / temperature).softmax(dim=1)  # (R, V), the tempered distribution
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
                   pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Nucleus (top-p) sampling with temperature [Holtzman et al. 2020].

    Each step draws the next token from `top_p_filter(logp, top_p, temperature)`. Same length,
    end and padding conventions as `greedy`; top_p → 0 gives greedy's tokens.

    Args:
        step_fn, prefix, max_len, end_id, pad_id: as in `greedy`.
        top_p: in (0, 1], the probability mass of the nucleus.
        temperature: > 0, divides the log-probs before the nucleus is taken.
        generator: a torch.Generator on the device of the log-probs, for reproducible samples.
    Returns:
        tokens: (B, T) as in `greedy`.
        logprob: (B,) Σ of the step_fn's (untempered, untruncated) log-probs of the sampled
            tokens: the model's likelihood of its sample, comparable with greedy's.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature <= 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy for 0)")

    def choose(logp: Tensor) -> Tensor:
        q = top_p_filter(logp, top_p, temperature)  # (R, V)
        return torch.multinomial(q, 1, generator=generator).squeeze(1)  # (R,)

    return _decode_one_per_row(step_fn, prefix, max_len, end_id, pad_id, choose)


# --- beam search ----------------------------------------------------------------------------------

@torch.no_grad()
def beam_search(step_fn: StepFn, prefix: Tensor, max_len: int, end_id: int, beam_size: int = 5,
                length_penalty: float = 0.0, block_repeat: bool = False,
                pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Beam search: keep the K best hypotheses per item, return the best finished one.

    Every step, each of the K hypotheses of an item is extended by every token; the K best of
    the K·V extensions, ranked by

        score = Σ log p / len^α,    len = generated tokens (end included, prefix excluded),

    form the next beam (α = `length_penalty`; α = 0 is the plain sum, [VirTex code]; α > 0
    favours longer captions). A hypothesis that emits `end_id` stays in the beam, frozen: its
    only extension is `pad_id` at log-prob 0, so it keeps its score and competes with the
    unfinished ones (as in the AllenNLP search VirTex uses; with K = 1 this is `greedy`).
    Besides the beam, each item remembers its best finished hypothesis ever, so one pushed out
    of the beam by then-better unfinished ones is not lost.

    First step: the K beams start identical (the prefix); only beam 0 is live (the others start
    at -inf), so the first beam holds K *different* tokens instead of K copies of the best one.

    Stops when every hypothesis is finished, at max_len, or early for an item once its best
    finished score is at least what any unfinished hypothesis could still reach (log p <= 0:
    a sum only falls; its length can grow to max_len - T0, so the bound is Σ / (max_len-T0)^α).
    The early stop never changes the result; it relies on step_fn returning log-probs (<= 0).

    Args:
        step_fn: (tokens (R, t), rows (R,)) -> (R, V) next-token log-probs; R <= B·K and
            rows[r] is the item of hypothesis r.
        prefix: (B, T0) LongTensor.  max_len: total length limit, prefix included.
        end_id: the token that finishes a hypothesis.
        beam_size: K >= 1.
        length_penalty: α >= 0 in Σ log p / len^α.
        block_repeat: forbid a token equal to the one just before it (log p set to -inf, not
            renormalised) [VirTex code]. AMBIGUITY: VirTex's code starts blocking at the second
            generated token, with log p = -10000 rather than -inf; we also block the last
            prefix token at the first step (which only forbids re-emitting the start token).
            DEVIATION: VirTex's code lets each hypothesis propose only its 2 best tokens
            (`per_node_beam_size`); we rank all K·V extensions, the textbook search.
        pad_id: written after a hypothesis's end token.
    Returns:
        tokens: (B, T) LongTensor, prefix + the best finished hypothesis + pad_id padding (the
            best unfinished one, max_len long, for an item where none finished); T <= max_len
            is the longest row.
        score: (B,) its Σ log p / len^α.
    """
    _check_prefix(prefix, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if length_penalty < 0.0:
        raise ValueError(f"length_penalty α must be >= 0, got {length_penalty}")
    alpha, K = float(length_penalty), beam_size
    B, T0 = prefix.shape
    device = prefix.device
    max_new = max(max_len - T0, 1)  # the most tokens a hypothesis can generate

    # The beam: K hypotheses per item, flattened to B·K rows when calling step_fn.
    tokens = prefix.repeat_interleave(K, dim=0).view(B, K, T0)  # (B, K, t)
    rows = torch.arange(B, device=device).repeat_interleave(K)  # (B·K,), item of each flat row
    sums = torch.full((B, K), NEG_INF, device=device)  # (B, K), Σ log p of each hypothesis
    sums[:, 0] = 0.0  # only beam 0 is live at the first step (the K beams are identical)
    lengths = torch.zeros(B, K, dtype=torch.long, device=device)  # (B, K), generated tokens
    finished = torch.zeros(B, K, dtype=torch.bool, device=device)  # (B, K), frozen hypotheses

    # The best finished hypothesis of each item so far.
    best_score = torch.full((B,), NEG_INF, device=device)  # (B,)
    best_tokens = torch.full((B, max_len), pad_id, dtype=torch.long, device=device)  # (B, max_len)
    best_tokens[:, :T0] = prefix
    best_length = torch.full((B,), T0, dtype=torch.long, device=device)  # (B,) total length
    has_best = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
    items = torch.arange(B, device=device)  # (B,)

    for t in range(T0, max_len):
        # 1. Log-probs of the next token, asked only for live unfinished hypotheses.
        flat_tokens = tokens.reshape(B * K, t)  # (B·K, t)
        needs_model = (~finished & torch.isfinite(sums)).view(-1)  # (B·K,)
        if not needs_model.any():
            break
        ask = needs_model.nonzero().squeeze(1)  # (R,)
        out = _call(step_fn, flat_tokens[ask], rows[ask])  # (R, V)
        V = out.shape[1]
        sums, best_score = sums.to(out.dtype), best_score.to(out.dtype)
        logp = out.new_full((B * K, V), NEG_INF)  # (B·K, V), -inf for rows not asked
        logp[ask] = out
        if block_repeat:  # [VirTex code]: the token just emitted may not come again right away
            repeat = torch.arange(V, device=device)[None, :] == flat_tokens[:, -1:]  # (B·K, V)
            logp = logp.masked_fill(repeat, NEG_INF)
        # A frozen (finished) hypothesis has one extension, at log-prob 0: column 0 holds it
        # (any column would do; the token it appends is set to pad_id below).
        frozen = finished.view(-1)  # (B·K,)
        logp[frozen] = NEG_INF
        logp[frozen, 0] = 0.0

        # 2. Score all K·V extensions of every item and keep the K best.
        cand_sums = sums.view(B * K, 1) + logp  # (B·K, V), Σ log p after the extension
        cand_lengths = lengths.view(B * K, 1) + (~frozen).long()[:, None]  # (B·K, 1)
        cand_scores = _length_normalise(cand_sums, cand_lengths, alpha)  # (B·K, V)
        _, top = cand_scores.view(B, K * V).topk(K, dim=1)  # (B, K), index into K·V
        parent = top // V  # (B, K), the hypothesis each new one extends
        token = top % V  # (B, K), the token it appends
        sums = cand_sums.view(B, K * V).gather(1, top)  # (B, K)
        was_finished = finished.gather(1, parent)  # (B, K)
        token = token.masked_fill(was_finished, pad_id)  # (B, K), a frozen one appends pad_id
        lengths = lengths.gather(1, parent) + (~was_finished).long()  # (B, K)
        tokens = torch.cat([tokens.gather(1, parent[..., None].expand(B, K, t)),
                            token[..., None]], dim=2)  # (B, K, t + 1)
        just_ended = ~was_finished & (token == end_id) & torch.isfinite(sums)  # (B, K)
        finished = was_finished | (token == end_id)  # (B, K)

        # 3. Remember the best hypothesis that finished at this step, if it beats the record.
        scores = _length_normalise(sums, lengths, alpha)  # (B, K)
        ended_score, ended_k = scores.masked_fill(~just_ended, NEG_INF).max(dim=1)  # (B,), (B,)
        better = ended_score > best_score  # (B,)
        best_score = torch.where(better, ended_score, best_score)  # (B,)
        best_tokens[:, :t + 1] = torch.where(better[:, None], tokens[items, ended_k],
                                             best_tokens[:, :t + 1])  # (B, t + 1)
        best_length = torch.where(better, t + 1, best_length)  # (B,)
        has_best |= better

        # 4. Early stop per item: no unfinished hypothesis can beat the item's best finished one
        # (Σ log p only falls and the length is at most max_new). Its beams are frozen.
        live = ~finished & torch.isfinite(sums)  # (B, K)
        reachable = _length_normalise(sums, torch.full_like(lengths, max_new), alpha)  # (B, K)
        best_reachable = reachable.masked_fill(~live, NEG_INF).amax(dim=1)  # (B,)
        finished |= (has_best & (best_score >= best_reachable))[:, None]  # (B, K)

    # Result: the best finished hypothesis; for an item with none, its best unfinished beam.
    T = tokens.shape[2]
    beam_score, beam_k = _length_normalise(sums, lengths, alpha).max(dim=1)  # (B,), (B,)
    out_tokens = torch.where(has_best[:, None], best_tokens[:, :T], tokens[items, beam_k])  # (B, T)
    out_score = torch.where(has_best, best_score, beam_score)  # (B,)
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

    runs the last token of each row (at `position`, 0-based) against `past`, the cache of its
    parent row (None at the first call), and context_kv_rows, the image's cross-attention (or
    context) keys and values at these rows; it returns the cache with this position added.
    PrefixParents finds each row's parent; take_rows gathers only when the rows changed."""
    parents, cache = PrefixParents(), [None]

    def step_fn(tokens: Tensor, rows: Tensor) -> Tensor:
        index = parents(tokens, rows)  # (R,) the row of the last call each row extends
        past = None if index is None else take_rows(cache[0], index)
        logits, cache[0] = step(tokens[:, -1], tokens.shape[1] - 1, past,
                                take_rows(context_kv, rows), rows)
        return logits.float().log_softmax(dim=-1)  # (R, V)
    return step_fn
