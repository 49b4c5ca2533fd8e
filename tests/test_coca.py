"""coca.py: the objectives against Eq. 2-4, the masks and causality of the decoupled decoder, the
poolers' shapes, the config against Table 1, and a tiny model that learns.

Kinds (STYLE.md §14): (a) loss math by hand and by loops written from the equations; (c) shapes,
masks, causality; (d) learning. Every model here is a few thousand parameters: the file runs in
seconds on a laptop CPU.
"""

import dataclasses
import math

import pytest
import torch

import coca
from coca import (CoCa, Config, captioning_loss, coca_loss, contrastive_loss,
                  unimodal_attention_mask)

CLS, SEP = 2, 3  # shared.tokenizer's start and end ids; any non-zero ids would do here


def small_config(**overrides) -> Config:
    """A CoCa of a few thousand parameters (16 px images, 16 patches, widths 32)."""
    base = dict(image_size=16, patch_size=4, patch_stem="conv", vision_width=32, vision_layers=1,
                vision_heads=2, n_caption_queries=4, text_width=32, text_heads=2,
                unimodal_layers=1, multimodal_layers=1, vocab_size=40, max_text_len=12,
                embed_dim=16)
    return dataclasses.replace(Config.tiny(), **{**base, **overrides})


def make_batch(config: Config, B: int = 4, T: int = 8, seed: int = 0) -> dict:
    """Random images and right-padded captions [CLS] w w ... [SEP] [PAD]..., all different."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, config.image_size, config.image_size, generator=gen)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        length = T - (b % 3)  # some rows padded
        tokens[b, 0] = CLS
        tokens[b, 1:length - 1] = torch.randint(5, config.vocab_size, (length - 2,), generator=gen)
        tokens[b, length - 1] = SEP
    return {"images": images, "tokens": tokens}


def model_for(config: Config, seed: int = 0) -> CoCa:
    torch.manual_seed(seed)
    return coca.build_model(config).eval()


# --- (a) loss math -----------------------------------------------------------------------------

def contrastive_loss_loop(x, y, sigma):
    """Eq. 2 term by term: -(1/N)(Σ_i log softmax_j(x_i·y_j/σ)[i] + Σ_i log softmax_j(y_i·x_j/σ)[i])."""
    N = len(x)
    total = 0.0
    for i in range(N):
        total += math.log(math.exp(x[i] @ y[i] / sigma)
                          / sum(math.exp(x[i] @ y[j] / sigma) for j in range(N)))
        total += math.log(math.exp(y[i] @ x[i] / sigma)
                          / sum(math.exp(y[i] @ x[j] / sigma) for j in range(N)))
    return -total / N


def test_contrastive_loss_by_hand_on_orthonormal_pairs():
    """[CoCa Eq. 2] x_i = y_i = e_i, σ = 1: each of the 2·N terms is -log(e / (e + 1)), and 1/N
    leaves the two directions summed: L = 2 · -log(e / (e + 1))."""
    x = torch.eye(2)
    expected = 2 * -math.log(math.e / (math.e + 1))
    assert contrastive_loss(x, x.clone(), torch.tensor(0.0)).item() == pytest.approx(expected)


def test_contrastive_loss_is_zero_for_matched_pairs_and_2_log_B_for_random_ones():
    matched = torch.eye(8)  # orthonormal, x_i = y_i
    high = torch.tensor(math.log(100.0))  # 1/σ = 100
    assert contrastive_loss(matched, matched, high).item() < 1e-6
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 4096, generator=gen), torch.randn(8, 4096, generator=gen)
    # random unit vectors in 4096-d are nearly orthogonal: every softmax is ≈ uniform over B
    assert contrastive_loss(x, y, torch.tensor(0.0)).item() == pytest.approx(2 * math.log(8),
                                                                              abs=0.05)


def test_contrastive_loss_equals_the_loop_written_from_eq2():
    gen = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=torch.float64), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(5, 6, generator=gen, dtype=torch.float64), dim=-1)
    sigma = 0.3
    got = contrastive_loss(x, y, torch.tensor(math.log(1 / sigma), dtype=torch.float64))
    assert got.item() == pytest.approx(contrastive_loss_loop(x, y, sigma), rel=1e-10)
    # and it normalises its inputs itself (CoCa-pytorch #10): scaling x changes nothing
    assert torch.allclose(contrastive_loss(3 * x, y, torch.tensor(math.log(1 / sigma),
                                                                  dtype=torch.float64)), got)


def test_captioning_loss_shifts_inside_and_ignores_pads():
    """[CoCa Eq. 3] logits[:, t] predicts tokens[:, t+1]; the mean runs over non-pad targets."""
    gen = torch.Generator().manual_seed(2)
    tokens = torch.tensor([[CLS, 7, 8, SEP, 0, 0], [CLS, 9, SEP, 0, 0, 0]])  # (2, 6)
    logits = torch.randn(2, 6, 12, generator=gen)  # (B, T, V)
    by_hand = []
    for b in range(2):
        for t in range(5):
            if tokens[b, t + 1] != 0:
                by_hand.append(-logits[b, t].log_softmax(-1)[tokens[b, t + 1]])
    expected = torch.stack(by_hand).mean()  # 3 + 2 targets
    assert torch.allclose(captioning_loss(logits, tokens), expected)
    changed = logits.clone()
    changed[0, 3:] = 100 * torch.randn(3, 12, generator=gen)  # predictions of pad targets only
    changed[1, 2:] = 100 * torch.randn(4, 12, generator=gen)
    assert torch.allclose(captioning_loss(changed, tokens), expected)


def test_coca_loss_weights_the_two_terms():
    """[CoCa Eq. 4] with the paper's λ_Con = 1, λ_Cap = 2 [§4.1]."""
    config = Config.paper()
    got = coca_loss(torch.tensor(0.5), torch.tensor(3.0), config.lambda_con, config.lambda_cap)
    assert got.item() == pytest.approx(1.0 * 0.5 + 2.0 * 3.0)


