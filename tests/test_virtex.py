"""virtex.py: the ResNet-50 against torchvision's parameter count, the heads by pretext (the
encoder's state dict never depends on it; load_weights carries over every shared head), the
contract names, caption reversal and masked-LM masks, causality, weight sharing between the two
directions, the key/value cache, and a tiny model that learns. The loss math is in
tests/test_losses.py.

Kinds (README, house style), in this order: (c) shapes; masks; causality; (b) equivalence; (d) learning
and the downstream evaluation. The models here are small: the file runs in seconds on a laptop CPU.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import virtex
from shared.checkpoint import load_weights
from virtex import (PAD_ID, Config, ResNet, VirTex, captioning_loss, mask_tokens,
                    reverse_captions)

SOS, EOS, MASK = 2, 3, 4  # shared.tokenizer's [CLS], [SEP], [MASK]; [PAD] = 0, [UNK] = 1
SPECIAL = {0, 1, 2, 3, 4}
HEADS = {"bicaptioning": {"textual", "backward"}, "captioning": {"textual"},
         "masked_lm": {"textual"}, "token_classification": {"token_classification"}}


def small_config(**overrides) -> Config:
    """A VirTex of a few ten thousand parameters: 32 px, ResNet width 4, H 32."""
    base = dict(image_size=32, resnet_width=4, hidden_size=32, heads=2, feedforward_size=64,
                vocab_size=40, max_text_len=12)
    return dataclasses.replace(Config.tiny(), **{**base, **overrides})


def make_batch(config: Config, B: int = 4, T: int = 8, seed: int = 0) -> dict:
    """Random images and right-padded captions [SOS] w ... [EOS] [PAD]..."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, config.image_size, config.image_size, generator=gen)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        length = T - (b % 3)
        tokens[b, 0] = SOS
        tokens[b, 1:length - 1] = torch.randint(5, config.vocab_size, (length - 2,), generator=gen)
        tokens[b, length - 1] = EOS
    return {"images": images, "tokens": tokens}


def model_for(config: Config, seed: int = 0) -> VirTex:
    torch.manual_seed(seed)
    return virtex.build_model(config).eval()


# --- (c) shapes: the visual backbone -----------------------------------------------------------

def test_resnet50_has_torchvision_parameter_count_without_fc():
    with torch.device("meta"):
        resnet = ResNet(Config.paper())
    assert sum(p.numel() for p in resnet.parameters()) == 23_508_032  # torchvision, fc removed


def test_resnet50_gives_a_7x7_grid_of_2048_channels_at_224px():
    torch.manual_seed(0)
    resnet = ResNet(Config.paper()).eval()
    with torch.no_grad():
        grid = resnet(torch.randn(1, 3, 224, 224))
    assert grid.shape == (1, 2048, 7, 7)
    assert Config.paper().visual_dim == 2048


def test_resnet_uses_torchvision_parameter_names_and_zero_init_residual():
    resnet = ResNet(Config.paper())
    names = {name for name, _ in resnet.named_parameters()}
    for name in ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn3.weight",
                 "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                 "layer4.2.conv3.weight", "layer3.5.bn2.bias"]:
        assert name in names, name
    for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in stage:
            assert torch.count_nonzero(block.bn3.weight) == 0  # each block starts as identity
            assert torch.all(block.bn1.weight == 1)


# --- (c) shapes: heads by pretext, the contract, config, optimizer ------------------------------

@pytest.mark.parametrize("pretext", virtex.PRETEXTS)
def test_each_pretext_adds_its_heads_and_the_encoder_state_dict_never_changes(pretext):
    model = model_for(small_config(pretext=pretext))
    assert set(model.heads) == HEADS[pretext]
    encoder = {k: v.shape for k, v in model.state_dict().items() if not k.startswith("heads.")}
    resnet = ResNet(small_config()).state_dict()
    assert encoder == {"visual." + k: v.shape for k, v in resnet.items()}  # the ResNet alone
    assert all(k.startswith(("visual.", "heads.")) for k in model.state_dict())


