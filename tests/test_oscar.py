"""oscar.py: the input layout and each task's text length, the masking (pre-training and
captioning), the polluted tags, the retrieval pairs, the caption attention mask block by block,
the encoder and heads by task (what fine-tuning loads), the [CLS] reaching the regions, cached
caption decoding against a full recomputation and its length limit, and a tiny model that
overfits each task. The loss math (by hand, loops from the equations) is in
tests/test_losses.py.

In order (README, house style): shapes and masks, the masking checked over many seeded draws with
binomial tolerances (4 standard deviations); the model by composition; causality (what the [CLS]
reaches); equivalence (the cached decoder against the whole sequence re-encoded at every step);
learning. Every model is tiny (D 32, 2 layers) and the file runs in seconds.
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

import oscar
from shared.metrics import recall_at_k
from shared.data import feature_statistics
from tests.region_world import WORLD_CONFIG, one_thread, tokenizer, world  # noqa: F401
from shared.world import World

IGNORE, PAD = oscar.IGNORE, oscar.PAD_ID
CLS, SEP, MASK = 2, 3, 4  # shared.tokenizer
def small(**overrides) -> oscar.Config:
    base = dict(hidden_size=32, layers=2, heads=2, intermediate_size=64, dropout=0.0,
                vocab_size=200, max_text_len=36, max_retrieval_text_len=36,
                max_vqa_text_len=36, max_caption_len=24, max_tag_len=12,
                n_regions=10, feature_dim=16, batch_size=8, eval_pairs=8, max_gen_len=8,
                standardise_features=True, image_size=64, init_std=0.1)  # tiny's init
    return oscar.Config(**{**base, **overrides})


def batch_of(world, tokenizer, config, n=8, start=0):
    dataset = oscar.OscarDataset(world, tokenizer, config)
    return oscar.collate_fn([dataset[i] for i in range(start, start + n)])


# --- the input and the config --------------------------------------------------------------------

def test_text_pair_worked_example_and_truncation_from_the_longer():
    tokens, segments = oscar.text_pair([7, 8, 9], [5, 6], 7, CLS, SEP)
    assert tokens == [CLS, 7, 8, SEP, 5, 6, SEP]
    assert segments == [0, 0, 0, 0, 1, 1, 1]
    tokens, _ = oscar.text_pair([1, 2], [3, 4, 5, 6, 7], 7, CLS, SEP)  # 4 pieces fit: the tags
    assert (tokens[1:3], tokens[4:6]) == ([1, 2], [3, 4])  # are longer, so they shrink
    tokens, segments = oscar.text_pair([7, 8, 9], None, 7, CLS, SEP)  # use_tags False
    assert tokens == [CLS, 7, 8, 9, SEP] and set(segments) == {0}


def test_text_pair_ties_drop_from_the_tags_as_the_code():
    """[code] _truncate_seq_pair pops from the caption only when it is strictly longer."""
    tokens, segments = oscar.text_pair([7, 8], [5, 6], 6, CLS, SEP)  # 3 fit, a 2-2 tie
    assert tokens == [CLS, 7, 8, SEP, 5, SEP] and segments == [0, 0, 0, 0, 1, 1]
    tokens, _ = oscar.text_pair([1, 2, 3], [4, 5, 6], 7, CLS, SEP)  # tie, then caption longer
    assert tokens == [CLS, 1, 2, SEP, 4, 5, SEP]


def test_each_task_cuts_its_text_to_its_own_length(world, tokenizer):
    """Pre-training 35, retrieval 70, VQA 128 [code]; the dataset and the evaluation pairs cut
    [CLS] text [SEP] tags [SEP] to the task's length, and one position table covers them all."""
    paper = oscar.Config.paper()
    assert {task: dataclasses.replace(paper, task=task).text_len()
            for task in ("pretrain", "retrieval", "vqa")} == {"pretrain": 35, "retrieval": 70,
                                                              "vqa": 128}
    lengths = dict(max_text_len=36, max_retrieval_text_len=36, max_vqa_text_len=36)
    examples = [world.example(i) for i in range(8)]
    regions, region_mask = oscar.region_batch(examples, small(), world.config, "cpu")
    for task, field in [("pretrain", "max_text_len"), ("retrieval", "max_retrieval_text_len"),
                        ("vqa", "max_vqa_text_len")]:
        config = small(task=task, **{**lengths, field: 9})
        assert batch_of(world, tokenizer, config)["tokens"].shape[1] == 9
        texts = [ex["captions"][0] for ex in examples]
        pairs = oscar.pair_batch(tokenizer, config, texts, list(range(8)), examples, regions,
                                 region_mask)
        assert pairs["tokens"].shape[1] == 9
        other = small(task=task, **{**lengths, field: 30})
        assert batch_of(world, tokenizer, other)["tokens"].shape[1] > 9  # the others stay 36
    model = oscar.build_model(small(max_vqa_text_len=50))
    assert model.encoder.text_embeddings.position.num_embeddings == 50


