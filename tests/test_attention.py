"""Attention, masks and transformer blocks (shared/masks.py, attention.py, transformer.py).

Kinds: (b) equivalence of the math and SDPA paths, and of the module against a loop written
straight from the equation; (c) masks, causality and the empty-row rule.
"""

import math

import pytest
import torch

from shared.attention import MultiHeadAttention, attention_math, attention_sdpa, set_fast_attention
from shared.masks import block_mask, causal_mask, expand_mask, lengths_mask, padding_mask
from shared.transformer import (BertEmbeddings, BertPooler, PostLNDecoderBlock,
                                PostLNEncoderBlock, PreLNDecoderBlock, PreLNEncoderBlock)


def random_mask(B, Tq, Tk, gen, p=0.6, empty_rows=True):
    allowed = torch.rand(B, 1, Tq, Tk, generator=gen) < p  # (B, 1, Tq, Tk)
    if empty_rows:
        allowed[0, 0, 1] = False  # one query row may attend to nothing
    return allowed


# --- masks ------------------------------------------------------------------------------------

def test_causal_mask_is_lower_triangular():
    m = causal_mask(4)
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == (j <= i)


def test_padding_and_lengths_masks_agree():
    tokens = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 0, 0, 0]])
    from_tokens = padding_mask(tokens)
    from_lengths = lengths_mask(torch.tensor([3, 1]), 5)
    assert from_tokens.shape == (2, 1, 5)
    assert torch.equal(from_tokens, from_lengths)
    assert from_tokens[0, 0].tolist() == [True, True, True, False, False]


def test_block_mask_follows_the_rule_table_and_hides_pads():
    # segments: 0 = text, 1 = regions, -1 = pad; text sees everything, regions only regions
    segments = torch.tensor([[0, 0, 1, 1, -1]])
    rules = torch.tensor([[True, True], [False, True]])
    m = block_mask(segments, rules)[0]  # (S, S)
    for i in range(5):
        for j in range(5):
            si, sj = segments[0, i].item(), segments[0, j].item()
            want = si >= 0 and sj >= 0 and bool(rules[si, sj])
            assert m[i, j].item() == want, (i, j)


def test_expand_mask_rejects_bad_shapes_and_dtypes_clearly():
    with pytest.raises(ValueError, match="does not broadcast"):
        expand_mask(torch.ones(2, 3, 5, dtype=torch.bool), B=2, Tq=3, Tk=4)
    with pytest.raises(ValueError, match="boolean"):
        expand_mask(torch.ones(2, 3, 4), B=2, Tq=3, Tk=4)


# --- the two attention paths -----------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("masked", [False, True])
def test_math_and_sdpa_paths_are_equal(dtype, tol, masked):
    gen = torch.Generator().manual_seed(0)
    B, H, Tq, Tk, Dh = 3, 4, 7, 9, 16
    q, k, v = (torch.randn(B, H, T, Dh, generator=gen, dtype=dtype) for T in (Tq, Tk, Tk))
    allowed = random_mask(B, Tq, Tk, gen) if masked else None
    assert torch.allclose(attention_math(q, k, v, allowed), attention_sdpa(q, k, v, allowed),
                          atol=tol, rtol=tol)


def test_math_path_equals_a_loop_over_the_equation():
    """softmax(q·k_j / √Dh over allowed j) weighted sum of v_j, one query at a time."""
    gen = torch.Generator().manual_seed(1)
    B, H, Tq, Tk, Dh = 2, 2, 4, 5, 8
    q, k, v = (torch.randn(B, H, T, Dh, generator=gen, dtype=torch.float64) for T in (Tq, Tk, Tk))
    allowed = random_mask(B, Tq, Tk, gen)
    out = attention_math(q, k, v, allowed)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = [j for j in range(Tk) if allowed[b, 0, i, j]]
                want = torch.zeros(Dh, dtype=torch.float64)
                if keys:
                    s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(Dh) for j in keys])
                    w = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
                    want = sum(w[n] * v[b, h, j] for n, j in enumerate(keys))
                assert torch.allclose(out[b, h, i], want, atol=1e-12)


@pytest.mark.parametrize("fast", [False, True])
def test_a_row_that_may_attend_to_nothing_gives_zeros_and_finite_grads(fast):
    gen = torch.Generator().manual_seed(2)
    mha = MultiHeadAttention(16, 4, fast=fast)
    x = torch.randn(2, 3, 16, generator=gen, requires_grad=True)
    allowed = torch.ones(2, 3, 3, dtype=torch.bool)
    allowed[1] = False  # every query of example 1 is fully padded
    out = mha(x, allowed=allowed)
    assert torch.isfinite(out).all()
    # the attention output is zero, so the module returns exactly W^O's bias there
    assert torch.allclose(out[1], mha.out_proj.bias.expand(3, 16))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("causal", [False, True])