@pytest.mark.parametrize("source, target, fresh", [
    ("bicaptioning", "captioning", []),  # the forward direction and its shared parts
    ("captioning", "bicaptioning", ["backward"]),
    ("masked_lm", "captioning", []),  # the same decoder, run with the causal mask
    ("bicaptioning", "token_classification", ["token_classification"]),
    ("token_classification", "bicaptioning", ["backward", "textual"]),
])
def test_load_weights_carries_every_shared_head_across_pretexts(source, target, fresh):
    """Fine-tuning with another pretext (train.py --init): the ResNet loads strictly, and every
    head both pretexts have loads, so every tensor the two models share by name transfers."""
    trained = model_for(small_config(pretext=source), seed=1).state_dict()
    model = model_for(small_config(pretext=target), seed=2)
    assert load_weights(model, trained) == fresh
    own = model.state_dict()
    shared_keys = set(own) & set(trained)
    assert any(k.startswith("visual.") for k in shared_keys)
    for k in shared_keys:
        assert torch.equal(own[k], trained[k]), k
    for k in own.keys() - trained.keys():
        assert k.split(".")[1] in fresh, k  # what the checkpoint lacks is in a fresh head


def test_the_contract_names():
    assert virtex.TASKS == ("pretrain",) and set(virtex.MAIN_METRIC) == set(virtex.TASKS)
    assert virtex.MAIN_METRIC["pretrain"] == "linear_probe_acc"
    assert virtex.INPUTS == "pixels" and virtex.BERT_INIT is None
    assert Config.tiny().task == "pretrain"
    model = model_for(small_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert virtex.after_optimizer_step(model) is None  # a no-op
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("pretext, terms", [("bicaptioning", {"loss", "forward", "backward"}),
                                            ("captioning", {"loss"}),
                                            ("token_classification", {"loss"}),
                                            ("masked_lm", {"loss"})])
def test_every_pretext_runs_forward_and_backward(pretext, terms):
    config = small_config(pretext=pretext)
    model = model_for(config).train()
    batch = make_batch(config)
    batch["token_targets"] = torch.zeros(4, config.vocab_size)
    batch["token_targets"][:, 7:10] = 1
    batch["mlm_tokens"] = batch["tokens"].clone()
    batch["mlm_tokens"][:, 2] = MASK
    batch["mlm_labels"] = torch.zeros_like(batch["tokens"])
    batch["mlm_labels"][:, 2] = batch["tokens"][:, 2]
    losses = model(batch)
    assert set(losses) == terms and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0  # the CNN learns from every pretext
    if pretext == "bicaptioning":
        assert losses["loss"].item() == pytest.approx(
            losses["forward"].item() + losses["backward"].item(), rel=1e-6)
    if pretext == "captioning":
        assert "backward" not in model.heads


def test_embeddings_at_pads_are_zero():
    model = model_for(small_config())
    tokens = torch.tensor([[SOS, 9, EOS, 0, 0]])
    x = model.heads["textual"].embedding(tokens)
    assert torch.all(x[0, 3:] == 0) and torch.all(x[0, :3].abs().sum(-1) > 0)


def test_paper_config_is_r50_l1_h2048_with_the_implementation_recipe():
    c = Config.paper()
    assert (c.resnet_blocks, c.resnet_width, c.image_size) == ((3, 4, 6, 3), 64, 224)
    assert (c.layers, c.hidden_size, c.heads, c.feedforward_size) == (1, 2048, 32, 8192)
    assert (c.optimizer, c.beta1, c.cnn_lr, c.lr, c.weight_decay) == ("sgd", 0.9, 0.2, 1e-3, 1e-4)
    assert (c.warmup_steps, c.lr_schedule, c.grad_clip, c.batch_size) == (10_000, "cosine", 10.0,
                                                                           256)
    assert (c.max_text_len, c.beam_size, c.pretext) == (30, 5, "bicaptioning")


@pytest.mark.parametrize("overrides, message", [
    (dict(pretext="simclr"), "pretext must be one of"),
    (dict(task="vqa"), "task must be one of pretrain"),
    (dict(hidden_size=100, heads=3), "not divisible by heads"),
    (dict(resnet_blocks=(1, 1, 1)), "resnet_blocks"),
    (dict(image_size=16, stem_stride=2), "too small"),
    (dict(optimizer="lamb"), "optimizer must be"),
])
def test_invalid_configs_raise_one_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(Config.tiny(), **overrides)


def test_optimizer_gives_the_cnn_its_own_learning_rate_and_no_decay_on_head_norms():
    config = small_config(optimizer="sgd", lr=1e-3, cnn_lr=0.2)
    model = virtex.build_model(config)
    optimizer = virtex.make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert isinstance(virtex.make_optimizer(model, small_config()), torch.optim.AdamW)  # tiny
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    textual = model.heads["textual"]
    cnn_group = by_param[id(model.visual.conv1.weight)]
    assert cnn_group["lr_scale"] * config.lr == pytest.approx(config.cnn_lr)
    assert by_param[id(model.visual.bn1.weight)]["weight_decay"] == config.weight_decay
    assert by_param[id(textual.embedding.norm.weight)]["weight_decay"] == 0.0
    assert by_param[id(textual.visual_projection.weight)]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # [code]'s NO_DECAY regex: both Transformers' norms and biases; not the projection's or
    # the output layer's bias
    backward_norm = model.heads["backward"].layers[0].mlp_norm.weight
    assert by_param[id(backward_norm)]["weight_decay"] == 0.0
    assert by_param[id(textual.output.bias)]["weight_decay"] == config.weight_decay
    assert by_param[id(textual.visual_projection.bias)]["weight_decay"] == config.weight_decay


# --- masks: caption reversal, masked-LM inputs, the flip's caption swap -------------------------

def test_reverse_captions_flips_each_caption_before_padding():
    tokens = torch.tensor([[SOS, 10, 11, EOS, 0, 0],
                           [SOS, 12, EOS, 0, 0, 0],
                           [SOS, 13, 14, 15, 16, EOS]])
    expected = torch.tensor([[EOS, 11, 10, SOS, 0, 0],
                             [EOS, 12, SOS, 0, 0, 0],
                             [EOS, 16, 15, 14, 13, SOS]])
    assert torch.equal(reverse_captions(tokens), expected)
    assert torch.equal(reverse_captions(reverse_captions(tokens)), tokens)


def test_mask_tokens_masks_15_percent_of_ordinary_tokens_and_labels_them():
    tokens = [SOS] + list(range(10, 30)) + [EOS]  # 20 ordinary tokens
    inputs, labels = mask_tokens(tokens, np.random.default_rng(0), MASK, 100, SPECIAL, 0.15)
    chosen = [i for i, label in enumerate(labels) if label != 0]
    assert len(chosen) == math.ceil(0.15 * 20) == 3
    assert all(labels[i] == tokens[i] for i in chosen)
    assert inputs[0] == SOS and inputs[-1] == EOS and labels[0] == labels[-1] == 0
    assert all(inputs[i] == tokens[i] for i in range(len(tokens)) if i not in chosen)
    # over many draws about 80 % of the chosen positions become [MASK], none a special token
    rng, n_mask, n_chosen = np.random.default_rng(1), 0, 0
    for _ in range(300):
        inputs, labels = mask_tokens(tokens, rng, MASK, 100, SPECIAL, 0.15)
        for i, label in enumerate(labels):
            if label:
                n_chosen += 1
                n_mask += inputs[i] == MASK
                assert inputs[i] == MASK or inputs[i] not in SPECIAL
    assert 0.74 < n_mask / n_chosen < 0.86
    # a caption with no ordinary token: nothing to mask, nothing to predict
    assert mask_tokens([SOS, EOS], rng, MASK, 100, SPECIAL) == ([SOS, EOS], [0, 0])


def test_dataset_flip_swaps_left_and_right_as_whole_words():
    pytest.importorskip("shared.augment")
    from shared.tokenizer import Tokenizer
    from shared.world import World, WorldConfig

    world = World(WorldConfig(seed=0, image_size=32), "train")
    texts = ["a red circle to the left of a blue square", "a bright star to the right"]
    tokenizer = Tokenizer.train(texts * 5, vocab_size=60)

    class OneExample:  # a world of one image whose captions we choose
        def __len__(self):
            return 1

        def example(self, i, regions=False):
            return {**world.example(0, regions=False), "captions": [texts[0]]}

    config = small_config(flip_prob=1.0, jitter_prob=0.0, crop_scale_min=1.0,
                          vocab_size=tokenizer.vocab_size, max_text_len=16)
    item = virtex.VirTexDataset(OneExample(), tokenizer, config)[0]
    assert tokenizer.decode(item["tokens"].tolist()) == "a red circle to the right of a blue square"
    unflipped = virtex.VirTexDataset(OneExample(), tokenizer,
                                     dataclasses.replace(config, flip_prob=0.0))[0]
    assert torch.allclose(item["image"], unflipped["image"].flip(-1), atol=1e-5)


# --- causality ---------------------------------------------------------------------------------

def test_changing_token_t_plus_1_leaves_logits_up_to_t_unchanged():
    model = model_for(small_config())
    batch = make_batch(model.config, B=2, T=8)
    textual = model.heads["textual"]
    visual = model.visual_tokens(batch["images"])
    with torch.no_grad():
        before = textual.logits(batch["tokens"], visual)
        for t in range(1, 6):
            changed = batch["tokens"].clone()
            changed[:, t + 1] = 7 + t
            after = textual.logits(changed, visual)
            assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-5), t
            assert not torch.allclose(before[:, t + 1:], after[:, t + 1:], atol=1e-5), t
        # the masked-LM decoder is bidirectional: the past does move
        after = textual.logits(changed, visual, causal=False)
        before = textual.logits(batch["tokens"], visual, causal=False)
        assert not torch.allclose(before[:, :6], after[:, :6], atol=1e-5)


