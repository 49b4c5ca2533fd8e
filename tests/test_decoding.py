"""Decoding (shared/decoding.py): greedy, beam search, nucleus sampling over a step_fn.

Kinds: (a) hand-made distributions whose answer is worked out by exhaustive enumeration in the
test (one where finished hypotheses would crowd a beam that kept them); (b) equivalences: greedy =
beam search with K = 1 = nucleus with top_p → 0, beam search = exhaustive search = a loop
reference of the K-live search, batched = one item at a time, a cached step function = the
uncached one from a prefix of several tokens; (c) the conventions (length, padding, scores,
`rows`, [PAD] never generated, repeat blocking), and the sampler's empirical distribution.
"""

import itertools
import math

import pytest
import torch

from shared.decoding import beam_search, cached_step_fn, greedy, nucleus_sample, top_p_filter

END = 0  # end token of every toy vocabulary here


# --- toy step functions ---------------------------------------------------------------------------

def table_step_fn(V: int, B: int, max_len: int, seed: int, end_bias: float = 0.0):
    """A random model: log-softmax of a fixed table indexed by (last token, position), plus a
    per-item offset picked by `rows` (so items differ and `rows` must be right)."""
    gen = torch.Generator().manual_seed(seed)
    table = 2.0 * torch.randn(V, max_len + 1, V, generator=gen)  # (V, positions, V)
    table[..., END] += end_bias
    offsets = torch.randn(B, V, generator=gen)  # (B, V)

    def step_fn(tokens, rows):
        logits = table[tokens[:, -1], tokens.shape[1]] + offsets[rows]  # (R, V)
        return logits.log_softmax(dim=-1)
    return step_fn


def dict_step_fn(distributions: dict, default: list[float]):
    """A hand-written model: generated-tokens-so-far (a tuple, prefix excluded) -> next-token
    probabilities. Zero probabilities become log p = -inf."""
    def step_fn(tokens, rows):
        out = [distributions.get(tuple(row[1:]), default) for row in tokens.tolist()]
        return torch.tensor(out, dtype=torch.float64).log()  # (R, V)
    return step_fn


def exhaustive(step_fn, prefix: list[int], n_new: int, V: int, alpha: float = 0.0, item: int = 0):
    """The best sequence by brute force: every token sequence of 1..n_new tokens that ends with
    END (or is n_new long without it), scored Σ log p / len^α; the best finished one, else the
    best unfinished one. Returns (generated tokens, score)."""
    best = {True: (None, -math.inf), False: (None, -math.inf)}  # finished? -> (tokens, score)
    for length in range(1, n_new + 1):
        for seq in itertools.product(range(V), repeat=length):
            if END in seq[:-1]:
                continue  # nothing comes after the end token
            total = 0.0
            for i, token in enumerate(seq):
                context = torch.tensor([prefix + list(seq[:i])])
                total += float(step_fn(context, torch.tensor([item]))[0, token])
            is_finished = seq[-1] == END
            if not is_finished and length < n_new:
                continue  # an unfinished sequence only counts at max_len
            score = total / length ** alpha
            if score > best[is_finished][1]:
                best[is_finished] = (list(seq), score)
    return best[True] if best[True][0] is not None else best[False]