def test_the_paper_preset_has_oscar_s_own_settings_and_tiny_keeps_its_own():
    """paper(): [code]'s pre-training defaults (no region LayerNorm, no clipping, no warmup),
    not the VinVL command's (region LayerNorm, clip 10); tiny and small keep region LayerNorm
    and clipping at 1 (OURS)."""
    paper = oscar.Config.paper()
    assert (paper.region_layer_norm, paper.grad_clip, paper.warmup_steps) == (False, 0.0, 0)
    for preset in (oscar.Config.tiny(), oscar.Config.small()):
        assert (preset.region_layer_norm, preset.grad_clip) == (True, 1.0)
    sizes = dict(hidden_size=32, layers=1, heads=2, intermediate_size=64, vocab_size=200)
    assert isinstance(oscar.build_model(dataclasses.replace(paper, **sizes)).encoder.region_norm,
                      torch.nn.Identity)


def test_region_vectors_append_the_six_box_numbers():
    features = torch.randn(3, 5)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.4, 0.6]])
    v = oscar.region_vectors(features, boxes)
    assert v.shape == (3, 5 + oscar.BOX_DIM)
    assert torch.equal(v[:, :5], features) and torch.equal(v[:, 5:9], boxes)
    assert torch.allclose(v[0, 9:], torch.tensor([0.4, 0.7]))  # w, h


def test_config_rejects_bad_values_in_one_line():
    with pytest.raises(ValueError, match="task must be one of"):
        small(task="nlvr2")
    with pytest.raises(ValueError, match="max_caption_len >= max_gen_len"):
        small(max_caption_len=10, max_gen_len=9)


# --- masking -------------------------------------------------------------------------------------

def test_mask_tokens_statistics_and_specials_never_masked():
    rng = np.random.default_rng(0)
    tokens = [CLS] + list(range(10, 30)) + [SEP] + list(range(40, 45)) + [SEP]
    maskable = [t not in (CLS, SEP) for t in tokens]
    chosen = masked = kept = 0
    n_draws = 3000
    for _ in range(n_draws):
        out, labels = oscar.mask_tokens(tokens, maskable, rng, 0.15, MASK, (5, 200))
        for i, (o, lab) in enumerate(zip(out, labels)):
            if not maskable[i]:
                assert lab == IGNORE and o == tokens[i]
            elif lab != IGNORE:
                assert lab == tokens[i]
                chosen += 1
                masked += o == MASK
                kept += o == tokens[i]
            else:
                assert o == tokens[i]
    n = n_draws * sum(maskable)
    assert abs(chosen / n - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)
    assert abs(masked / chosen - 0.8) < 4 * math.sqrt(0.8 * 0.2 / chosen)
    # 10 % kept on purpose, plus a random id that happened to equal the token (1/195 of 10 %)
    assert abs(kept / chosen - 0.1005) < 4 * math.sqrt(0.1 * 0.9 / chosen)


def test_random_replacements_are_never_special_ids(world, tokenizer):
    """The 10 % random branch draws past the special ids: a drawn [PAD] would become padding
    (attention masks are tokens != [PAD]). Masking 90 % makes many draws; no drawn input (a
    labelled position neither [MASK] nor kept) is [PAD], [UNK], [CLS] or [SEP]."""
    specials = torch.tensor([PAD, 1, CLS, SEP])
    for config in (small(mask_prob=0.9), small(task="caption", caption_mask_prob=0.9,
                                               max_caption_masked=30)):
        dataset = oscar.OscarDataset(world, tokenizer, config)
        for i in range(300):
            item = dataset[i]
            tokens = item["caption" if config.task == "caption" else "tokens"]
            labels = item["mlm_labels"]
            drawn = (labels != IGNORE) & (tokens != MASK) & (tokens != labels)
            assert not torch.isin(tokens[drawn], specials).any(), (config.task, i)
            assert (tokens != PAD).all()
        assert dataset.random_ids == (5, tokenizer.vocab_size)


@pytest.mark.parametrize("length, expected", [(2, 1), (4, 1), (7, 1), (10, 2), (12, 2),
                                              (17, 3), (30, 3), (100, 3)])
def test_caption_masked_count_formula(length, expected):
    # min(max(round(0.15 * len), 1), 3): 0.15 * 10 = 1.5 -> 2 (round half to even), 0.15 * 7
    # = 1.05 -> 1, 0.15 * 17 = 2.55 -> 3
    assert oscar.caption_masked_count(length) == expected


def test_caption_mask_positions_never_cls_and_the_final_sep_can_be_chosen():
    rng = np.random.default_rng(0)
    length = 6  # [CLS] w w w w [SEP]: 1 position
    counts = np.zeros(length)
    for _ in range(2000):
        positions = oscar.caption_mask_positions(length, rng)
        assert len(positions) == oscar.caption_masked_count(length)
        counts[positions] += 1
    assert counts[0] == 0  # [CLS] never
    assert counts[length - 1] > 0  # the stop token is learned
    expected = 2000 / (length - 1)  # uniform over 1 .. length - 1
    assert np.all(np.abs(counts[1:] - expected) < 4 * math.sqrt(expected))