def test_changing_the_image_changes_the_caption_logits():
    model = model_for(small_config())
    batch = make_batch(model.config, B=2)
    textual = model.heads["textual"]
    with torch.no_grad():
        a = textual.logits(batch["tokens"], model.visual_tokens(batch["images"]))
        b = textual.logits(batch["tokens"], model.visual_tokens(batch["images"].flip(0)))
    assert (a - b).abs().max() > 1e-6  # small at initialisation (N(0, 0.02)), but there


# --- (b) equivalence: weight sharing, the composite, the key/value cache ------------------------

def test_backward_head_has_its_own_transformer_that_starts_equal_and_shares_the_rest():
    model = model_for(small_config())
    textual, backward_head = model.heads["textual"], model.heads["backward"]
    assert backward_head is not textual.transformer
    forward_params = dict(textual.transformer.named_parameters())
    for name, p in backward_head.named_parameters():
        assert p is not forward_params[name] and torch.equal(p, forward_params[name]), name
    # shared modules: one object each, used by both directions
    assert textual.output.weight is textual.embedding.words.weight  # tied, with its own bias
    assert set(dict(backward_head.named_children())) == {"layers"}  # no embedding, no output
    # the backward loss alone trains the shared parts and the backward transformer only
    model.train()
    batch = make_batch(model.config)
    visual = model.visual_tokens(batch["images"])
    backward_tokens = reverse_captions(batch["tokens"])
    captioning_loss(textual.logits(backward_tokens, visual, transformer=backward_head),
                    backward_tokens).backward()
    assert textual.embedding.words.weight.grad.abs().sum() > 0
    assert textual.visual_projection.weight.grad.abs().sum() > 0
    assert textual.output.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in textual.transformer.parameters())


