"""coca.py: the config against Table 1, the poolers' shapes, the masks and causality of the
decoupled decoder, fast vs reference paths, a tiny model that learns, and the contract train.py
uses (heads, fine-tuning, optimizer, temperature clamp, evaluation).

Kinds (README, house style): (c) shapes, masks, causality; (b) equivalence; (d) learning. The loss math
(a) is in tests/test_losses.py. Every model here is a few thousand parameters: the file runs
in seconds on a laptop CPU.
"""

import dataclasses
import math

import pytest
import torch

import coca
from coca import CoCa, Config, unimodal_attention_mask

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
    """Every field but the pixel statistics (3 numbers each, kept in the config) is a flag."""
    for preset in (Config.paper(), Config.small(), Config.tiny(),
                   Config.open_clip("coca_ViT-B-32")):
        for field in dataclasses.fields(preset):
            value = getattr(preset, field.name)
            if field.name in ("image_mean", "image_std"):
                assert len(value) == 3 and all(type(x) is float for x in value)
            else:
                assert type(value) in (int, float, str, bool), field.name
    from shared.data import IMAGE_MEAN, IMAGE_STD

    assert (Config().image_mean, Config().image_std) == (IMAGE_MEAN, IMAGE_STD)


@pytest.mark.parametrize("overrides,message", [
    ({"text_width": 30, "text_heads": 4}, "text_width 30 is not divisible by text_heads 4"),
    ({"image_size": 30}, "image_size 30 is not divisible by patch_size 4"),
    ({"patch_stem": "conv", "patch_size": 6, "image_size": 18}, "power-of-two patch_size"),
    ({"pooler_layout": "serial"}, "pooler_layout"),
    ({"pooler_layout": "single", "n_caption_queries": 1}, "n_caption_queries >= 2"),
    ({"pooler_heads": 3}, "pooler_heads must be 0"),
    ({"image_std": (0.2, 0.0, 0.2)}, "image_mean and image_std"),
    ({"lambda_con": 0.0, "lambda_cap": 0.0}, "not both 0"),
])
def test_invalid_configs_raise_one_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


def open_clip_layout(**overrides) -> Config:
    """small_config in the layout of open_clip's released weights (Config.open_clip)."""
    return small_config(**{**dict(
        pooler_layout="single", n_caption_queries=6, pooler_heads=4, vision_cls_token=True,
        ln_pre=True, patch_stem="linear", patch_bias=False, cross_kv_norm=True,
        separate_cross_block=True, output_bias=False, legacy_cls_mask=True, ln_eps=1e-5),
        **overrides})


def test_the_open_clip_layout_shapes_and_tensors():
    """One pooler: output 0 is the contrastive token, 1..Q-1 the decoder's; a class token with
    its own position; two MLPs and a key/value LayerNorm a multimodal layer; no patch or
    vocabulary bias."""
    model = model_for(open_clip_layout())
    tokens = model.image_encoder(torch.randn(3, 3, 16, 16))
    assert tokens.shape == (3, 17, 32)  # 16 patches + the class token
    contrastive, caption = model.pool(tokens)
    assert contrastive.shape == (3, 1, 32) and caption.shape == (3, 5, 32)
    assert model.contrastive_pooler is None and model.text_decoder.output.bias is None
    names = set(model.state_dict())
    layer = "text_decoder.multimodal_layers.0"
    assert {"image_encoder.cls_token", "image_encoder.pre_norm.weight",
            "caption_pooler.query_norm.weight", f"{layer}.self_mlp.fc1.weight",
            f"{layer}.self_mlp_norm.weight", f"{layer}.context_norm.bias"} <= names
    assert "image_encoder.patch_embedding.proj.bias" not in names
    paper_names = set(model_for(small_config()).state_dict())
    assert not any("self_mlp" in k or "context_norm" in k or "cls_token" in k
                   for k in paper_names)