# --- the caption attention mask ------------------------------------------------------------------

def test_caption_attention_mask_four_blocks_and_padding():
    caption_real = torch.tensor([[True, True, True, False]])  # C = 4, one padded slot
    context_real = torch.tensor([[True, True, False, True, True]])  # K = 5, one padded
    m = oscar.caption_attention_mask(caption_real, context_real)[0]  # (9, 9)
    C = 4
    cap, ctx = m[:C, :C], m[:C, C:]
    # caption -> caption: causal over the real caption tokens
    assert torch.equal(cap[:3, :3], torch.ones(3, 3, dtype=torch.bool).tril())
    # caption -> context: every real tag and region
    assert torch.equal(ctx[:3], context_real.expand(3, 5))
    # context -> caption: never
    assert not m[C:, :C].any()
    # context -> context: real to real
    real = context_real[0]
    assert torch.equal(m[C:, C:], real[:, None] & real[None, :])
    # padding: no row, no column
    assert not m[3].any() and not m[:, 3].any() and not m[C + 2].any() and not m[:, C + 2].any()


# --- the data: polluted tags, batches ------------------------------------------------------------

def test_polluted_tags_come_from_another_image(world, tokenizer):
    config = small()
    dataset = oscar.OscarDataset(world, tokenizer, config)
    n_polluted = 0
    for i in range(300):
        item = dataset[i]
        index = i % len(world)
        tag_ids = item["tokens"][item["segments"] == 1][:-1]  # without the final [SEP]
        if item["polluted"]:
            n_polluted += 1
            assert item["source"] != index
            donor = " ".join(world.example(item["source"])["tags"])
            expected = tokenizer.encode(donor, add_special=False)
        else:
            assert item["source"] == index
            expected = tokenizer.encode(" ".join(world.example(index)["tags"]),
                                        add_special=False)
        unmasked = item["tokens"].clone()  # undo the masking where a label says what it was
        labels = item["mlm_labels"]
        unmasked[labels != IGNORE] = labels[labels != IGNORE]
        seen = unmasked[item["segments"] == 1][:-1].tolist()
        assert seen == expected[:len(seen)] and len(tag_ids) == len(seen)
    assert abs(n_polluted / 300 - 0.5) < 4 * math.sqrt(0.25 / 300)


def test_pollute_with_captions_is_the_code_quirk(world, tokenizer):
    config = small(pollute_with_captions=True, pollute_prob=1.0)
    dataset = oscar.OscarDataset(world, tokenizer, config)
    captions = 0
    for i in range(200):
        item = dataset[i]
        donor = world.example(item["source"])
        tags = tokenizer.encode(" ".join(donor["tags"]), add_special=False)
        unmasked = item["tokens"].clone()
        unmasked[item["mlm_labels"] != IGNORE] = item["mlm_labels"][item["mlm_labels"] != IGNORE]
        seen = unmasked[item["segments"] == 1][:-1].tolist()
        captions += seen != tags[:len(seen)] or len(seen) == 0
    assert 60 < captions < 140  # about half are the donor's caption, not its tags


def test_use_tags_false_has_no_tags_and_pollutes_the_image(world, tokenizer):
    config = small(use_tags=False)
    dataset = oscar.OscarDataset(world, tokenizer, config)
    statistics = feature_statistics(world.config)
    for i in range(40):
        item = dataset[i]
        assert not (item["segments"] == 1).any()
        assert (item["tokens"] == SEP).sum() == 1
        source = world.example(item["source"])
        assert torch.allclose(item["regions"], oscar.region_inputs(source, config, statistics))


def test_collate_flat_positions_pick_the_labelled_tokens(world, tokenizer):
    config = small()
    dataset = oscar.OscarDataset(world, tokenizer, config)
    items = [dataset[i] for i in range(8)]
    batch = oscar.collate_fn(items)
    T = batch["tokens"].shape[1]
    for p, target in zip(batch["mlm_positions"].tolist(), batch["mlm_targets"].tolist()):
        b, t = divmod(p, T)
        assert items[b]["mlm_labels"][t] == target
    assert len(batch["mlm_positions"]) == sum((it["mlm_labels"] != IGNORE).sum() for it in items)


def test_caption_batch_layout(world, tokenizer):
    config = small(task="caption")
    batch = batch_of(world, tokenizer, config)
    C = batch["caption_len"]
    assert (batch["tokens"][:, 0] == CLS).all()
    assert torch.equal(batch["positions"][0, C:],
                       config.max_caption_len + torch.arange(batch["tokens"].shape[1] - C))
    flat = batch["tokens"][:, :C].flatten()
    assert len(batch["mlm_positions"]) >= 8  # at least one per caption
    assert not (batch["mlm_positions"] % C == 0).any()  # [CLS] never
    assert (flat[batch["mlm_positions"]] != CLS).all()