# --- (c) config, shapes, masks, causality -------------------------------------------------------

def test_paper_config_matches_table1_and_section41():
    c = Config.paper()
    assert (c.image_size, c.patch_size) == (288, 18)  # §3.2 -> 256 image tokens
    assert (c.vision_layers, c.vision_width, c.vision_heads, int(c.mlp_ratio * c.vision_width)) \
        == (12, 768, 12, 3072)
    assert (c.unimodal_layers, c.multimodal_layers, c.text_width, c.text_heads) == (12, 12, 768, 12)
    assert (c.n_caption_queries, c.lambda_cap, c.lambda_con, c.init_temperature) == (256, 2.0, 1.0,
                                                                                   0.07)
    assert (c.batch_size, c.lr, c.max_steps, c.warmup_steps, c.lr_schedule) == \
        (65_536, 8e-4, 500_000, 10_000, "linear")


def test_paper_parameter_counts_match_table1():
    """Table 1, CoCa-Base: image encoder 86M, text decoder 297M. Built on the meta device (no
    memory). The text decoder reaches 297M only with an untied output projection."""
    with torch.device("meta"):
        model = CoCa(Config.paper())
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert count(model.image_encoder) == pytest.approx(86, abs=1)
    assert count(model.text_decoder) == pytest.approx(297, abs=1.5)


def test_presets_are_valid_and_every_field_is_a_cli_type():
    for preset in (Config.paper(), Config.small(), Config.tiny()):
        for field in dataclasses.fields(preset):
            assert type(getattr(preset, field.name)) in (int, float, str, bool), field.name


@pytest.mark.parametrize("overrides,message", [
    ({"text_width": 30, "text_heads": 4}, "text_width 30 is not divisible by text_heads 4"),
    ({"image_size": 30}, "image_size 30 is not divisible by patch_size 4"),
    ({"patch_stem": "conv", "patch_size": 6, "image_size": 18}, "power-of-two patch_size"),
    ({"pooler_layout": "serial"}, "pooler_layout"),
    ({"lambda_con": 0.0, "lambda_cap": 0.0}, "not both 0"),
])
def test_invalid_configs_raise_one_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def test_cls_row_sees_every_real_token_and_itself():
    """For [CLS_start, a, SEP, PAD, PAD] + contrastive [CLS]: its row is exactly (tokens != pad)
    + [True] (open_clip #554 shipped it shifted by one); the text rows are causal."""
    tokens = torch.tensor([[CLS, 7, SEP, 0, 0], [CLS, 7, 8, 9, SEP]])
    allowed = unimodal_attention_mask(tokens)  # (2, 6, 6)
    assert allowed[0, -1].tolist() == [True, True, True, False, False, True]
    assert allowed[1, -1].tolist() == [True] * 6
    for t in range(3):  # real text rows: exactly the causal past
        assert allowed[0, t].tolist() == [j <= t for j in range(6)]