def test_the_legacy_cls_mask_is_shifted_by_one_and_leaves_the_text_rows():
    """open_clip's released weights: the [CLS] row's keys are [True] + (tokens != pad)."""
    tokens = torch.tensor([[CLS, 7, SEP, 0, 0], [CLS, 7, 8, 9, SEP]])
    legacy = unimodal_attention_mask(tokens, legacy=True)
    assert legacy[0, -1].tolist() == [True, True, True, True, False, False]
    assert legacy[1, -1].tolist() == [True] * 6
    correct = unimodal_attention_mask(tokens)
    assert torch.equal(legacy[:, :3], correct[:, :3])  # the real text rows


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_the_key_value_cache_works_in_the_open_clip_layout(method):
    """TextDecoder.step (cached keys and values; the key/value LayerNorm applied to the image
    queries once, the self-attention block's MLP on the way) against re-encoding the prefix."""
    from shared import decoding

    config = open_clip_layout()
    model = model_for(config)
    with torch.no_grad():
        _, queries = model.encode_image(torch.randn(4, 3, 16, 16))
        prefix = torch.full((4, 1), CLS)
        results = []
        for cached in (True, False):
            step = model.next_token_logprobs(queries, cached=cached)
            results.append(decoding.greedy(step, prefix, config.max_text_len, SEP)
                           if method == "greedy" else
                           decoding.beam_search(step, prefix, config.max_text_len, SEP,
                                                beam_size=3))
    (tokens_a, score_a), (tokens_b, score_b) = results
    assert torch.equal(tokens_a, tokens_b) and tokens_a.shape[1] > 2
    assert torch.allclose(score_a, score_b, atol=1e-4)