def test_the_model_returns_the_bicaptioning_composite(monkeypatch):
    """VirTex.forward's loss is bicaptioning_loss(L_f, L_b), not a sum of its own."""
    config = small_config()
    model = model_for(config)
    batch = make_batch(config)
    calls = []

    def composite(forward, backward):
        calls.append((forward, backward))
        return 3 * forward - backward

    monkeypatch.setattr(virtex, "bicaptioning_loss", composite)
    losses = model(batch)
    assert len(calls) == 1 and calls[0] == (losses["forward"], losses["backward"])
    assert losses["loss"].item() == pytest.approx(3 * losses["forward"].item()
                                                  - losses["backward"].item(), rel=1e-6)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_the_key_value_cache_gives_the_same_tokens_and_log_probs(method):
    """VirTex.step with cached keys and values (one position a step) against re-encoding the
    whole prefix every step, through shared.decoding (beam with repeat blocking, as generate)."""
    from shared import decoding

    config = small_config()
    model = model_for(config).eval()
    with torch.no_grad():
        visual = model.visual_tokens(torch.randn(4, 3, config.image_size, config.image_size))
        prefix = torch.full((4, 1), SOS)
        results = []
        for cached in (True, False):
            step = model.next_token_logprobs(visual, cached=cached)
            if method == "greedy":
                results.append(decoding.greedy(step, prefix, config.max_text_len, EOS))
            else:
                results.append(decoding.beam_search(step, prefix, config.max_text_len, EOS,
                                                    beam_size=3, block_repeat=True))
    (tokens_a, score_a), (tokens_b, score_b) = results
    assert torch.equal(tokens_a, tokens_b) and tokens_a.shape[1] > 2
    assert torch.allclose(score_a, score_b, atol=1e-4)