def k_live_reference(step_fn, prefix: list[int], max_len: int, K: int, alpha: float = 0.0,
                     block_repeat: bool = False, pad_id: int = END, item: int = 0):
    """The K-live-beams search as a plain loop over Python lists, one item: every step extends
    the K live hypotheses by every allowed token; the K best extensions not ending with END (by
    Σ log p) stay live, and those ending with END whose Σ is at least the K-th live one's go to
    the finished list; stop once no live one can beat the best finished one (its Σ can only
    fall, its length reach max_len - T0), or at max_len. Returns (generated tokens, score) of
    the best finished one, else the best live."""
    max_new = max_len - len(prefix)
    live, best = [(0.0, [])], None  # (Σ log p, tokens); best: (score, tokens)
    for n in range(1, max_new + 1):
        candidates = []
        for total, seq in live:
            logp = step_fn(torch.tensor([prefix + seq]), torch.tensor([item]))[0].tolist()
            for v, lp in enumerate(logp):
                if (block_repeat and v == (prefix + seq)[-1]) or v == pad_id != END:
                    continue
                candidates.append((total + lp, seq + [v]))
        live = sorted((c for c in candidates if c[1][-1] != END and c[0] > -math.inf),
                      key=lambda c: c[0], reverse=True)[:K]
        kth = live[-1][0] if len(live) == K else -math.inf
        for total, seq in candidates:
            if (seq[-1] == END and total > -math.inf and total >= kth
                    and (best is None or total / n ** alpha > best[0])):
                best = (total / n ** alpha, seq)
        if not live or (best is not None and best[0] >= live[0][0] / max_new ** alpha):
            break
    if best is not None:
        return best[1], best[0]
    return live[0][1], live[0][0] / max_new ** alpha


def generated(row: torch.Tensor, T0: int) -> list[int]:
    """The generated part of an output row: after the prefix, up to and including END."""
    out = []
    for token in row[T0:].tolist():
        out.append(token)
        if token == END:
            break
    return out


# --- (b) equivalences -----------------------------------------------------------------------------

# (seed, end_bias): with -1 some rows end early and some run to max_len; with +1 every row ends
# after a few tokens, so decoding stops before max_len.
MIXES = [(0, -1.0), (1, -1.0), (2, -1.0), (3, -1.0), (0, 1.0), (1, 1.0)]


