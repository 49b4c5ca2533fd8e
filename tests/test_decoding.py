"""Decoding (shared/decoding.py): greedy, beam search, nucleus sampling over a step_fn.

Kinds: (a) hand-made distributions whose answer is worked out by exhaustive enumeration in the
test; (b) equivalences: greedy = beam search with K = 1 = nucleus with top_p → 0, beam search =
exhaustive search, batched = one item at a time; (c) the conventions (length, padding, scores,
`rows`), and the sampler's empirical distribution.
"""

import itertools
import math

import pytest
import torch

from shared.decoding import beam_search, greedy, nucleus_sample, top_p_filter

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
                                     temperature=temperature, generator=gen)
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