def test_retrieval_items_are_an_aligned_pair_then_its_unaligned_pair(world, tokenizer):
    """[Oscar §4]: "Given an aligned image-text pair, we randomly select a different image or a
    different caption to form an unaligned pair"; [code] returns both from one item. Items 2k
    and 2k + 1 are example k's positive and its negative: exactly half are negatives, and a
    negative keeps the positive's image (another caption) or its caption (another image)."""
    dataset = oscar.OscarDataset(world, tokenizer, small(task="retrieval"))
    kinds = {"caption": 0, "image": 0}
    for k in range(100):
        positive, negative = dataset[2 * k], dataset[2 * k + 1]
        assert positive["is_match"] and not negative["is_match"]
        example = world.example(k)
        assert torch.allclose(positive["regions"],
                              oscar.region_inputs(example, small(), dataset.statistics))
        same_image = torch.equal(positive["regions"], negative["regions"])
        text = lambda item: item["tokens"][item["segments"] == 0].tolist()  # [CLS] caption [SEP]
        assert same_image or text(positive) == text(negative)
        kinds["caption" if same_image else "image"] += 1
    assert 30 < kinds["caption"] < 70  # each kind with probability 1/2
    batch = batch_of(world, tokenizer, small(task="retrieval"))
    assert batch["is_match"].tolist() == [True, False] * 4
    assert len(dataset) == 2 * len(world) // 8 * 8  # every example's pair once


# --- the model: one encoder, one head per task ---------------------------------------------------

def test_the_mlm_head_is_tied_to_the_word_embeddings():
    model = oscar.build_model(small())
    hidden = torch.randn(5, 32)
    head = model.heads["mlm"]
    expected = head.transform(hidden) @ model.encoder.text_embeddings.word.weight.T + head.bias
    assert torch.allclose(model.mlm_logits(hidden), expected, atol=1e-6)
    assert not any("word" in k for k in model.heads.state_dict())  # tied, not a copy


def test_the_retrieval_head_drops_out_the_pooled_cls_as_the_code():
    """[code] ImageBertForSequenceClassification: dropout(pooled) -> classifier, for retrieval
    as for VQA; identical in eval mode."""
    model = oscar.build_model(small(task="retrieval", dropout=0.5)).train()
    head, pooled = model.heads["retrieval"], torch.randn(16, 32)
    torch.manual_seed(0)
    assert not torch.equal(head(pooled), head(pooled))
    model.eval()
    assert torch.equal(head(pooled), head.classifier(pooled))
    assert head.dropout.p == 0.5


def test_the_encoder_is_the_same_for_every_task_and_the_heads_are_named_by_task():
    keys = {}
    for task in oscar.TASKS:
        state = oscar.build_model(small(task=task)).state_dict()
        keys[task] = {k for k in state if not k.startswith("heads.")}
        assert {k.split(".")[1] for k in state if k.startswith("heads.")} \
            == set(oscar.TASK_HEADS[task])
    assert all(keys[task] == keys["pretrain"] for task in oscar.TASKS)
    assert all(k.startswith("encoder.") for k in keys["pretrain"])
    assert oscar.TASK_HEADS == {"pretrain": ("mlm", "contrastive"), "caption": ("mlm",),
                                "retrieval": ("retrieval",), "vqa": ("vqa",)}


@pytest.mark.parametrize("task, fresh", [("pretrain", []), ("caption", []),
                                         ("retrieval", ["retrieval"]), ("vqa", ["vqa"])])
def test_fine_tuning_from_pretraining_loads_the_encoder_and_the_mlm_head(task, fresh):
    """shared.checkpoint.load_weights, as train.py --init: the encoder always, the MLM head for
    captioning (same name), the retrieval and VQA heads fresh: what the strict=False load of
    the layout before heads-by-composition transferred."""
    from shared.checkpoint import load_weights

    torch.manual_seed(0)
    pretrained = oscar.build_model(small()).state_dict()
    model = oscar.build_model(small(task=task))
    assert load_weights(model, pretrained) == fresh
    for k, v in model.state_dict().items():
        if k.startswith("encoder.") or k.startswith("heads.mlm."):
            assert torch.equal(v, pretrained[k]), k


def test_caption_to_pretrain_leaves_the_contrastive_head_fresh_another_encoder_fails():
    from shared.checkpoint import CheckpointError, load_weights

    caption = oscar.build_model(small(task="caption")).state_dict()
    assert load_weights(oscar.build_model(small()), caption) == ["contrastive"]
    with pytest.raises(CheckpointError, match=r"\(200, 32\), the model's is \(200, 64\)"):
        load_weights(oscar.build_model(small(hidden_size=64)), caption)
    with pytest.raises(CheckpointError, match="does not fit this model: it lacks"):
        load_weights(oscar.build_model(small(layers=3)), caption)