@pytest.mark.parametrize("seed,end_bias", MIXES)
def test_greedy_equals_beam_search_with_beam_size_one(seed, end_bias):
    B, V, max_len = 6, 7, 9
    step_fn = table_step_fn(V, B, max_len, seed, end_bias)
    prefix = torch.full((B, 1), 3)
    g_tokens, g_logprob = greedy(step_fn, prefix, max_len, END)
    b_tokens, b_score = beam_search(step_fn, prefix, max_len, END, beam_size=1)
    assert torch.equal(g_tokens, b_tokens)
    assert torch.allclose(g_logprob, b_score, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_beam_search_equals_exhaustive_search_on_small_problems(seed, alpha):
    # V = 4 tokens, at most 3 new ones: fewer than 4 + 16 + 64 sequences. A beam of 64 holds every
    # extension at every step, so beam search must find the exact optimum.
    B, V, n_new = 3, 4, 3
    step_fn = table_step_fn(V, B, 1 + n_new, seed)
    prefix = torch.tensor([[1], [2], [3]])  # (B, 1)
    tokens, score = beam_search(step_fn, prefix, 1 + n_new, END, beam_size=64,
                                length_penalty=alpha)
    for b in range(B):
        best_seq, best_score = exhaustive(step_fn, prefix[b].tolist(), n_new, V, alpha, item=b)
        assert generated(tokens[b], 1) == best_seq, b
        assert score[b].item() == pytest.approx(best_score, abs=1e-5)
        assert (tokens[b, 1 + len(best_seq):] == 0).all()  # padding after the end token


@pytest.mark.parametrize("K,alpha,block_repeat,pad_id", [
    (2, 0.0, False, END), (3, 0.7, False, END), (2, 0.7, True, END), (3, 0.0, True, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_beam_search_equals_a_loop_reference_of_the_k_live_search(seed, K, alpha, block_repeat,
                                                                   pad_id):
    # Small beams, where the search is approximate: the batched search must make exactly the
    # choices of the plain loop (some items end early, some run to max_len).
    B, V, max_len = 4, 6, 8
    step_fn = table_step_fn(V, B, max_len, seed, end_bias=-0.5)
    prefix = torch.tensor([[1], [2], [3], [4]])
    tokens, score = beam_search(step_fn, prefix, max_len, END, beam_size=K, length_penalty=alpha,
                                block_repeat=block_repeat, pad_id=pad_id)
    for b in range(B):
        seq, expected = k_live_reference(step_fn, prefix[b].tolist(), max_len, K, alpha,
                                         block_repeat, pad_id, item=b)
        assert generated(tokens[b], 1) == seq, b
        assert score[b].item() == pytest.approx(expected, abs=1e-5)


def test_beam_search_with_beam_size_one_is_greedy_with_the_same_options():
    B, V, max_len = 5, 6, 9
    step_fn = table_step_fn(V, B, max_len, seed=7, end_bias=-1.0)
    prefix = torch.arange(B)[:, None] + 1
    g_tokens, g_logprob = greedy(step_fn, prefix, max_len, END, block_repeat=True)
    b_tokens, b_score = beam_search(step_fn, prefix, max_len, END, beam_size=1,
                                    length_penalty=0.5, block_repeat=True)
    assert torch.equal(g_tokens, b_tokens)
    lengths = torch.tensor([len(generated(row, 1)) for row in g_tokens])
    assert torch.allclose(b_score, g_logprob / lengths ** 0.5, atol=1e-5)


def toy_cached_decoder(V: int, B: int, seed: int):
    """A decoder whose next-token logits sum a table over every (token, position) of the row
    plus a per-item offset: (its one-position `step` with a cache of the row's tokens, the
    same as an uncached step_fn, the per-item context)."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(V, 16, V, generator=gen)  # (token, position, V)
    offsets = torch.randn(B, V, generator=gen)  # (B, V)

    def step(token, position, past, context, rows):
        k = token[:, None, None, None].float()  # (R, 1, 1, 1): the cache keeps the tokens
        v = torch.full_like(k, float(position))  # and their positions
        if past is not None:
            k, v = torch.cat([past[0][0], k], dim=2), torch.cat([past[0][1], v], dim=2)
        history, positions = k[:, 0, :, 0].long(), v[:, 0, :, 0].long()  # (R, position + 1)
        logits = table[history, positions].sum(dim=1) + context[0][0]  # (R, V)
        return logits, [(k, v)]

    def uncached(tokens, rows):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return (table[tokens, positions].sum(dim=1) + offsets[rows]).log_softmax(dim=-1)
    return step, uncached, [(offsets, offsets)]


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_a_cached_step_function_reads_the_whole_prefix(method):
    # Prefixes of 3 tokens: the cache must hold all of them before the first prediction.
    B, V, max_len = 4, 7, 9
    step, uncached, context = toy_cached_decoder(V, B, seed=3)
    prefix = torch.tensor([[1, 2, 3], [4, 5, 6], [2, 2, 1], [6, 1, 4]])  # (B, T0 = 3)
    results = []
    for step_fn in (cached_step_fn(step, context), uncached):
        if method == "greedy":
            results.append(greedy(step_fn, prefix, max_len, END))
        else:
            results.append(beam_search(step_fn, prefix, max_len, END, beam_size=3,
                                       length_penalty=0.5))
    (tokens_a, score_a), (tokens_b, score_b) = results
    assert torch.equal(tokens_a, tokens_b) and tokens_a.shape[1] > 4
    assert torch.allclose(score_a, score_b, atol=1e-5)


@pytest.mark.parametrize("method", ["greedy", "beam", "beam_blocked", "nucleus"])
def test_rows_map_hypotheses_to_their_items_and_batching_changes_nothing(method):
    """`rows` must map every expanded, reordered or filtered hypothesis back to its item: the
    step_fn checks it against the item id written in the prefix, and decoding the batch must
    equal decoding each item alone (a batch of one, where the item is row 0)."""
    B, V, max_len = 5, 9, 8
    inner = table_step_fn(V, B, max_len, seed=12, end_bias=0.0)  # some end, some do not
    shift = {"value": 0}  # item offset when an item is decoded alone

    def step_fn(tokens, rows):
        rows = rows + shift["value"]
        assert torch.equal(tokens[:, 0], rows + 4), "rows do not match the hypotheses' items"
        return inner(tokens, rows)

    def decode(prefix):
        if method == "greedy":
            return greedy(step_fn, prefix, max_len, END)
        if method == "nucleus":  # top_p -> 0 is deterministic, so batch and single agree
            return nucleus_sample(step_fn, prefix, max_len, END, top_p=1e-9)
        return beam_search(step_fn, prefix, max_len, END, beam_size=3,
                           block_repeat=method == "beam_blocked", length_penalty=0.5)

    prefix = torch.arange(B)[:, None] + 4  # (B, 1): item b starts with token b + 4
    tokens, score = decode(prefix)
    for b in range(B):
        shift["value"] = b  # alone, item b is batch item 0 of a batch of one
        single_tokens, single_score = decode(prefix[b:b + 1])
        shift["value"] = 0
        n = single_tokens.shape[1]
        assert torch.equal(tokens[b, :n], single_tokens[0]), b
        assert (tokens[b, n:] == 0).all()
        assert score[b].item() == pytest.approx(single_score[0].item(), abs=1e-5)


@pytest.mark.parametrize("seed,end_bias", MIXES)
def test_nucleus_with_tiny_top_p_equals_greedy(seed, end_bias):
    B, V, max_len = 6, 7, 9
    step_fn = table_step_fn(V, B, max_len, seed, end_bias)
    prefix = torch.full((B, 1), 3)
    g_tokens, g_logprob = greedy(step_fn, prefix, max_len, END)
    gen = torch.Generator().manual_seed(seed)
    n_tokens, n_logprob = nucleus_sample(step_fn, prefix, max_len, END, top_p=1e-9, generator=gen)
    assert torch.equal(g_tokens, n_tokens)
    assert torch.allclose(g_logprob, n_logprob)


# --- (a) hand-made distributions ------------------------------------------------------------------

def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
    # Tokens: 0 = END, 1 = "a", 2 = "b", 3 = start. Next-token probabilities [END, a, b, start]:
    #   after ()      END .1  a .5   b .4        greedy takes "a" (.5)...
    #   after (a,)    END .4  a .3   b .3        ...then END: p(a END) = .5 · .4 = .20
    #   after (b,)    END .9  a .05  b .05       but p(b END) = .4 · .9 = .36 is better
    #   otherwise     END .6  a .2   b .2
    step_fn = dict_step_fn({(): [.1, .5, .4, 0], (1,): [.4, .3, .3, 0], (2,): [.9, .05, .05, 0]},
                           default=[.6, .2, .2, 0])
    prefix, max_len = torch.tensor([[3]]), 4
    best_seq, best_score = exhaustive(step_fn, [3], max_len - 1, V=4)
    assert best_seq == [2, END]  # the enumeration agrees with the comment above

    g_tokens, _ = greedy(step_fn, prefix, max_len, END)
    assert generated(g_tokens[0], 1) == [1, END] != best_seq
    b_tokens, b_score = beam_search(step_fn, prefix, max_len, END, beam_size=2)
    assert generated(b_tokens[0], 1) == best_seq
    assert b_score.item() == pytest.approx(math.log(.36))


def test_finished_hypotheses_leave_the_beam_so_k_live_ones_remain():
    # Tokens: 0 = END, 1 = a, 2 = b, 3 = c; the start token 4 is outside the vocabulary. α = 1.
    #   after ()                END e^-0.5 = .607   a .233   b e^-1.83 = .160
    #   after (a,)              END .1   c .9       then everything is unlikely (the default row)
    #   after (b,) .. (b c a c a)   c, a, c, a, END, each with probability 1
    # [END] scores -0.5. [b c a c a END] scores Σ log p / len = -1.83 / 6 = -0.305, the optimum.
    # With K = 2, a beam that keeps finished hypotheses holds [END] and [a] after one step and
    # never sees b; moving [END] out of the beam keeps [a] and [b] live.
    p_end, p_b = math.exp(-0.5), math.exp(-1.83)
    step_fn = dict_step_fn({(): [p_end, 1 - p_end - p_b, p_b, 0], (1,): [.1, 0, 0, .9],
                            (2,): [0, 0, 0, 1], (2, 3): [0, 1, 0, 0], (2, 3, 1): [0, 0, 0, 1],
                            (2, 3, 1, 3): [0, 1, 0, 0], (2, 3, 1, 3, 1): [1, 0, 0, 0]},
                           default=[.1, .4, .3, .2])
    rows_asked = []

    def counting(tokens, rows):
        rows_asked.append(len(rows))
        return step_fn(tokens, rows)

    prefix, max_len = torch.tensor([[4]]), 7
    best_seq, best_score = exhaustive(step_fn, [4], max_len - 1, V=4, alpha=1.0)
    assert best_seq == [2, 3, 1, 3, 1, END] and best_score == pytest.approx(-0.305)
    tokens, score = beam_search(counting, prefix, max_len, END, beam_size=2, length_penalty=1.0)
    assert generated(tokens[0], 1) == best_seq
    assert score.item() == pytest.approx(-0.305)
    assert rows_asked[1:] == [2] * (len(rows_asked) - 1)  # two live hypotheses every step


def test_length_penalty_changes_the_choice():
    # [END, a, b, start]:  after () END .5 a .5;  after (a,) END .2 b .8;  after (a, b) END .8.
    #   [END]        p = .5                 Σ log p = -0.693, len 1
    #   [a, b, END]  p = .5 · .8 · .8 = .32 Σ log p = -1.139, len 3
    # α = 0 prefers [END] (-0.693 > -1.139); α = 1 prefers [a, b, END] (-1.139/3 = -0.380).
    step_fn = dict_step_fn({(): [.5, .5, 0, 0], (1,): [.2, 0, .8, 0], (1, 2): [.8, .1, .1, 0]},
                           default=[1, 0, 0, 0])
    prefix, max_len = torch.tensor([[3]]), 5
    for alpha, expected in [(0.0, [END]), (1.0, [1, 2, END])]:
        assert exhaustive(step_fn, [3], max_len - 1, V=4, alpha=alpha)[0] == expected
        tokens, score = beam_search(step_fn, prefix, max_len, END, beam_size=2,
                                    length_penalty=alpha)
        assert generated(tokens[0], 1) == expected, alpha
        assert score.item() == pytest.approx(math.log(.5) if alpha == 0 else math.log(.32) / 3)


def test_block_repeat_never_emits_the_same_token_twice_in_a_row():
    B, V, max_len = 4, 6, 10
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(B, V, generator=gen)  # (B, V)

    def step_fn(tokens, rows):  # a model that loves to repeat its last token
        logits = noise[rows] + 5.0 * torch.nn.functional.one_hot(tokens[:, -1], V)  # (R, V)
        logits[:, END] -= 3.0
        return logits.log_softmax(dim=-1)

    prefix = torch.tensor([[1], [2], [3], [4]])
    free, _ = beam_search(step_fn, prefix, max_len, END, beam_size=3)
    assert (free[:, 1:] == free[:, :-1]).any()  # without blocking it does repeat
    blocked, _ = beam_search(step_fn, prefix, max_len, END, beam_size=3, block_repeat=True)
    for b in range(B):
        row = [1 + b] + generated(blocked[b], 1)
        assert all(x != y for x, y in zip(row, row[1:])), row


# --- (c) conventions ------------------------------------------------------------------------------

def test_length_padding_and_logprob_conventions():
    # Item 0 ends at once (END is certain); item 1 can never end. pad_id = 9 to see the padding.
    def step_fn(tokens, rows):
        probs = torch.tensor([[1.0, 0, 0, 0], [0, .5, .3, .2]])[rows]  # (R, V)
        return probs.log()

    prefix = torch.tensor([[3, 3], [3, 3]])  # T0 = 2
    for tokens, score in [greedy(step_fn, prefix, 6, END, pad_id=9),
                          beam_search(step_fn, prefix, 6, END, beam_size=2, pad_id=9)]:
        assert tokens.shape == (2, 6)  # max_len counts the prefix: 4 new tokens at most
        assert tokens[0].tolist() == [3, 3, END, 9, 9, 9]  # end kept, then pad_id
        assert tokens[1].tolist() == [3, 3, 1, 1, 1, 1]  # never ends: runs to max_len
        assert score[0].item() == pytest.approx(0.0)  # log 1, then nothing more accumulates
        assert score[1].item() == pytest.approx(4 * math.log(.5))
    # Stops early when every row is finished; max_len == T0 generates nothing.
    tokens, _ = greedy(lambda t, r: torch.tensor([[0.0, -1, -1, -1]]).expand(len(r), 4),
                       prefix, 6, END)
    assert tokens.shape == (2, 3)
    assert torch.equal(greedy(step_fn, prefix, 2, END)[0], prefix)
    with pytest.raises(ValueError, match="prefix included"):
        greedy(step_fn, prefix, 1, END)


def test_pad_is_never_generated():
    # [PAD] (5 here) is the model's favourite token; it may only follow the end token.
    V, PAD = 6, 5

    def step_fn(tokens, rows):
        return torch.tensor([0.0, 1, 1.5, 1, 1, 4]).expand(len(rows), V).log_softmax(dim=-1)

    prefix = torch.full((3, 1), 1)
    gen = torch.Generator().manual_seed(0)
    for tokens, _ in [greedy(step_fn, prefix, 6, END, pad_id=PAD),
                      beam_search(step_fn, prefix, 6, END, beam_size=3, pad_id=PAD),
                      nucleus_sample(step_fn, prefix, 6, END, top_p=0.99, generator=gen,
                                     pad_id=PAD)]:
        for row in tokens.tolist():
            body = generated(torch.tensor(row), 1)
            assert PAD not in body and row[1 + len(body):] == [PAD] * (len(row) - 1 - len(body))
    assert greedy(step_fn, prefix, 3, END, pad_id=PAD)[0][:, 1:].eq(2).all()  # next best: 2


def test_nucleus_block_repeat_takes_the_previous_token_out_of_the_nucleus():
    # [VirTex code]: the nucleus is formed, then the previous token (0, the prefix) removed.
    #   p = [.5, .3, .15, .05], top_p = .9: nucleus {0, 1, 2} -> {1, 2}, renormalised 2/3, 1/3.
    #   p = [.95, .03, .02, 0]: nucleus {0} -> empty; the nucleus of the rest instead: {1, 2}.
    N = 20000
    for p, expected in [([.5, .3, .15, .05], [0, 2 / 3, 1 / 3, 0]),
                        ([.95, .03, .02, 0], [0, .6, .4, 0])]:
        logp = torch.tensor(p).log()
        gen = torch.Generator().manual_seed(0)
        tokens, _ = nucleus_sample(lambda t, r: logp.expand(len(r), 4), torch.zeros(N, 1).long(),
                                   2, end_id=99, top_p=0.9, block_repeat=True, generator=gen,
                                   pad_id=99)
        freq = torch.bincount(tokens[:, 1], minlength=4).double() / N
        assert torch.allclose(freq, torch.tensor(expected, dtype=torch.double), atol=0.015), freq


def test_top_p_filter_keeps_the_smallest_nucleus():
    logp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    # mass of the likelier tokens: 0, .5, .8, .95 -> with top_p = .9 keep the first three
    assert torch.allclose(top_p_filter(logp, 0.9), torch.tensor([[.5, .3, .15, 0]]) / .95)
    assert torch.allclose(top_p_filter(logp, 1e-9), torch.tensor([[1.0, 0, 0, 0]]))
    assert torch.allclose(top_p_filter(logp, 1.0), logp.exp())


@pytest.mark.parametrize("top_p,temperature", [(0.9, 1.0), (0.8, 2.0)])
def test_nucleus_samples_follow_the_truncated_distribution(top_p, temperature):
    p = [0.5, 0.3, 0.15, 0.05]
    # The expected nucleus, from the definition: temper, sort, keep while the mass before < top_p.
    q = [x ** (1 / temperature) for x in p]
    q = [x / sum(q) for x in q]  # already sorted, most likely first
    keep = [sum(q[:i]) < top_p for i in range(len(q))]
    expected = [x * k for x, k in zip(q, keep)]
    expected = [x / sum(expected) for x in expected]

    N = 20000
    logp = torch.tensor(p).log()

    def step_fn(tokens, rows):
        return logp.expand(len(rows), 4)  # (R, V)

    gen = torch.Generator().manual_seed(0)
    tokens, logprob = nucleus_sample(step_fn, torch.full((N, 1), 3), 2, end_id=99, top_p=top_p,
                                     temperature=temperature, generator=gen, pad_id=99)
    freq = torch.bincount(tokens[:, 1], minlength=4).double() / N
    for v in range(4):
        if expected[v] == 0:
            assert freq[v] == 0  # outside the nucleus: never sampled
        else:
            assert abs(freq[v].item() - expected[v]) < 0.015, (v, freq[v].item(), expected[v])
    # the returned logprob is the model's (untempered) log p of the sample
    assert torch.allclose(logprob, logp[tokens[:, 1]])


def test_decoders_reject_bad_arguments():
    step_fn = table_step_fn(4, 1, 4, seed=0)
    prefix = torch.tensor([[1]])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(step_fn, prefix, 4, END, beam_size=0)
    with pytest.raises(ValueError, match="top_p"):
        nucleus_sample(step_fn, prefix, 4, END, top_p=0.0)
    with pytest.raises(ValueError, match="LongTensor"):
        greedy(step_fn, prefix.float(), 4, END)
    with pytest.raises(ValueError, match=r"\(R, V\)"):
        greedy(lambda t, r: torch.zeros(len(r) + 1, 4), prefix, 4, END)


# --- sampling with gradients (SCST) -------------------------------------------------------------

def test_sample_with_grad_draws_from_the_model_and_keeps_the_graph_of_its_log_probs():
    """A step_fn with fixed next-token log-probs (a parameter): the samples follow its
    distribution, [PAD] is never drawn, the returned Σ log p equals the log-probs of the drawn
    tokens (end included), and the gradient of their sum reaches the parameter."""
    from shared.decoding import sample_with_grad

    pad, end, V = 0, 3, 5
    logits = torch.tensor([0.0, 1.0, 0.5, 0.2, -1.0], requires_grad=True)

    def step_fn(tokens, rows):
        return logits.log_softmax(0).expand(len(rows), V)  # (R, V), the same at every step

    torch.manual_seed(0)
    prefix = torch.full((4000, 1), 1, dtype=torch.long)
    tokens, logprob, lengths = sample_with_grad(step_fn, prefix, 4, end, pad)
    first = tokens[:, 1]
    assert (first != pad).all()
    allowed = logits.detach().clone()
    allowed[pad] = -math.inf
    p = allowed.softmax(0)  # the distribution without [PAD]
    freq = torch.bincount(first, minlength=V).float() / len(first)
    assert torch.allclose(freq, p, atol=0.03)
    logp = logits.detach().log_softmax(0)
    for row in range(20):  # Σ log p of the generated tokens, up to and including the end
        generated = tokens[row, 1:1 + lengths[row]]
        assert logprob[row].item() == pytest.approx(logp[generated].sum().item(), rel=1e-5)
        assert (generated[:-1] != end).all() and (generated[-1] == end or lengths[row] == 3)
        assert (tokens[row, 1 + lengths[row]:] == pad).all()
    logprob.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