@pytest.mark.parametrize("method", ["greedy", "beam", "nucleus"])
def test_decoding_from_a_prompt_reads_every_prompt_token_cached_or_not(method):
    """generate(prompt=...) with a prompt of 3 tokens after [SOS] and two layers: the cache is
    filled from the whole prefix, so the first log-probs, and then every token and score (beam
    search reordering rows), equal those of re-encoding the prefix every step."""
    config = small_config(layers=2)
    model = model_for(config)
    images = make_batch(config, B=3)["images"]
    prompt = torch.tensor([[7, 8, 9], [10, 11, 12], [7, 7, 13]])  # (B, T0 = 3)
    prefix = torch.cat([torch.full((3, 1), SOS), prompt], dim=1)  # (B, 4)
    with torch.no_grad():
        visual = model.visual_tokens(images)
        first = [model.next_token_logprobs(visual, cached)(prefix, torch.arange(3))
                 for cached in (True, False)]
    assert torch.allclose(first[0], first[1], atol=1e-5)
    (tokens_a, score_a), (tokens_b, score_b) = [
        model.generate(images, SOS, EOS, method=method, beam_size=3, prompt=prompt,
                       cached=cached, return_scores=True,
                       generator=torch.Generator().manual_seed(0)) for cached in (True, False)]
    assert torch.equal(tokens_a, tokens_b) and torch.allclose(score_a, score_b, atol=1e-5)
    assert torch.equal(tokens_a[:, :4], prefix) and tokens_a.shape[1] > 4  # it begins with them


def test_decoding_as_the_official_code_30_tokens_after_sos_no_repeat_no_pad():
    """[code]: up to MAX_CAPTION_LENGTH tokens after [SOS] (the limit does not count [SOS]); the
    token just emitted is blocked in beam search, greedy (its beam 1) and nucleus sampling; and
    [PAD] is never generated. A decoder that never ends and loves [PAD], then token 7."""
    config = small_config()
    model = model_for(config)
    with torch.no_grad():
        bias = model.heads["textual"].output.bias
        bias[EOS], bias[PAD_ID], bias[7] = -1e4, 30.0, 20.0
    images = make_batch(config, B=2)["images"]
    for method in ("beam", "greedy", "nucleus"):
        out = model.generate(images, SOS, EOS, method=method, beam_size=3,
                             generator=torch.Generator().manual_seed(0))
        assert out.shape[1] == 1 + config.max_text_len, method  # [SOS] + max_text_len tokens
        assert (out[:, 1:] != PAD_ID).all() and (out[:, 1:] != out[:, :-1]).all(), method