def test_text_embedding_does_not_depend_on_how_far_the_batch_is_padded():
    """The [CLS] output must ignore pads: padding the same text further changes nothing."""
    config = small_config()
    model = model_for(config)
    short = torch.tensor([[CLS, 7, 8, SEP, 0]])
    longer = torch.tensor([[CLS, 7, 8, SEP, 0, 0, 0, 0]])
    assert torch.allclose(model.embed_texts(short), model.embed_texts(longer), atol=1e-6)


def test_pooler_shapes_parallel_and_cascade():
    """(B, 1, D) for the contrastive pooler, (B, 256, D) for the captioning pooler [§3.2]."""
    for layout in ("parallel", "cascade"):
        config = small_config(n_caption_queries=256, pooler_layout=layout)
        model = model_for(config)
        tokens = model.image_encoder(torch.randn(3, 3, 16, 16))  # (B, N, Dv)
        assert tokens.shape == (3, 16, 32)
        contrastive, caption = model.pool(tokens)
        assert contrastive.shape == (3, 1, 32) and caption.shape == (3, 256, 32)


def test_linear_patch_embedding_gives_the_same_tokens_count():
    model = model_for(small_config(patch_stem="linear"))
    assert model.image_encoder(torch.randn(2, 3, 16, 16)).shape == (2, 16, 32)


def test_changing_token_t_plus_1_leaves_positions_up_to_t_unchanged():
    """Causal independence: unimodal states and multimodal logits at positions <= t do not move
    when token t+1 changes; the [CLS] output (which sees the whole text) does."""
    config = small_config()
    model = model_for(config)
    batch = make_batch(config, B=2, T=8)
    images, tokens = batch["images"], batch["tokens"]
    _, queries = model.encode_image(images)
    for t in range(1, 6):
        changed = tokens.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % config.vocab_size + 5 * (changed[:, t + 1] == 0)
        emb_a, states_a = model.encode_text(tokens)
        emb_b, states_b = model.encode_text(changed)
        assert torch.allclose(states_a[:, :t + 1], states_b[:, :t + 1], atol=1e-6)
        assert not torch.allclose(states_a[:, t + 1], states_b[:, t + 1])
        assert not torch.allclose(emb_a, emb_b)
        logits_a = model.text_decoder.multimodal(states_a, queries)
        logits_b = model.text_decoder.multimodal(states_b, queries)
        assert torch.allclose(logits_a[:, :t + 1], logits_b[:, :t + 1], atol=1e-5)


def test_changing_the_image_changes_the_caption_logits():
    """The multimodal layers read the image (issue #797: 'every image gets the same caption')."""
    config = small_config()
    model = model_for(config)
    batch = make_batch(config, B=2)
    states = model.encode_text(batch["tokens"])[1]
    logits_a = model.text_decoder.multimodal(states, model.encode_image(batch["images"])[1])
    other = torch.randn_like(batch["images"])
    logits_b = model.text_decoder.multimodal(states, model.encode_image(other)[1])
    assert (logits_a - logits_b).abs().max() > 1e-4


def test_forward_returns_the_loss_dict_and_the_ablations_drop_a_term():
    config = small_config()
    batch = make_batch(config)
    out = model_for(config)(batch)
    assert set(out) == {"loss", "contrastive", "captioning"}
    assert out["loss"].item() == pytest.approx(out["contrastive"].item()
                                               + 2 * out["captioning"].item(), rel=1e-5)
    cap_only = model_for(small_config(lambda_con=0.0))(batch)  # Table 8b: captioning only
    assert cap_only["loss"].item() == pytest.approx(2 * cap_only["captioning"].item(), rel=1e-6)
    con_only = model_for(small_config(lambda_cap=0.0))(batch)  # Table 8b: contrastive only
    assert con_only["loss"].item() == pytest.approx(con_only["contrastive"].item(), rel=1e-6)