def test_the_open_clip_layout_trains():
    """Both objectives go down on 4 fixed pairs in the open_clip layout (every new tensor gets
    a gradient)."""
    config = open_clip_layout()
    model = model_for(config).train()
    batch = make_batch(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(batch)
    first["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    for _ in range(40):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    last = model(batch)
    assert last["contrastive"] < first["contrastive"] and last["captioning"] < first["captioning"]


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


def test_greedy_generation_starts_with_cls_and_stays_in_the_vocabulary():
    pytest.importorskip("shared.decoding")
    config = small_config()
    model = model_for(config)
    tokens = model.generate(torch.randn(3, 3, 16, 16), CLS, SEP, max_len=6)
    assert tokens.shape[0] == 3 and tokens.shape[1] <= 6
    assert (tokens[:, 0] == CLS).all() and tokens.max() < config.vocab_size


def test_output_projection_is_initialised_and_untied():
    model = model_for(Config.tiny())
    weight = model.text_decoder.output.weight
    assert weight.data_ptr() != model.text_decoder.token_embedding.weight.data_ptr()
    assert torch.isfinite(weight).all() and 0.015 < weight.std().item() < 0.025


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


def test_cls_row_sees_every_real_token_and_itself():
    """For [CLS_start, a, SEP, PAD, PAD] + contrastive [CLS]: its row is exactly (tokens != pad)
    + [True] (open_clip #554 shipped it shifted by one); the text rows are causal."""
    tokens = torch.tensor([[CLS, 7, SEP, 0, 0], [CLS, 7, 8, 9, SEP]])
    allowed = unimodal_attention_mask(tokens)  # (2, 6, 6)
    assert allowed[0, -1].tolist() == [True, True, True, False, False, True]
    assert allowed[1, -1].tolist() == [True] * 6
    for t in range(3):  # real text rows: exactly the causal past
        assert allowed[0, t].tolist() == [j <= t for j in range(6)]
    for t in (3, 4):  # pad rows (the docstring's picture): the real past, never a pad key
        assert allowed[0, t].tolist() == [True, True, True, False, False, False]


def test_text_embedding_does_not_depend_on_how_far_the_batch_is_padded():
    """The [CLS] output must ignore pads: padding the same text further changes nothing."""
    config = small_config()
    model = model_for(config)
    short = torch.tensor([[CLS, 7, 8, SEP, 0]])
    longer = torch.tensor([[CLS, 7, 8, SEP, 0, 0, 0, 0]])
    assert torch.allclose(model.embed_texts(short), model.embed_texts(longer), atol=1e-6)


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
    """The multimodal layers read the image (open_clip issue #797: 'every image gets the same
    caption')."""
    config = small_config()
    model = model_for(config)
    batch = make_batch(config, B=2)
    states = model.encode_text(batch["tokens"])[1]
    logits_a = model.text_decoder.multimodal(states, model.encode_image(batch["images"])[1])
    other = torch.randn_like(batch["images"])
    logits_b = model.text_decoder.multimodal(states, model.encode_image(other)[1])
    assert (logits_a - logits_b).abs().max() > 1e-4


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


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_decoding_from_a_prompt_reads_every_prompt_token_cached_or_not(method):
    """generate(prompt=...) with a prompt of 3 tokens after [CLS] and two + two text layers: the
    cache is filled from the whole prefix, so the first log-probs, and then every token and
    score (beam search reordering rows), equal those of re-encoding the prefix every step."""
    config = small_config(unimodal_layers=2, multimodal_layers=2)
    model = model_for(config)
    images = torch.randn(3, 3, 16, 16)
    prompt = torch.tensor([[7, 8, 9], [10, 11, 12], [7, 7, 13]])  # (B, T0 = 3)
    prefix = torch.cat([torch.full((3, 1), CLS), prompt], dim=1)  # (B, 4)
    with torch.no_grad():
        queries = model.encode_image(images)[1]
        first = [model.next_token_logprobs(queries, cached)(prefix, torch.arange(3))
                 for cached in (True, False)]
    assert torch.allclose(first[0], first[1], atol=1e-5)
    (tokens_a, score_a), (tokens_b, score_b) = [
        model.generate(images, CLS, SEP, method=method, beam_size=3, prompt=prompt,
                       cached=cached, return_scores=True,
                       generator=torch.Generator().manual_seed(0)) for cached in (True, False)]
    assert torch.equal(tokens_a, tokens_b) and torch.allclose(score_a, score_b, atol=1e-5)
    assert torch.equal(tokens_a[:, :4], prefix) and tokens_a.shape[1] > 4  # it begins with them


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
        coca.after_optimizer_step(model)
    last = model(batch)
    assert last["captioning"].item() < 0.1 * first["captioning"].item()
    assert last["contrastive"].item() < 0.1


# --- the contract: task, heads, fine-tuning, optimizer, temperature clamp, evaluation -----------

def test_the_contract_names_and_an_unknown_task_raises():
    assert coca.TASKS == ("pretrain",) and set(coca.MAIN_METRIC) == set(coca.TASKS)
    assert (coca.INPUTS, coca.BERT_INIT) == ("pixels", None)
    assert Config.tiny().task == "pretrain"
    with pytest.raises(ValueError, match="task must be one of pretrain"):
        small_config(task="caption")


def test_no_head_depends_on_the_task_and_fine_tuning_loads_everything():
    """Heads by composition: CoCa's one task has no task-specific head, so every tensor is the
    encoder's (none under heads.) and shared.checkpoint.load_weights loads all of it strictly,
    leaving no head fresh."""
    from shared.checkpoint import load_weights

    config = small_config()
    pretrained, fresh = model_for(config, seed=0), model_for(config, seed=1)
    keys = list(pretrained.state_dict())
    assert keys == list(model_for(dataclasses.replace(config, task="pretrain")).state_dict())
    assert len(pretrained.heads) == 0 and not any(k.startswith("heads.") for k in keys)
    assert load_weights(fresh, pretrained.state_dict()) == []
    for k, v in pretrained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_load_weights_refuses_a_checkpoint_of_another_pooler_layout():
    """The cascade contrastive pooler reads D-wide tokens, the parallel one Dv-wide: one line."""
    from shared.checkpoint import CheckpointError, load_weights

    parallel = model_for(small_config(vision_width=48))
    cascade = model_for(small_config(vision_width=48, pooler_layout="cascade"))
    with pytest.raises(CheckpointError, match="contrastive_pooler"):
        load_weights(parallel, cascade.state_dict())


def test_make_optimizer_decays_matrices_only_with_the_paper_betas():
    """AdamW with β1, β2 and weight decay of [CoCa §4.1]; no decay on logit_scale, biases, norms;
    the fused kernel on the CPU."""
    config = small_config()
    model = model_for(config)
    optimizer = coca.make_optimizer(model, config)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == config.weight_decay == 0.01 and no_decay["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())
    assert decay["betas"] == (0.9, 0.999) and decay["lr"] == config.lr and decay["fused"]


def test_after_optimizer_step_leaves_a_scale_below_the_clamp_alone():
    model = model_for(small_config())
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    coca.after_optimizer_step(model)
    assert model.logit_scale.item() == 2.0


def test_logit_scale_starts_at_log_1_over_0_07_and_is_clamped_to_log_100():
    model = model_for(small_config())
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    coca.after_optimizer_step(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


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
    assert coca.MAIN_METRIC["pretrain"] in metrics
    assert all(type(v) is float for v in metrics.values())
    samples = coca.sample_captions(model, tokenizer, config, world_config, "val", 2)
    assert len(samples) == 2 and all(isinstance(g, str) and isinstance(r, str) for g, r in samples)


def test_the_paper_preset_uses_the_cascade_poolers_of_section_4_3():
    """[CoCa §4.3]: the cascade poolers are "used by default in all CoCa models"; tiny and small
    keep Fig. 2's parallel layout, the one their runs were measured with. In the cascade, the
    contrastive pooler reads the captioning pooler's D-wide outputs."""
    assert Config.paper().pooler_layout == "cascade" and Config().pooler_layout == "cascade"
    assert Config.tiny().pooler_layout == Config.small().pooler_layout == "parallel"
    cascade = model_for(small_config(vision_width=48, pooler_layout="cascade"))
    assert cascade.contrastive_pooler.attn.k_proj.in_features == 32  # text_width, not 48