# --- (d) learning, generation, the world -------------------------------------------------------

def test_a_tiny_model_overfits_one_batch():
    config = small_config(dropout=0.0, optimizer="adamw", lr=3e-3, cnn_lr=3e-3)
    model = model_for(config).train()
    batch = make_batch(config)
    optimizer = virtex.make_optimizer(model, config)
    first = None
    for _ in range(150):
        losses = model(batch)
        first = first or losses["loss"].item()
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        virtex.after_optimizer_step(model)
    assert losses["loss"].item() < 0.1 * first, (first, losses["loss"].item())


def test_generation_starts_with_sos_and_needs_a_captioning_pretext():
    config = small_config()
    model = model_for(config)
    images = make_batch(config, B=3)["images"]
    for method in ("beam", "greedy", "nucleus"):
        out = model.generate(images, SOS, EOS, max_len=6, method=method, beam_size=3,
                             generator=torch.Generator().manual_seed(0))
        assert out.shape[0] == 3 and out.shape[1] <= 6 and torch.all(out[:, 0] == SOS), method
        assert out.max() < config.vocab_size
    with pytest.raises(ValueError, match="no left-to-right decoder"):
        model_for(small_config(pretext="token_classification")).generate(images, SOS, EOS)


def test_evaluate_reports_probe_random_baseline_and_captions():
    from shared.tokenizer import Tokenizer
    from shared.world import World, WorldConfig

    world_config = WorldConfig(seed=0, image_size=32)
    world = World(world_config, "train")
    tokenizer = Tokenizer.train([c for i in range(50) for c in world.example(i)["captions"]],
                                vocab_size=200)
    config = small_config(vocab_size=tokenizer.vocab_size, max_text_len=20, beam_size=2)
    model = model_for(config).train()
    rng_before = torch.random.get_rng_state()
    metrics = virtex.evaluate(model, tokenizer, config, world_config, "val", 12)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the random baseline forks
    assert model.training
    for key in ["linear_probe_acc", "linear_probe_acc_random", "caption_truth",
                "caption_truth_baseline", "bleu4", "cider"]:
        assert 0.0 <= metrics[key] <= (10.0 if key == "cider" else 1.0), key
    samples = virtex.sample_captions(model.eval(), tokenizer, config, world_config, "val", 2)
    assert len(samples) == 2 and all(isinstance(g, str) for g, _ in samples)
    assert not model.training  # sample_captions restores the mode it was given
    config = dataclasses.replace(config, pretext="token_classification")
    metrics = virtex.evaluate(model_for(config), tokenizer, config, world_config, "val", 12)
    assert set(metrics) == {"linear_probe_acc", "linear_probe_acc_random"}
    assert virtex.sample_captions(model_for(config), tokenizer, config, world_config, "val",
                                  2) == []


def test_train_py_runs_virtex_and_writes_the_issue_keys(tmp_path):
    import json

    import train

    args = ["--model", "virtex", "--preset", "tiny", "--batch_size", "4", "--image_size", "32",
            "--resnet_width", "4", "--hidden_size", "32", "--heads", "2", "--feedforward_size",
            "64", "--max_text_len", "16", "--vocab_size", "200", "--tokenizer_texts", "50",
            "--num_workers", "0", "--log_every_s", "0", "--final_n", "12", "--max_steps", "3",
            "--warmup_steps", "1", "--beam_size", "2", "--out", str(tmp_path)]
    run, paper, overrides = train.parse_args(args)
    lines = []
    final = train.train(run, paper, overrides, log=lines.append)
    assert any(line.startswith("step 3/3") and "forward" in line for line in lines)
    saved = json.loads((tmp_path / "final.json").read_text())
    for key in ["linear_probe_acc", "linear_probe_acc_random", "caption_truth", "cider"]:
        assert key in saved and saved[key] == final[key]