def test_module_fast_and_math_paths_agree_self_and_cross(causal):
    torch.manual_seed(3)
    mha = MultiHeadAttention(32, 4, context_dim=24).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 24)
    tokens = torch.tensor([[1, 2, 3, 0, 0, 0], [1, 2, 3, 4, 5, 6]])
    self_mha = MultiHeadAttention(32, 4).eval()
    for module, context, allowed in [
        (self_mha, None, padding_mask(tokens)),  # self-attention, padded keys
        (self_mha, None, None),  # self-attention, no mask (pure causal path of SDPA)
        (mha, ctx, lengths_mask(torch.tensor([2, 5]), 5)),  # cross-attention
    ]:
        is_causal = causal and context is None
        fast = module(x, context, allowed, causal=is_causal)
        set_fast_attention(module, False)
        slow = module(x, context, allowed, causal=is_causal)
        set_fast_attention(module, True)
        assert torch.allclose(fast, slow, atol=1e-5)


def test_causal_attention_ignores_the_future():
    torch.manual_seed(4)
    mha = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 5, 16)
    y = x.clone()
    y[:, 3:] = torch.randn(1, 2, 16)  # change tokens 3 and 4
    a, b = mha(x, causal=True), mha(y, causal=True)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_width_not_divisible_by_heads_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadAttention(30, 4)


# --- blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block_cls", [PostLNEncoderBlock, PreLNEncoderBlock])
def test_encoder_blocks_keep_shape_and_respect_padding(block_cls):
    torch.manual_seed(5)
    block = block_cls(32, 4, 64, dropout=0.0).eval()
    x = torch.randn(2, 5, 32)
    keys = lengths_mask(torch.tensor([3, 5]), 5)
    out = block(x, allowed=keys)
    assert out.shape == (2, 5, 32)
    x2 = x.clone()
    x2[0, 3:] = torch.randn(2, 32)  # change the padded positions of example 0
    out2 = block(x2, allowed=keys)
    assert torch.allclose(out[0, :3], out2[0, :3], atol=1e-6)  # real tokens never see pads


@pytest.mark.parametrize("block_cls", [PostLNDecoderBlock, PreLNDecoderBlock])
def test_decoder_blocks_are_causal_and_read_the_context(block_cls):
    torch.manual_seed(6)
    block = block_cls(32, 4, 64, dropout=0.0, context_dim=16).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 7, 16)
    out = block(x, ctx)
    assert out.shape == (2, 6, 32)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 2, 32)
    assert torch.allclose(out[:, :4], block(x2, ctx)[:, :4], atol=1e-6)  # future is hidden
    assert not torch.allclose(out, block(x, torch.randn(2, 7, 16)))  # the image matters


def test_post_ln_block_matches_the_bert_equations():
    """x1 = LN(x + Attn(x)); out = LN(x1 + W2 GELU(W1 x1)), written out here by hand."""
    torch.manual_seed(7)
    block = PostLNEncoderBlock(16, 2, 32, dropout=0.0).eval()
    x = torch.randn(2, 4, 16)
    x1 = block.attn_norm(x + block.attn(x))
    h = torch.nn.functional.gelu(x1 @ block.mlp.fc1.weight.T + block.mlp.fc1.bias)
    want = block.mlp_norm(x1 + h @ block.mlp.fc2.weight.T + block.mlp.fc2.bias)
    assert torch.allclose(block(x), want, atol=1e-6)


def test_bert_embeddings_sum_word_position_and_type():
    torch.manual_seed(8)
    emb = BertEmbeddings(50, 16, max_positions=8, dropout=0.0).eval()
    tokens = torch.tensor([[2, 7, 9, 3]])
    types = torch.tensor([[0, 0, 1, 1]])
    want = emb.norm(emb.word.weight[tokens] + emb.position.weight[:4] + emb.token_type.weight[types])
    assert torch.allclose(emb(tokens, types), want, atol=1e-6)
    with pytest.raises(ValueError, match="longer than"):
        emb(torch.ones(1, 9, dtype=torch.long))
    pooled = BertPooler(16)(torch.randn(3, 4, 16))
    assert pooled.shape == (3, 16) and pooled.abs().max() <= 1


def test_the_post_ln_decoder_drops_out_its_mlp_hidden_activations_and_bert_does_not():
    """torch's nn.TransformerDecoderLayer (VirTex's official decoder) applies dropout between
    the GELU and the second linear; BERT's layer does not. With that dropout at p = 1, the MLP's
    output in train mode is the second linear's bias alone."""
    from shared.transformer import MLP, PostLNEncoderBlock

    decoder = PostLNDecoderBlock(8, 2, 16, dropout=0.1)
    assert decoder.mlp.hidden_dropout.p == 0.1
    assert PostLNEncoderBlock(8, 2, 16, dropout=0.1).mlp.hidden_dropout.p == 0.0
    mlp = MLP(8, 16, dropout=0.0, hidden_dropout=1.0).train()
    out = mlp(torch.randn(2, 3, 8))
    assert torch.allclose(out, mlp.fc2.bias.expand(2, 3, 8))
    assert not torch.allclose(mlp.eval()(torch.randn(2, 3, 8)), mlp.fc2.bias.expand(2, 3, 8))