def test_the_model_calls_the_composite_objective(world, tokenizer, monkeypatch):
    """forward's loss is oscar.pretraining_loss of its two terms (L_MTL + L_C, Eq. 4): replace
    the function and the loss moves with it."""
    torch.manual_seed(0)
    model = oscar.build_model(small())
    batch = batch_of(world, tokenizer, small())
    out = model(batch)
    assert torch.allclose(out["loss"], out["mtl"] + out["contrastive"])
    monkeypatch.setattr(oscar, "pretraining_loss", lambda mtl, contrastive: mtl + 2 * contrastive)
    out = model(batch)
    assert torch.allclose(out["loss"], out["mtl"] + 2 * out["contrastive"])


def test_the_contract_names():
    assert oscar.TASKS[0] == "pretrain" and set(oscar.MAIN_METRIC) == set(oscar.TASKS)
    assert oscar.INPUTS == "regions" and set(oscar.BERT_INIT) == {"mlm", "contrastive"}
    for preset in (oscar.Config.paper, oscar.Config.small, oscar.Config.tiny):
        assert preset().task == "pretrain"
    model = oscar.build_model(small())
    optimizer = oscar.make_optimizer(model, small(weight_decay=0.05))
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(model.encoder.region_embedding.weight)] == 0.05
    assert decays[id(model.heads["mlm"].bias)] == 0.0
    assert len(decays) == len(list(model.parameters()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert oscar.after_optimizer_step(model) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_bert_checkpoint_fills_the_encoder(tmp_path):
    """train.py --init_bert calls shared.bert.load_bert_encoder(model.encoder, folder)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from shared.bert import load_bert_encoder

    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path)
    model = oscar.build_model(small())
    head = model.heads["mlm"].transform.dense.weight.clone()
    assert load_bert_encoder(model.encoder, tmp_path) == 2 * 16 + 7
    assert torch.equal(model.encoder.text_embeddings.word.weight,
                       bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.encoder.layers[1].mlp.fc2.weight,
                       bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(model.heads["mlm"].transform.dense.weight, head)  # heads keep theirs


# --- causality: what the [CLS] reaches -----------------------------------------------------------

def test_cls_attention_reaches_the_regions(world, tokenizer):
    """With tags (pre-training layout) and under the caption mask, the [CLS] output depends on
    the region features: the masks let it attend to them."""
    torch.manual_seed(0)
    for task in ("pretrain", "caption"):
        config = small(task=task)
        model = oscar.build_model(config)
        batch = batch_of(world, tokenizer, config, n=2)
        regions = batch["regions"].clone().requires_grad_(True)
        allowed = None
        if task == "caption":
            C = batch["caption_len"]
            allowed = oscar.caption_attention_mask(
                batch["tokens"][:, :C] != PAD,
                torch.cat([batch["tokens"][:, C:] != PAD, batch["region_mask"]], dim=1))
            assert allowed[:, 0, -regions.shape[1]:][batch["region_mask"]].all()
        h = model.encoder(batch["tokens"], batch["segments"], batch["positions"], regions,
                          batch["region_mask"], allowed)
        # a random direction: a LayerNorm output's plain sum is constant (0), its gradient too
        (h[:, 0] * torch.randn(h.shape[-1])).sum().backward()
        reached = regions.grad.abs().sum(-1)  # (B, N)
        assert (reached[batch["region_mask"]] > 0).all()
        assert (reached[~batch["region_mask"]] == 0).all()


# --- equivalence: cached decoding against a full recomputation -----------------------------------

def _full_next_logits(model, caption, tags, regions, region_mask, config):
    """The slow way: the whole [caption [MASK] ; tags ; regions] through encode with the caption
    mask, as in training; the logits read at [MASK]."""
    query = torch.cat([caption, torch.full((len(caption), 1), MASK)], dim=1)  # (B, t + 1)
    B, t = query.shape
    L = tags.shape[1]
    tokens = torch.cat([query, tags], dim=1)
    segments = torch.cat([torch.zeros_like(query), torch.ones_like(tags)], dim=1)
    positions = torch.cat([torch.arange(t), config.max_caption_len + torch.arange(L)])
    allowed = oscar.caption_attention_mask(query != PAD,
                                           torch.cat([tags != PAD, region_mask], dim=1))
    h = model.encoder(tokens, segments, positions.expand(B, -1), regions, region_mask, allowed)
    return model.mlm_logits(h[:, t - 1])  # (B, V)


def test_cached_greedy_decoding_equals_full_recomputation(world, tokenizer):
    torch.manual_seed(0)
    config = small(task="caption", init_std=0.1)
    model = oscar.build_model(config).eval()
    test = World(WORLD_CONFIG, "test")
    examples = [test.example(i) for i in range(4)]
    with torch.no_grad():
        fast = oscar.caption(model, tokenizer, config, examples, WORLD_CONFIG, beam_size=1)
        regions, region_mask = oscar.region_batch(examples, config, WORLD_CONFIG, "cpu")
        tags = oscar.pad_sequences([torch.tensor(
            tokenizer.encode(" ".join(ex["tags"]), add_special=False)[:config.max_tag_len - 1]
            + [SEP]) for ex in examples])
        caption = torch.full((4, 1), CLS)
        done = torch.zeros(4, dtype=torch.bool)
        for _ in range(config.max_gen_len - 1):  # greedy, re-encoding everything every step
            logits = _full_next_logits(model, caption, tags, regions, region_mask, config)
            # and the cached step gives the same logits
            states, real = model.context_states(
                tags, config.max_caption_len + torch.arange(tags.shape[1]), regions, region_mask)
            query = torch.cat([caption, torch.full((4, 1), MASK)], dim=1)
            cached = model.caption_logits(query, states, real)[:, -1]
            assert torch.allclose(cached, logits, atol=1e-4)
            nxt = torch.where(done, torch.full((4,), PAD), logits.argmax(-1))
            caption = torch.cat([caption, nxt[:, None]], dim=1)
            done |= nxt == SEP
    slow = [t.lower() for t in tokenizer.decode_batch(caption)]
    assert fast == slow


@pytest.mark.parametrize("beam_size, cached", [(1, True), (1, False), (2, True)])
def test_a_caption_is_at_most_max_gen_len_tokens_with_the_cls(tokenizer, beam_size, cached):
    """[code] max_gen_length 20 counts [CLS] and a caption unfinished there ends with [SEP] over
    its last word: at most 18 words. A model that always writes "circle" (never [SEP]) writes
    max_gen_len - 2 of them greedily, no more with beams."""
    torch.manual_seed(0)
    config = small(task="caption", max_gen_len=8)
    model = oscar.build_model(config).eval()
    with torch.no_grad():
        model.heads["mlm"].bias[tokenizer.token_to_id("circle")] = 1e4
    examples = [World(WORLD_CONFIG, "test").example(i) for i in range(2)]
    with torch.no_grad():
        captions = oscar.caption(model, tokenizer, config, examples, WORLD_CONFIG,
                                 beam_size=beam_size, cached=cached)
    for text in captions:
        assert set(text.split()) == {"circle"}
        n_words = len(text.split())
        assert (n_words == 6) if beam_size == 1 else (1 <= n_words <= 6), (text, beam_size)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_caching_the_caption_rows_gives_the_same_tokens_and_log_probs(tokenizer, method):
    """Oscar.caption_step (two rows a step, the earlier rows cached) against caption_logits
    (every row every step), through shared.decoding's greedy and beam search."""
    from shared import decoding

    torch.manual_seed(0)
    config = small(task="caption", max_gen_len=10)
    model = oscar.build_model(config).eval()
    test = World(WORLD_CONFIG, "test")
    examples = [test.example(i) for i in range(6)]
    regions, region_mask = oscar.region_batch(examples, config, WORLD_CONFIG, "cpu")
    tags = oscar.pad_sequences([torch.tensor(
        tokenizer.encode(" ".join(ex["tags"]), add_special=False)[:config.max_tag_len - 1]
        + [SEP]) for ex in examples])
    prefix = torch.full((6, 1), CLS)
    results = []
    with torch.no_grad():
        states, real = model.context_states(
            tags, config.max_caption_len + torch.arange(tags.shape[1]), regions, region_mask)
        for cached in (True, False):
            step = oscar.caption_step_fn(model, tokenizer, states, real, cached)
            if method == "greedy":
                results.append(decoding.greedy(step, prefix, 1 + config.max_gen_len, SEP))
            else:
                results.append(decoding.beam_search(step, prefix, 1 + config.max_gen_len, SEP,
                                                    beam_size=3, length_penalty=1.0))
    (tokens_a, score_a), (tokens_b, score_b) = results
    assert torch.equal(tokens_a, tokens_b)
    assert torch.allclose(score_a, score_b, atol=1e-4)
    assert tokens_a.shape[1] > 3  # something was generated


def test_prefix_parents_follow_reordered_and_dropped_rows():
    from shared.decoding import PrefixParents

    parents = PrefixParents()
    assert parents(torch.tensor([[2, 5], [2, 6], [2, 5]]), torch.tensor([0, 0, 1])) is None
    index = parents(torch.tensor([[2, 6, 9], [2, 5, 7], [2, 5, 8]]), torch.tensor([0, 1, 0]))
    assert index.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="does not extend"):
        parents(torch.tensor([[3, 3, 3, 3]]), torch.tensor([0]))


# --- evaluation ----------------------------------------------------------------------------------

def test_evaluate_reports_each_task_s_keys(tokenizer):
    keys = {"pretrain": {"i2t_r1", "t2i_r1", "r1_mean", "mtl_acc", "contrastive_acc",
                         "own_called_polluted", "foreign_caption_called_polluted"},
            "retrieval": {"i2t_r1", "t2i_r1"},
            "caption": {"caption_truth", "caption_truth_baseline", "cider", "bleu4", "rouge_l"},
            "vqa": {"vqa_acc", "vqa_acc_count"}}
    for task, expected in keys.items():
        config = small(task=task, beam_size=2)
        model = oscar.build_model(config)
        metrics = oscar.evaluate(model, tokenizer, config, WORLD_CONFIG, "test", 8)
        assert expected <= set(metrics), (task, metrics)
        assert all(0 <= v <= 10 for v in metrics.values())


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_evaluate_ranks_every_caption_of_each_image_with_all_five_as_positives(tokenizer, task):
    """The COCO 1K test ranks 5,000 captions of 1,000 images [Oscar §4]: eval_pairs images and
    ALL their captions, every pair scored; an image is found when any of its five captions ranks
    in the top K. Checked against recall_at_k of pairs scored one at a time."""
    config = small(task=task, eval_pairs=4)
    model = oscar.build_model(config).eval()
    metrics = oscar.evaluate(model, tokenizer, config, WORLD_CONFIG, "val", 20)
    val = World(WORLD_CONFIG, "val")
    examples = [val.example(i) for i in range(4)]
    captions = [c for ex in examples for c in ex["captions"]]
    assert len(captions) == 20
    with torch.no_grad():
        scores = torch.stack([torch.cat([oscar.retrieval_scores(
            model, tokenizer, config, [image], WORLD_CONFIG, [caption])[0]
            for caption in captions]) for image in examples])  # (4, 20), one pair a call
    expected = recall_at_k(scores, torch.arange(4).repeat_interleave(5))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    if task == "pretrain":  # on each image's first caption (columns 0, 5, 10, 15)
        first = scores[:, ::5]
        assert metrics["own_called_polluted"] == pytest.approx(
            (first.diagonal() < 0).float().mean().item())
        assert metrics["foreign_caption_called_polluted"] == pytest.approx(
            (first.roll(-1, 1).diagonal() < 0).float().mean().item())


def test_contrastive_accuracy_of_a_head_that_always_says_polluted(tokenizer):
    config = small()
    model = oscar.build_model(config).eval()
    with torch.no_grad():
        model.heads["contrastive"].bias.copy_(torch.tensor([-1e4, 1e4]))  # always "polluted"
    test = World(WORLD_CONFIG, "test")
    with torch.no_grad():
        metrics = oscar.pretraining_accuracy(model, tokenizer, config, test, 40)
    dataset = oscar.OscarDataset(test, tokenizer, config, seed=1)
    share = sum(dataset[i]["polluted"] for i in range(40)) / 40
    assert metrics["contrastive_acc"] == pytest.approx(share)
    assert 0 <= metrics["mtl_acc"] <= 1


# --- learning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, term", [("pretrain", "mtl"), ("caption", "caption"),
                                        ("retrieval", "retrieval"), ("vqa", "vqa")])