def test_logit_scale_starts_at_log_1_over_0_07_and_is_clamped_to_log_100():
    model = model_for(small_config())
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.after_optimizer_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_output_projection_is_initialised_and_untied():
    model = model_for(Config.tiny())
    weight = model.text_decoder.output.weight
    assert weight.data_ptr() != model.text_decoder.token_embedding.weight.data_ptr()
    assert torch.isfinite(weight).all() and 0.015 < weight.std().item() < 0.025


# --- (d) learning -------------------------------------------------------------------------------

def test_a_tiny_model_overfits_one_batch():
    """Both objectives drive to near zero on 4 fixed image-caption pairs."""
    config = small_config()
    model = model_for(config).train()
    batch = make_batch(config, B=4, T=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = model(batch)
    for _ in range(150):
        losses = model(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        model.after_optimizer_step()
    last = model(batch)
    assert last["captioning"].item() < 0.1 * first["captioning"].item()
    assert last["contrastive"].item() < 0.1


def test_greedy_generation_starts_with_cls_and_stays_in_the_vocabulary():
    pytest.importorskip("shared.decoding")
    config = small_config()
    model = model_for(config)
    tokens = model.generate(torch.randn(3, 3, 16, 16), CLS, SEP, max_len=6)
    assert tokens.shape[0] == 3 and tokens.shape[1] <= 6
    assert (tokens[:, 0] == CLS).all() and tokens.max() < config.vocab_size


# --- (b) equivalence ---------------------------------------------------------------------------

def test_sdpa_and_math_attention_paths_give_the_same_losses():
    """The [CLS] mask goes through F.scaled_dot_product_attention on the fast path; the explicit
    QK^T/√Dh path of shared/attention.py must agree."""
    from shared.attention import set_fast_attention

    config = small_config()
    model = model_for(config)
    batch = make_batch(config)
    fast = model(batch)
    slow = set_fast_attention(model, False)(batch)
    for key in fast:
        assert torch.allclose(fast[key], slow[key], atol=1e-5), key


# --- downstream on the world (needs shared.world, shared.metrics, shared.decoding) --------------

def test_evaluate_returns_every_metric_in_range_and_restores_train_mode():
    for name in ("shared.world", "shared.metrics", "shared.decoding"):
        pytest.importorskip(name)
    from shared.tokenizer import Tokenizer
    from shared.world import World, WorldConfig

    world_config = WorldConfig(seed=0, image_size=32)
    world = World(world_config, "train")
    tokenizer = Tokenizer.train([c for i in range(50) for c in world.example(i)["captions"]],
                                vocab_size=200)
    config = small_config(image_size=32, patch_size=8, vocab_size=tokenizer.vocab_size,
                          max_text_len=24)
    model = model_for(config).train()
    metrics = coca.evaluate(model, tokenizer, config, world_config, "val", 12)
    assert model.training
    for key in ["zero_shot_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "caption_truth",
                "caption_truth_baseline", "bleu4", "cider", "linear_probe_acc"]:
        assert 0.0 <= metrics[key] <= (10.0 if key == "cider" else 1.0), key
    samples = coca.sample_captions(model, tokenizer, config, world_config, "val", 2)
    assert len(samples) == 2 and all(isinstance(g, str) and isinstance(r, str) for g, r in samples)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_the_key_value_cache_gives_the_same_tokens_and_log_probs(method):
    """TextDecoder.step with cached keys and values (one position a step) against re-encoding
    the whole prefix every step, through shared.decoding."""
    from shared import decoding

    config = small_config()
    model = model_for(config).eval()
    with torch.no_grad():
        _, queries = model.encode_image(torch.randn(4, 3, 16, 16))
        prefix = torch.full((4, 1), CLS)
        results = []
        for cached in (True, False):
            step = model.next_token_logprobs(queries, cached=cached)
            if method == "greedy":
                results.append(decoding.greedy(step, prefix, config.max_text_len, SEP))
            else:
                results.append(decoding.beam_search(step, prefix, config.max_text_len, SEP,
                                                    beam_size=3))
    (tokens_a, score_a), (tokens_b, score_b) = results
    assert torch.equal(tokens_a, tokens_b) and tokens_a.shape[1] > 2
    assert torch.allclose(score_a, score_b, atol=1e-4)
