"""virtex.py: the ResNet-50 against torchvision's parameter count, weight sharing between the two
textual heads, causality, caption reversal, the losses by hand (bicaptioning, token
classification, masked LM), the augmentation's caption swap, and a tiny model that learns.

Kinds (STYLE.md §14): (a) loss math by hand and by loops; (c) shapes, masks, causality;
(d) learning. The models here are small: the file runs in seconds on a laptop CPU.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import virtex
from virtex import (Config, ResNet, VirTex, bicaptioning_loss, captioning_loss, mask_tokens,
                    masked_lm_loss, reverse_captions, token_classification_loss)

SOS, EOS, MASK = 2, 3, 4  # shared.tokenizer's [CLS], [SEP], [MASK]; [PAD] = 0, [UNK] = 1
SPECIAL = {0, 1, 2, 3, 4}


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


# --- (c) the visual backbone -------------------------------------------------------------------

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


# --- (c) the textual heads: sharing, causality, reversal ---------------------------------------

def test_backward_head_has_its_own_transformer_that_starts_equal_and_shares_the_rest():
    model = model_for(small_config())
    assert model.backward_head is not model.forward_head
    forward_params = dict(model.forward_head.named_parameters())
    for name, p in model.backward_head.named_parameters():
        assert p is not forward_params[name] and torch.equal(p, forward_params[name]), name
    # shared modules: one object each, used by both directions
    assert model.output.weight is model.embedding.words.weight  # tied, with its own bias
    assert not hasattr(model, "backward_embedding") and not hasattr(model, "backward_output")
    # the backward loss alone trains the shared parts and the backward transformer only
    model.train()
    batch = make_batch(model.config)
    visual = model.visual_tokens(batch["images"])
    backward_tokens = reverse_captions(batch["tokens"])
    captioning_loss(model.logits(model.backward_head, backward_tokens, visual),
                    backward_tokens).backward()
    assert model.embedding.words.weight.grad.abs().sum() > 0
    assert model.visual_projection.weight.grad.abs().sum() > 0
    assert model.output.bias.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.forward_head.parameters())


def test_changing_token_t_plus_1_leaves_logits_up_to_t_unchanged():
    model = model_for(small_config())
    batch = make_batch(model.config, B=2, T=8)
    visual = model.visual_tokens(batch["images"])
    with torch.no_grad():
        before = model.logits(model.forward_head, batch["tokens"], visual)
        for t in range(1, 6):
            changed = batch["tokens"].clone()
            changed[:, t + 1] = 7 + t
            after = model.logits(model.forward_head, changed, visual)
            assert torch.allclose(before[:, : t + 1], after[:, : t + 1], atol=1e-5), t
            assert not torch.allclose(before[:, t + 1:], after[:, t + 1:], atol=1e-5), t
        # the masked-LM decoder is bidirectional: the past does move
        after = model.logits(model.forward_head, changed, visual, causal=False)
        before = model.logits(model.forward_head, batch["tokens"], visual, causal=False)
        assert not torch.allclose(before[:, :6], after[:, :6], atol=1e-5)


def test_changing_the_image_changes_the_caption_logits():
    model = model_for(small_config())
    batch = make_batch(model.config, B=2)
    with torch.no_grad():
        a = model.logits(model.forward_head, batch["tokens"], model.visual_tokens(batch["images"]))
        b = model.logits(model.forward_head, batch["tokens"],
                         model.visual_tokens(batch["images"].flip(0)))
    assert (a - b).abs().max() > 1e-6  # small at initialisation (N(0, 0.02)), but there


def test_reverse_captions_flips_each_caption_before_padding():
    tokens = torch.tensor([[SOS, 10, 11, EOS, 0, 0],
                           [SOS, 12, EOS, 0, 0, 0],
                           [SOS, 13, 14, 15, 16, EOS]])
    expected = torch.tensor([[EOS, 11, 10, SOS, 0, 0],
                             [EOS, 12, SOS, 0, 0, 0],
                             [EOS, 16, 15, 14, 13, SOS]])
    assert torch.equal(reverse_captions(tokens), expected)
    assert torch.equal(reverse_captions(reverse_captions(tokens)), tokens)


def test_embeddings_at_pads_are_zero():
    model = model_for(small_config())
    tokens = torch.tensor([[SOS, 9, EOS, 0, 0]])
    x = model.embedding(tokens)
    assert torch.all(x[0, 3:] == 0) and torch.all(x[0, :3].abs().sum(-1) > 0)


# --- (a) loss math -----------------------------------------------------------------------------

def test_captioning_loss_by_hand_on_a_two_token_caption():
    """[SOS] a: one target; logits at position 0 are (0, log 3, 0, 0) -> p(a = 1) = 3/6."""
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 1] = math.log(3.0)
    logits[0, 1] = torch.randn(4)  # position 1 predicts nothing: no target after it
    tokens = torch.tensor([[2, 1]])
    assert captioning_loss(logits, tokens).item() == pytest.approx(-math.log(0.5), abs=1e-6)
    # bicaptioning: backward tokens [a, SOS] = [1, 2]; p(SOS | a) from backward logits at 0
    backward_logits = torch.zeros(1, 2, 4)
    backward_logits[0, 0, 2] = math.log(7.0)  # p = 7/10
    loss = bicaptioning_loss(logits, backward_logits, tokens, reverse_captions(tokens))
    assert loss.item() == pytest.approx(-math.log(0.5) - math.log(0.7), abs=1e-6)


def test_captioning_loss_ignores_pads_and_equals_the_loop_version():
    torch.manual_seed(0)
    tokens = torch.tensor([[SOS, 7, 8, EOS, 0, 0], [SOS, 9, EOS, 0, 0, 0]])
    logits = torch.randn(2, 6, 12)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, 6):
            if tokens[b, t] != 0:
                total -= logits[b, t - 1].log_softmax(-1)[tokens[b, t]].item()
                count += 1
    assert captioning_loss(logits, tokens).item() == pytest.approx(total / count, abs=1e-5)
    changed = logits.clone()
    changed[0, 3:] += 5 * torch.randn(3, 12)  # positions whose targets are pads
    changed[1, 2:] += 5 * torch.randn(4, 12)
    assert torch.allclose(captioning_loss(changed, tokens), captioning_loss(logits, tokens))


def test_token_classification_loss_by_hand_loop_and_empty_label_sets():
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]))
    targets = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0]])  # row 1: an empty label set
    # row 0: -(log 2/10 + log 4/10) / 2; row 1 left out of the mean
    expected = -(math.log(0.2) + math.log(0.4)) / 2
    loss = token_classification_loss(logits, targets)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected, abs=1e-6)
    empty = token_classification_loss(logits, torch.zeros_like(targets, dtype=torch.float))
    assert empty.item() == 0.0  # kdexd/virtex #28 gave NaN here
    # loop version over random rows
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 9), (torch.rand(5, 9) < 0.3).float()
    targets[2] = 0
    rows = []
    for b in range(5):
        labels = targets[b].nonzero().flatten().tolist()
        if labels:
            rows.append(-sum(logits[b].log_softmax(-1)[v].item() for v in labels) / len(labels))
    assert token_classification_loss(logits, targets).item() == pytest.approx(
        sum(rows) / len(rows), abs=1e-5)


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


def test_masked_lm_loss_counts_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[0, 5, 0, 2]])
    expected = -(logits[0, 1].log_softmax(-1)[5] + logits[0, 3].log_softmax(-1)[2]) / 2
    assert masked_lm_loss(logits, labels).item() == pytest.approx(expected.item(), abs=1e-6)


# --- (c) the pretexts, config, optimizer -------------------------------------------------------

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
        assert not hasattr(model, "backward_head")


def test_paper_config_is_r50_l1_h2048_with_the_section_3_3_recipe():
    c = Config.paper()
    assert (c.resnet_blocks, c.resnet_width, c.image_size) == ((3, 4, 6, 3), 64, 224)
    assert (c.layers, c.hidden_size, c.heads, c.feedforward_size) == (1, 2048, 32, 8192)
    assert (c.optimizer, c.beta1, c.cnn_lr, c.lr, c.weight_decay) == ("sgd", 0.9, 0.2, 1e-3, 1e-4)
    assert (c.warmup_steps, c.lr_schedule, c.grad_clip, c.batch_size) == (10_000, "cosine", 10.0,
                                                                           256)
    assert (c.max_text_len, c.beam_size, c.pretext) == (30, 5, "bicaptioning")


@pytest.mark.parametrize("overrides, message", [
    (dict(pretext="simclr"), "pretext must be one of"),
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
    cnn_group = by_param[id(model.visual.conv1.weight)]
    assert cnn_group["lr_scale"] * config.lr == pytest.approx(config.cnn_lr)
    assert by_param[id(model.visual.bn1.weight)]["weight_decay"] == config.weight_decay
    assert by_param[id(model.embedding.norm.weight)]["weight_decay"] == 0.0
    assert by_param[id(model.visual_projection.weight)]["lr_scale"] == 1.0
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


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
    config = dataclasses.replace(config, pretext="token_classification")
    metrics = virtex.evaluate(model_for(config), tokenizer, config, world_config, "val", 12)
    assert set(metrics) == {"linear_probe_acc", "linear_probe_acc_random"}


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