def test_a_tiny_model_overfits_one_batch(world, tokenizer, task, term):
    torch.manual_seed(0)
    config = small(task=task)
    model = oscar.build_model(config)
    batch = batch_of(world, tokenizer, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    first = model(batch)[term].item()
    for _ in range(200):
        losses = model(batch)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    if task == "vqa":  # BCE over every answer falls slowly; the answers must all be right
        logits = model.answer_logits(batch)
        assert torch.equal(logits.argmax(-1), batch["answer_scores"].argmax(-1))
        assert losses[term].item() < 0.2 * first, (first, losses[term].item())
    else:
        assert losses[term].item() < 0.1 * first, (first, losses[term].item())
    if task == "pretrain":
        assert losses["contrastive"].item() < 0.1


def test_init_bert_starts_the_mlm_and_contrastive_heads_from_bert_pretraining_heads(tmp_path):
    """[code]: starting from BERT, Oscar's MLM head (transform and output bias) is BERT's
    cls.predictions and its contrastive head BERT's next-sentence head cls.seq_relationship;
    a task without those heads (VQA) loads none, and a plain BertModel save fills none."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from shared.bert import load_bert_heads

    bert = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64))
    bert.save_pretrained(tmp_path / "pre")
    model = oscar.build_model(small())
    assert load_bert_heads(model.heads, tmp_path / "pre", oscar.BERT_INIT) == ["mlm",
                                                                               "contrastive"]
    cls = bert.cls
    assert torch.equal(model.heads["mlm"].transform.dense.weight,
                       cls.predictions.transform.dense.weight)
    assert torch.equal(model.heads["mlm"].transform.norm.weight,
                       cls.predictions.transform.LayerNorm.weight)
    assert torch.equal(model.heads["mlm"].bias, cls.predictions.bias)
    assert torch.equal(model.heads["contrastive"].weight, cls.seq_relationship.weight)
    assert load_bert_heads(oscar.build_model(small(task="vqa")).heads, tmp_path / "pre",
                           oscar.BERT_INIT) == []
    transformers.BertModel(bert.config).save_pretrained(tmp_path / "plain")
    assert load_bert_heads(model.heads, tmp_path / "plain", oscar.BERT_INIT) == []


# --- the paper's recipe of each task: Config.paper(task) -----------------------------------------

OSCAR_RECIPES = {  # [Oscar §3, App. A] batch, lr, epochs (as steps: Config.paper); the rest [code]
    "pretrain": dict(batch_size=768, lr=5e-5, max_steps=1_000_000, warmup_steps=0,
                     lr_schedule="linear", weight_decay=0.01, beta1=0.9, beta2=0.999,
                     grad_clip=0.0, grad_accum_steps=1),
    "caption": dict(batch_size=256, lr=3e-5, max_steps=88_520, warmup_steps=0,  # 40 × 2,213
                    lr_schedule="linear", weight_decay=0.05, beta1=0.9, beta2=0.999,
                    grad_clip=1.0, grad_accum_steps=1),
    "retrieval": dict(batch_size=512, lr=2e-5, max_steps=88_520, warmup_steps=0,  # 256 items
                      lr_schedule="linear", weight_decay=0.05, beta1=0.9, beta2=0.999,
                      grad_clip=1.0, grad_accum_steps=1),  # of 2 pairs; 40 × 2,213 steps
    "vqa": dict(batch_size=128, lr=5e-5, max_steps=126_500, warmup_steps=0,  # 25 × 5,060
                lr_schedule="linear", weight_decay=0.05, beta1=0.9, beta2=0.999,
                grad_clip=1.0, grad_accum_steps=1),
}


@pytest.mark.parametrize("task", sorted(OSCAR_RECIPES))
def test_paper_gives_each_task_the_papers_recipe_and_the_same_model(task):
    """Config.paper(task): the task and its recipe (COCO, Oscar-B: batch, lr, epochs of
    [Oscar App. A]; the rest [code]), a valid Config; every other field is pre-training's."""
    from shared.config import RECIPE

    assert set(OSCAR_RECIPES) == set(oscar.TASKS)
    c = oscar.Config.paper(task)
    assert oscar.config_problems(c) == [] and c.task == task
    assert {name: getattr(c, name) for name in OSCAR_RECIPES[task]} == OSCAR_RECIPES[task]
    assert c.batch_size % c.grad_accum_steps == 0
    pretrain = dataclasses.asdict(oscar.Config.paper())
    assert {k: v for k, v in dataclasses.asdict(c).items() if k not in RECIPE} == \
        {k: v for k, v in pretrain.items() if k not in RECIPE}
    assert -(-113_287 * 5 // 256) * 40 == 88_520  # COCO Karpathy train, 40 epochs at 256
    assert -(-647_600 // 128) * 25 == 126_500  # VQA v2 train + val less 2k images, 25 epochs
    with pytest.raises(ValueError, match="no paper recipe"):
        oscar.Config.paper("nlvr2")


def test_train_paper_preset_takes_the_tasks_recipe_also_from_a_checkpoint():
    """train.py --preset paper --task vqa: the VQA recipe; with --init, setup keeps the
    checkpoint's model (every field but shared.config.RECIPE) and takes the recipe of --task
    from the preset, as train.setup calls make_config: caption gets captioning's lr."""
    import train
    from shared.config import RECIPE

    vqa = train.make_config(oscar, "paper", {"task": "vqa"})
    assert (vqa.task, vqa.batch_size, vqa.lr, vqa.max_steps, vqa.weight_decay, vqa.grad_clip) \
        == ("vqa", 128, 5e-5, 126_500, 0.05, 1.0)
    saved = dataclasses.asdict(dataclasses.replace(  # a pre-training checkpoint's config
        oscar.Config.paper(), hidden_size=384, layers=6, heads=6, intermediate_size=1536))
    kept = {k: v for k, v in saved.items() if k not in RECIPE}
    caption = train.make_config(oscar, "paper", {**kept, "task": "caption"})
    assert (caption.lr, caption.batch_size, caption.max_steps) == (3e-5, 256, 88_520)
    assert (caption.hidden_size, caption.layers, caption.heads) == (384, 6, 6)
    for task in ("caption", "retrieval", "vqa"):
        c = train.make_config(oscar, "paper", {**kept, "task": task})
        assert {k: getattr(c, k) for k in RECIPE if hasattr(c, k)} == \
            {k: getattr(oscar.Config.paper(task), k) for k in RECIPE if hasattr(c, k)}


def test_end_unfinished_writes_sep_over_the_last_word_of_a_caption_at_the_limit():
    tokens = torch.tensor([[CLS, 7, 8, 9], [CLS, 7, SEP, PAD], [CLS, 7, 8, SEP]])
    assert oscar.end_unfinished(tokens, SEP, 4).tolist() == [
        [CLS, 7, 8, SEP], [CLS, 7, SEP, PAD], [CLS, 7, 8, SEP]]
    assert oscar.end_unfinished(tokens[:, :3], SEP, 4).tolist() == tokens[:, :3].tolist()
