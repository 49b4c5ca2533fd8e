"""uniter.py: the Config (presets, validation), the Image Embedder's 7-d region location
[UNITER §3.1, fn. 3], the masking, task sampler, data, model, heads and downstream evaluation, in
the order (c) shapes and masks, (b) equivalence, (d) learning (README, house style; the loss
maths, (a), is tests/test_losses.py).

(c) the presets and the Config's checks; the region location worked by hand; masking statistics
    and the task mix over many seeded draws with binomial tolerances (4 standard deviations),
    one task per update, conditional masking, the collate's flat positions, the Image Embedder
    (the paper's one LayerNorm or [code]'s three; its mask vector), padding invariance, the
    optimizer's groups, the contract, the encoder's state the same for every task and
    fine-tuning from pre-training;
(b) the model's losses against the tied heads written out, the rank forward against a loop,
    evaluate (every image against all captions) against its by-hand version;
(d) a tiny model that overfits each task, an ITM model that needs the image.
Every model is tiny (D 32, 2 layers) and the whole file runs in seconds on a laptop CPU.
"""

import copy
import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import uniter

from shared.checkpoint import load_weights
from shared.data import feature_statistics
from shared.metrics import recall_at_k
from shared.tokenizer import Tokenizer
from tests.region_world import WORLD_CONFIG, one_thread, tokenizer, world  # noqa: F401
from shared.world import ANSWERS, DETECTOR_CLASSES, World, WorldConfig, question_type

IGNORE = uniter.IGNORE
PAD_ID = uniter.PAD_ID
SPECIAL = {0, 1, 2, 3, 4}  # shared.tokenizer: [PAD], [UNK], [CLS], [SEP], [MASK]
CLS, SEP, UNK, MASK = 2, 3, 1, 4
def only(task: str) -> dict:
    """Config overrides that make every pre-training update `task`."""
    return {f"mix_{t}": float(t == task) for t in uniter.PRETRAIN_TASKS}


def small_config(tokenizer: Tokenizer, **overrides) -> uniter.Config:
    """A UNITER of a few ten thousand parameters on the world's 16-d regions. min_regions 3
    lets the number of kept regions vary (3..10) from image to image."""
    base = dict(hidden_size=32, layers=2, heads=2, intermediate_size=64, dropout=0.0,
                vocab_size=tokenizer.vocab_size, max_text_len=24, feature_dim=16, n_regions=10,
                min_regions=3, batch_size=8, grad_accum_steps=2, eval_pairs=8,
                hard_negatives=2, standardise_features=False)
    return dataclasses.replace(uniter.Config.tiny(), **{**base, **overrides})


def tiny_model(config: uniter.Config, seed: int = 0) -> uniter.UNITER:
    torch.manual_seed(seed)
    return uniter.build_model(config)


def dataset_batch(world, tokenizer, config: uniter.Config, start: int = 0, B: int = 8,
                  seed: int = 0) -> tuple[dict, list[dict]]:
    """(collated batch, its items): items start .. start + B - 1 of a dataset."""
    ds = uniter.UniterDataset(world, tokenizer, config, seed=seed)
    items = [ds[start + b] for b in range(B)]
    return uniter.collate_fn(items), items


def items_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def binomial_tolerance(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# --- (c) the Config: presets and checks ----------------------------------------------------------

def test_presets_are_valid_and_paper_is_uniter_base_with_the_official_recipe():
    for preset in (uniter.Config.paper, uniter.Config.small, uniter.Config.tiny):
        config = preset()
        for name in ("batch_size", "lr", "weight_decay", "beta1", "beta2", "warmup_steps",
                     "max_steps", "lr_schedule", "grad_clip", "grad_accum_steps",
                     "train_single_object_prob", "image_size", "max_text_len", "vocab_size",
                     "n_regions", "feature_dim"):  # what train.py reads
            assert hasattr(config, name), (preset.__name__, name)
    c = uniter.Config.paper()
    assert (c.hidden_size, c.layers, c.heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert (c.feature_dim, c.min_regions, c.n_regions, c.n_region_classes) == (2048, 10, 100, 1601)
    assert (c.beta1, c.beta2, c.lr, c.warmup_steps, c.lr_schedule) == \
        (0.9, 0.98, 5e-5, 10_000, "linear")
    assert (c.grad_clip, c.adam_eps) == (5.0 / 6, 1e-6 / 6)  # [code]'s 5 and 1e-6 on the sum
    assert (c.mix_mlm, c.mix_itm, c.mix_mrfr, c.mix_mrc_kl, c.mix_mrc) == (4, 3, 2, 2, 0)
    assert (c.wra_weight, c.ipot_beta, c.ipot_iters, c.ipot_inner) == (0.1, 0.5, 50, 1)
    tiny, world = uniter.Config.tiny(), WorldConfig()
    assert (tiny.feature_dim, tiny.n_regions, tiny.image_size) == \
        (world.feature_dim, world.n_regions, 64)  # the world's default regions
    assert tiny.n_region_classes == len(DETECTOR_CLASSES) == 7
    assert 2 <= tiny.layers <= 4 and tiny.hidden_size == 128


def test_paper_and_code_choices_paper_takes_the_papers_embedder_and_the_codes_mrc_kl_scale():
    """Where the paper and [code] differ, a switch: the Image Embedder [UNITER §3.1] is the
    paper's by default and in paper(), [code]'s per-branch LayerNorms in small() and tiny() (the
    presets measured with them); MRC-kl is the per-region KL by default, [code]'s
    kl_div(...).mean() (/ C) in paper(), whose recipe (lr, clipping at 5) was tuned with it."""
    default, paper = uniter.Config(), uniter.Config.paper()
    assert not default.region_branch_norms and not paper.region_branch_norms
    assert uniter.Config.tiny().region_branch_norms and uniter.Config.small().region_branch_norms
    assert (default.mrc_kl_scale, paper.mrc_kl_scale) == ("region", "element")
    assert uniter.Config.tiny().mrc_kl_scale == uniter.Config.small().mrc_kl_scale == "region"
    with pytest.raises(ValueError, match="mrc_kl_scale"):
        dataclasses.replace(uniter.Config.tiny(), mrc_kl_scale="class")


@pytest.mark.parametrize("overrides,message", [
    (dict(hidden_size=129), "hidden_size 129 is not divisible by heads 2"),
    (dict(min_regions=11), "need 1 <= min_regions <= n_regions"),
    (dict(region_conf_threshold=1.0), "region_conf_threshold must be in [0, 1)"),
    (dict(n_region_classes=1), "n_region_classes counts background"),
    (dict(mask_prob=0.0), "mask_prob must be in (0, 1)"),
    (dict(mix_mlm=0, mix_itm=0, mix_mrfr=0, mix_mrc_kl=0), "the task mix"),
    (dict(mix_itm=-1), "the task mix"),
    (dict(ipot_beta=0.0), "need ipot_beta >= 0.03"),
    (dict(ipot_beta=0.02), "need ipot_beta >= 0.03"),
    (dict(ipot_iters=0), "need ipot_beta >= 0.03"),
    (dict(lr_schedule="step"), "lr_schedule must be 'cosine' or 'linear'"),
    (dict(batch_size=64, grad_accum_steps=5), "not divisible by grad_accum_steps"),
    (dict(max_text_len=2), "max_text_len must be >= 3"),
])
def test_invalid_configs_raise_a_clear_value_error(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        dataclasses.replace(uniter.Config.tiny(), **overrides)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        dataclasses.replace(uniter.Config.tiny(), hidden_size=129, mask_prob=2.0)
    assert "hidden_size" in str(error.value) and "mask_prob" in str(error.value)


# --- (c) the region location, by hand ------------------------------------------------------------

def test_region_locations_worked_example_of_the_docstring():
    p = uniter.region_locations(torch.tensor([64.0, 120.0, 320.0, 360.0]), 640, 480)
    assert p.shape == (7,)
    assert torch.allclose(p, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.4, 0.5, 0.2]))


def test_region_locations_batched_integer_and_already_normalised_boxes():
    boxes = torch.tensor([[[0, 0, 640, 480], [64, 120, 320, 360]]])  # (1, 2, 4) int pixels
    p = uniter.region_locations(boxes, 640, 480)
    assert p.shape == (1, 2, 7) and p.dtype == torch.float32
    assert torch.allclose(p[0, 0], torch.tensor([0, 0, 1, 1, 1, 1, 1.0]))  # the whole image
    unit = torch.tensor([[0.1, 0.25, 0.5, 0.75]], dtype=torch.float64)  # the world's boxes
    q = uniter.region_locations(unit, 1, 1)
    assert q.dtype == torch.float64 and torch.allclose(q[0, :4], unit[0])
    assert q[0, 6].item() == pytest.approx(0.4 * 0.5)


def test_region_locations_rejects_bad_input():
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 4\)"):
        uniter.region_locations(torch.zeros(3, 5), 10, 10)
    with pytest.raises(ValueError, match="must be > 0"):
        uniter.region_locations(torch.zeros(3, 4), 0, 10)


# --- (c) MLM and MRM masking, over many draws ----------------------------------------------------

def test_mask_words_picks_15_percent_of_words_80_10_10_and_never_a_special_token():
    rng, data = np.random.default_rng(0), np.random.default_rng(1)
    p, n_captions, L = 0.15, 3000, 12  # L ordinary word-pieces a caption
    lo, hi = 5, 60  # random_ids: the ordinary pieces
    n_mask = n_same = n_random = n_labelled = 0
    random_ids = set()
    for _ in range(n_captions):
        words = data.integers(lo, hi, size=L).tolist()
        tokens = [CLS] + words[:6] + [UNK] + words[6:] + [SEP, PAD_ID]  # specials mid and end
        inputs, labels = uniter.mask_words(tokens, rng, p, MASK, (lo, hi), SPECIAL)
        assert len(inputs) == len(labels) == len(tokens)
        labelled = 0
        for token, x, label in zip(tokens, inputs, labels):
            if token in SPECIAL:
                assert label == IGNORE and x == token  # never picked, never changed
            if label == IGNORE:
                assert x == token  # only picked positions change
                continue
            assert label == token  # the label is the original id
            labelled += 1
            if x == MASK:
                n_mask += 1
            elif x == token:
                n_same += 1
            else:
                assert lo <= x < hi
                n_random += 1
                random_ids.add(x)
        assert labelled >= 1  # every caption has something to predict
        n_labelled += labelled
    # E[picked a caption] = L·p, plus one forced [MASK] when none was picked: (1 - p)^L
    forced, free = (1 - p) ** L, L * p
    share = n_labelled / (n_captions * L)
    assert abs(share - (free + forced) / L) <= binomial_tolerance(p, n_captions * L)
    # of the picked: 80 % [MASK], 10 % a random piece (which may be the same id: 1 in 55),
    # 10 % unchanged; the forced ones are always [MASK]
    expected = {"mask": (0.8 * free + forced) / (free + forced),
                "random": 0.1 * (1 - 1 / (hi - lo)) * free / (free + forced),
                "same": 0.1 * (1 + 1 / (hi - lo)) * free / (free + forced)}
    observed = {"mask": n_mask, "random": n_random, "same": n_same}
    for kind, q in expected.items():
        assert abs(observed[kind] / n_labelled - q) <= binomial_tolerance(q, n_labelled), kind
    assert len(random_ids) >= 50  # the random pieces cover the range [lo, hi), 55 ids


def test_mask_words_always_masks_at_least_one_word_and_nothing_in_a_caption_of_specials():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        inputs, labels = uniter.mask_words([CLS, 17, SEP], rng, 1e-9, MASK, (5, 60), SPECIAL)
        assert inputs == [CLS, MASK, SEP] and labels == [IGNORE, 17, IGNORE]
        tokens = [CLS, 9, UNK, 23, 41, 7, SEP]
        inputs, labels = uniter.mask_words(tokens, rng, 1e-9, MASK, (5, 60), SPECIAL)
        picked = [t for t, label in enumerate(labels) if label != IGNORE]
        assert len(picked) == 1 and tokens[picked[0]] not in SPECIAL
        assert inputs[picked[0]] == MASK and labels[picked[0]] == tokens[picked[0]]
        assert [x for t, x in enumerate(inputs) if t not in picked] == \
            [x for t, x in enumerate(tokens) if t not in picked]
    inputs, labels = uniter.mask_words([CLS, SEP], np.random.default_rng(0), 0.5, MASK, (5, 60),
                                       SPECIAL)
    assert inputs == [CLS, SEP] and labels == [IGNORE, IGNORE]


def test_mask_regions_masks_15_percent_and_always_at_least_one_region():
    rng, n, p, draws = np.random.default_rng(0), 10, 0.15, 4000
    total = 0
    for _ in range(draws):
        masked = uniter.mask_regions(n, rng, p)
        assert masked.dtype == np.bool_ and masked.shape == (n,)
        assert masked.any()
        total += int(masked.sum())
    # E[count] = n·p, plus one forced region when none was picked: (1 - p)^n
    expected = (n * p + (1 - p) ** n) / n
    assert abs(total / (n * draws) - expected) <= binomial_tolerance(p, n * draws)
    # with a tiny mask_prob exactly one region is masked, chosen uniformly
    where = Counter()
    for _ in range(2000):
        masked = uniter.mask_regions(n, rng, 1e-9)
        assert masked.sum() == 1
        where[int(masked.argmax())] += 1
    tolerance = 2000 * binomial_tolerance(1 / n, 2000)
    assert all(abs(where[k] - 2000 / n) <= tolerance for k in range(n)), where


# --- (c) the task sampler and the dataset --------------------------------------------------------

def test_draw_task_frequencies_follow_the_mix_and_a_zero_weight_task_is_never_drawn():
    weights = {"mlm": 4.0, "itm": 3.0, "mrfr": 2.0, "mrc": 0.0, "mrc_kl": 1.0}
    config = dataclasses.replace(uniter.Config.tiny(),
                                 **{f"mix_{t}": w for t, w in weights.items()})
    n = 20_000
    drawn = Counter(uniter.draw_task(config, update, seed=3) for update in range(n))
    assert drawn["mrc"] == 0 and set(drawn) <= set(uniter.PRETRAIN_TASKS)
    for task, w in weights.items():
        p = w / sum(weights.values())
        assert abs(drawn[task] / n - p) <= binomial_tolerance(p, n), (task, drawn)
    single = dataclasses.replace(config, **only("mrc"))
    assert {uniter.draw_task(single, update, seed=3) for update in range(500)} == {"mrc"}


def test_draw_task_is_a_pure_function_of_seed_and_update():
    config = uniter.Config.tiny()
    first = [uniter.draw_task(config, u, seed=7) for u in range(300)]
    assert first == [uniter.draw_task(config, u, seed=7) for u in range(300)]
    assert first != [uniter.draw_task(config, u, seed=8) for u in range(300)]
    assert [uniter.draw_task(config, u, seed=7) for u in reversed(range(300))] == first[::-1]


def test_every_item_of_one_update_has_the_same_task_across_its_micro_batches(world, tokenizer):
    config = small_config(tokenizer, batch_size=8, grad_accum_steps=2)  # micro-batches of 4
    ds = uniter.UniterDataset(world, tokenizer, config, seed=1)
    assert len(ds) % config.batch_size == 0
    tasks = [ds[i]["task"] for i in range(80)]  # 10 updates, 20 micro-batches
    for update in range(10):
        assert set(tasks[8 * update:8 * update + 8]) == \
            {uniter.draw_task(config, update, seed=1)}, update
    assert len(set(tasks)) >= 2  # the updates do not all share one task


def test_dataset_items_are_pure_functions_of_seed_and_index(world, tokenizer):
    config = small_config(tokenizer)
    ds = uniter.UniterDataset(world, tokenizer, config, seed=1)
    again = uniter.UniterDataset(world, tokenizer, config, seed=1)
    other = uniter.UniterDataset(world, tokenizer, config, seed=2)
    indices = [0, 5, 13, 40, 77, 8 * 40 + 3]
    backwards = {i: again[i] for i in reversed(indices)}  # the order of access does not matter
    for i in indices:
        assert items_equal(ds[i], ds[i]), i
        assert items_equal(ds[i], backwards[i]), i
    assert not all(items_equal(ds[i], other[i]) for i in indices)


def test_conditional_masking_masks_one_modality_and_the_ablation_masks_both(world, tokenizer):
    mix = {f"mix_{t}": 1.0 for t in uniter.PRETRAIN_TASKS}
    for conditional in (True, False):
        config = small_config(tokenizer, batch_size=2, grad_accum_steps=1,
                              conditional_masking=conditional, **mix)
        ds = uniter.UniterDataset(world, tokenizer, config)
        seen = Counter()
        for i in range(160):
            item = ds[i]
            task = item["task"]
            seen[task] += 1
            words, regions = "mlm_labels" in item, "region_masked" in item
            if task == "itm":
                assert not words and not regions and "is_match" in item
            elif conditional:
                assert (words, regions) == (task == "mlm", task != "mlm"), task
                if task != "mlm":  # the text is seen whole
                    assert tokenizer.mask_id not in item["tokens"].tolist()
            else:
                assert words and regions, task
            if words:
                assert item["mlm_labels"].shape == item["tokens"].shape
                assert (item["mlm_labels"] != IGNORE).any()
            if regions:
                assert item["region_masked"].dtype == torch.bool
                assert item["region_masked"].shape == (len(item["features"]),)
                assert item["region_masked"].any()
        assert set(seen) == set(uniter.PRETRAIN_TASKS), seen


def test_itm_replaces_the_image_of_about_itm_neg_prob_of_the_pairs_never_the_text(world,
                                                                                 tokenizer):
    config = small_config(tokenizer, itm_neg_prob=0.3, **only("itm"))
    ds = uniter.UniterDataset(world, tokenizer, config)
    n, negatives = 400, 0
    for i in range(n):
        item = ds[i]
        example = world.example(i % len(world))
        own = uniter.region_inputs(example, config)
        captions = [tokenizer.encode(c, max_len=config.max_text_len) for c in example["captions"]]
        assert item["tokens"].tolist() in captions  # the text is always the example's own
        same = all(torch.equal(item[k], own[k]) for k in ("features", "locations"))
        assert same == item["is_match"], i
        negatives += not item["is_match"]
    assert abs(negatives / n - 0.3) <= binomial_tolerance(0.3, n)


class CountingWorld:
    """A world that counts how often each example is made."""

    def __init__(self, world):
        self.world, self.made = world, Counter()

    def __len__(self):
        return len(self.world)

    def example(self, i, regions=True):
        self.made[i] += 1
        return self.world.example(i, regions)


def test_itm_negatives_are_other_images_of_the_micro_batch_each_made_once(world, tokenizer):
    config = small_config(tokenizer, batch_size=8, grad_accum_steps=2, **only("itm"))  # b = 4
    counting = CountingWorld(world)
    ds = uniter.UniterDataset(counting, tokenizer, config)
    negatives = 0
    for start in range(0, 160, 4):  # 40 micro-batches, in the loader's order
        own = {i: uniter.region_inputs(world.example(i), config) for i in range(start, start + 4)}
        for i in range(start, start + 4):
            item = ds[i]
            if item["is_match"]:
                continue
            negatives += 1
            source = [j for j, regions in own.items()
                      if torch.equal(item["features"], regions["features"])]
            assert source and source != [i], i  # another image of the same micro-batch
    assert negatives >= 40
    assert set(counting.made) == set(range(160)) and max(counting.made.values()) == 1


def test_itm_negative_without_a_micro_batch_comes_from_the_whole_world(world, tokenizer):
    config = small_config(tokenizer, batch_size=1, grad_accum_steps=1, itm_neg_prob=1.0,
                          **only("itm"))
    ds = uniter.UniterDataset(world, tokenizer, config)
    for i in range(20):
        item = ds[i]
        assert not item["is_match"]
        assert not torch.equal(item["features"],
                               uniter.region_inputs(world.example(i), config)["features"])
    one = World(dataclasses.replace(WORLD_CONFIG, n_train=1), "train")
    with pytest.raises(ValueError, match="at least 2 images"):
        uniter.UniterDataset(one, tokenizer, config)[0]


# --- (c) collate ---------------------------------------------------------------------------------

def test_collate_pads_and_gives_the_flat_positions_of_the_masked_words_and_regions(world,
                                                                                  tokenizer):
    # both modalities masked; mix_mrc > 0 so the items carry cls_prob (uses_region_classes),
    # with a weight that never draws it in these updates
    config = small_config(tokenizer, conditional_masking=False, **{**only("mlm"),
                                                                     "mix_mrc": 1e-12})
    batch, items = dataset_batch(world, tokenizer, config, B=8)
    assert {it["task"] for it in items} == {"mlm"}
    lengths = [len(it["tokens"]) for it in items]
    counts = [len(it["features"]) for it in items]
    assert len(set(lengths)) > 1 and len(set(counts)) > 1  # ragged in text and in regions
    B, T, N, C = 8, max(lengths), max(counts), config.n_region_classes
    assert batch["task"] == "mlm"
    assert batch["tokens"].shape == (B, T) and batch["features"].shape == (B, N, 16)
    assert batch["locations"].shape == (B, N, 7) and batch["region_mask"].shape == (B, N)
    assert batch["region_mask"].dtype == torch.bool and batch["region_masked"].shape == (B, N)
    for b, it in enumerate(items):
        length, n = lengths[b], counts[b]
        assert torch.equal(batch["tokens"][b, :length], it["tokens"])
        assert (batch["tokens"][b, length:] == PAD_ID).all()
        assert torch.equal(batch["features"][b, :n], it["features"])
        assert torch.equal(batch["locations"][b, :n], it["locations"])
        assert (batch["features"][b, n:] == 0).all() and (batch["locations"][b, n:] == 0).all()
        assert batch["region_mask"][b].tolist() == [True] * n + [False] * (N - n)
        assert batch["region_masked"][b].tolist() == it["region_masked"].tolist() + \
            [False] * (N - n)

    words = [b * T + t for b, it in enumerate(items) for t, label in
             enumerate(it["mlm_labels"].tolist()) if label != IGNORE]
    assert batch["mlm_positions"].tolist() == words
    assert batch["mlm_targets"].tolist() == [items[p // T]["mlm_labels"][p % T].item()
                                             for p in words]
    regions = [b * N + n for b, it in enumerate(items) for n, m in
               enumerate(it["region_masked"].tolist()) if m]
    assert batch["mrm_positions"].tolist() == regions
    original = [uniter.region_inputs(world.example(i), config) for i in range(B)]  # unmasked
    assert torch.equal(batch["mrfr_targets"],
                       torch.stack([original[p // N]["features"][p % N] for p in regions]))
    assert batch["mrc_targets"].shape == (len(regions), C)
    assert torch.equal(batch["mrc_targets"],
                       torch.stack([original[p // N]["cls_prob"][p % N] for p in regions]))


def test_collate_itm_and_vqa_labels_and_a_mixed_batch_raises(world, tokenizer):
    itm_batch, itm_items = dataset_batch(world, tokenizer,
                                         small_config(tokenizer, **only("itm")), B=6)
    assert itm_batch["is_match"].dtype == torch.bool
    assert itm_batch["is_match"].tolist() == [it["is_match"] for it in itm_items]
    assert "mlm_positions" not in itm_batch and "mrm_positions" not in itm_batch
    vqa_batch, vqa_items = dataset_batch(world, tokenizer,
                                         small_config(tokenizer, task="vqa"), B=6)
    assert torch.equal(vqa_batch["answer_scores"],
                       torch.stack([it["answer_scores"] for it in vqa_items]))
    assert vqa_batch["answer_scores"].shape == (6, len(ANSWERS))
    assert (vqa_batch["answer_scores"].sum(1) == 1).all()  # one world answer: one-hot
    for i, k in enumerate(vqa_batch["answer_scores"].argmax(1).tolist()):
        assert ANSWERS[k] in [a for _, a in world.example(i)["questions"]]
    _, mlm_items = dataset_batch(world, tokenizer, small_config(tokenizer, **only("mlm")), B=2)
    with pytest.raises(ValueError, match="one task"):
        uniter.collate_fn([mlm_items[0], itm_items[0]])


# --- (c) the Image Embedder ----------------------------------------------------------------------

def test_image_embeddings_replace_a_masked_feature_by_the_mask_vector_and_keep_its_location():
    torch.manual_seed(0)
    embed = uniter.ImageEmbeddings(feature_dim=16, d_model=32, dropout=0.0)
    region_type = torch.randn(32)
    features, locations = torch.randn(2, 4, 16), torch.rand(2, 4, 7)
    masked = torch.tensor([[True, False, False, True], [False, True, False, False]])
    out = embed(features, locations, region_type, masked)
    assert out.shape == (2, 4, 32)

    changed = embed(features + 3 * torch.randn(2, 4, 16), locations, region_type, masked)
    assert torch.allclose(changed[masked], out[masked], atol=1e-6)  # its feature is gone
    assert (changed[~masked] - out[~masked]).abs().amax(-1).min() > 1e-3  # the others read it

    moved = locations.clone()
    moved[masked] = torch.rand(int(masked.sum()), 7)
    relocated = embed(features, moved, region_type, masked)
    assert (relocated[masked] - out[masked]).abs().amax(-1).min() > 1e-3  # location still read
    assert torch.allclose(relocated[~masked], out[~masked], atol=1e-6)

    as_mask_vector = features.clone()
    as_mask_vector[masked] = embed.mask_vector.detach()
    assert torch.allclose(embed(as_mask_vector, locations, region_type), out, atol=1e-6)

    (out * torch.randn_like(out)).sum().backward()  # the mask vector is learned
    assert embed.mask_vector.grad is not None and embed.mask_vector.grad.abs().sum() > 0


@pytest.mark.parametrize("branch_norms", [False, True])
def test_image_embedder_is_the_papers_one_layer_norm_or_the_codes_norm_per_branch(branch_norms):
    """[UNITER §3.1]: "summing up the two FC outputs and then passing through a layer
    normalization", the modality embedding summed before it (fn. 5); branch_norms = [code]'s
    LN(LN(W_f f) + LN(W_p p) + type), whose extra LayerNorms the paper's variant does not have."""
    torch.manual_seed(0)
    embed = uniter.ImageEmbeddings(16, 32, dropout=0.0, branch_norms=branch_norms)
    for p in embed.parameters():
        nn.init.normal_(p)  # every gain and bias away from 1 and 0
    features, locations, region_type = torch.randn(2, 3, 16), torch.rand(2, 3, 7), torch.randn(32)
    v, u = embed.feature(features), embed.location(locations)
    norm = embed.norm
    if branch_norms:
        v, u = embed.feature_norm(v), embed.location_norm(u)
    expected = norm(v + u + region_type)
    assert torch.allclose(embed(features, locations, region_type), expected, atol=1e-5)
    layer_norms = [m for m in embed.modules() if isinstance(m, nn.LayerNorm)]
    assert len(layer_norms) == (3 if branch_norms else 1)


def test_no_output_of_the_model_depends_on_a_masked_regions_feature(world, tokenizer):
    config = small_config(tokenizer, **only("mrfr"))
    batch, _ = dataset_batch(world, tokenizer, config, B=4)
    model = tiny_model(config).eval()
    masked = batch["region_masked"]
    features = batch["features"].clone()
    features[masked] = 5 * torch.randn(int(masked.sum()), 16)
    args = (batch["tokens"], batch["locations"], batch["region_mask"])
    with torch.no_grad():
        h = model.encoder(args[0], batch["features"], *args[1:], region_masked=masked)
        h_changed = model.encoder(args[0], features, *args[1:], region_masked=masked)
        h_unmasked = model.encoder(args[0], features, *args[1:])
    T = batch["tokens"].shape[1]
    real = torch.cat([batch["tokens"] != PAD_ID, batch["region_mask"]], dim=1)  # (B, T + N)
    assert torch.allclose(h_changed[real], h[real], atol=1e-5)
    assert not torch.allclose(h_unmasked[:, T:][masked], h[:, T:][masked], atol=1e-3)


# --- (c) padding ---------------------------------------------------------------------------------

def pad_batch(batch: dict, extra_tokens: int, extra_regions: int, seed: int = 0) -> dict:
    """The same batch with more [PAD] columns and more padded regions, every padded region
    (old and new) filled with large random garbage; the flat positions follow the new widths."""
    g = torch.Generator().manual_seed(seed)
    B, T = batch["tokens"].shape
    N, feature_dim = batch["features"].shape[1:]
    out = dict(batch)
    out["tokens"] = torch.cat([batch["tokens"], torch.full((B, extra_tokens), PAD_ID)], dim=1)
    no_regions = torch.zeros(B, extra_regions, dtype=torch.bool)
    region_mask = torch.cat([batch["region_mask"], no_regions], dim=1)
    features = 100 * torch.randn(B, N + extra_regions, feature_dim, generator=g)
    locations = torch.rand(B, N + extra_regions, 7, generator=g)
    features[:, :N][batch["region_mask"]] = batch["features"][batch["region_mask"]]
    locations[:, :N][batch["region_mask"]] = batch["locations"][batch["region_mask"]]
    out.update(tokens=out["tokens"], features=features, locations=locations,
               region_mask=region_mask)
    if "mlm_positions" in batch:
        p = batch["mlm_positions"]
        out["mlm_positions"] = p // T * (T + extra_tokens) + p % T
    if "region_masked" in batch:
        out["region_masked"] = torch.cat([batch["region_masked"], no_regions], dim=1)
        p = batch["mrm_positions"]
        out["mrm_positions"] = p // N * (N + extra_regions) + p % N
    return out


def test_real_positions_do_not_see_padding_in_the_encoder(world, tokenizer):
    config = small_config(tokenizer, **only("itm"))
    _, items = dataset_batch(world, tokenizer, config, B=4)
    model = tiny_model(config).eval()
    together = uniter.collate_fn(items)
    T = together["tokens"].shape[1]
    assert len({len(it["tokens"]) for it in items}) > 1 and len({len(it["features"])
                                                                for it in items}) > 1
    with torch.no_grad():
        h = model.encode_batch(pad_batch(together, 3, 2))
        for b, it in enumerate(items):
            alone = model.encode_batch(uniter.collate_fn([it]))[0]  # no padding at all
            length, n = len(it["tokens"]), len(it["features"])
            assert torch.allclose(h[b, :length], alone[:length], atol=1e-5)
            assert torch.allclose(h[b, T + 3:T + 3 + n], alone[length:], atol=1e-5)


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc_kl", "itm", "vqa"])
def test_every_task_loss_is_unchanged_by_extra_padding(world, tokenizer, task):
    overrides = dict(task="vqa") if task == "vqa" else only(task)
    config = small_config(tokenizer, **overrides)  # ITM: with WRA (wra_weight 0.1)
    batch, _ = dataset_batch(world, tokenizer, config, B=6)
    model = tiny_model(config).eval()
    with torch.no_grad():
        out = model(batch)
        padded = model(pad_batch(batch, 4, 3))
    assert out.keys() == padded.keys()
    for key in out:
        assert padded[key].item() == pytest.approx(out[key].item(), rel=1e-4, abs=1e-6), key


# --- (c) the optimizer ---------------------------------------------------------------------------

def test_make_optimizer_scales_the_vqa_head_and_decays_only_matrices(tokenizer):
    config = small_config(tokenizer, task="vqa", vqa_head_lr_mult=7.0, weight_decay=0.05)
    model = tiny_model(config)
    model.encoder.text_embeddings.position.weight.requires_grad_(False)  # frozen: in no group
    optimizer = uniter.make_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = optimizer.param_groups
    assert all(g["lr"] == config.lr and g["betas"] == (config.beta1, config.beta2)
               for g in groups)
    names = {id(p): name for name, p in model.named_parameters()}
    listed = [id(p) for group in groups for p in group["params"]]
    assert len(listed) == len(set(listed))  # each once
    assert set(listed) == {id(p) for p in model.parameters() if p.requires_grad}
    norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm)
             for p in m.parameters()}
    for group in groups:
        assert group["weight_decay"] in (0.0, 0.05)
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr_scale"] == (7.0 if name.startswith("heads.vqa.") else 1.0), name
            if group["weight_decay"] > 0:
                assert not name.endswith("bias") and id(p) not in norms, name
                assert name != "encoder.image_embeddings.mask_vector"
            else:
                assert p.dim() < 2, name  # every matrix decays
    assert any(group["lr_scale"] == 7.0 for group in groups)
    torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                       for g in groups], lr=1e-3)  # a valid optimizer spec

    pretrain = small_config(tokenizer, vqa_head_lr_mult=7.0)
    assert {g["lr_scale"] for g in uniter.make_optimizer(tiny_model(pretrain),
                                                         pretrain).param_groups} == {1.0}
    assert uniter.after_optimizer_step(model) is None  # the hook is a no-op for UNITER


def test_standardised_features_are_the_raw_ones_minus_the_training_mean_over_the_std(world,
                                                                                   tokenizer):
    config = small_config(tokenizer, standardise_features=True, **only("mlm"))
    mean, std = feature_statistics(world.config)
    train = World(world.config, "train")
    raw = np.concatenate([train.example(i)["features"]
                          for i in range(min(500, len(train)))])  # by hand
    assert np.allclose(mean.numpy(), raw.mean(0), atol=1e-5)
    assert np.allclose(std.numpy(), raw.std(0), rtol=1e-4)
    item = uniter.UniterDataset(world, tokenizer, config)[3]
    example = world.example(3)
    n = len(item["features"])
    expected = (torch.from_numpy(example["features"][:n]) - mean) / std
    assert torch.allclose(item["features"], expected, atol=1e-5)
    assert not torch.allclose(item["features"], torch.from_numpy(example["features"][:n]))
    with pytest.raises(ValueError, match="world_config"):
        uniter.retrieval_scores(tiny_model(config), tokenizer, config, [example, example])


# --- (c) the contract and tasks by composition ---------------------------------------------------

def test_the_contract_names_of_train_py():
    assert uniter.TASKS[0] == "pretrain" and set(uniter.MAIN_METRIC) == set(uniter.TASKS)
    assert uniter.INPUTS == "regions" and uniter.BERT_INIT == {"mlm": "cls.predictions"}
    with pytest.raises(ValueError, match="task must be one of pretrain, retrieval, vqa"):
        dataclasses.replace(uniter.Config.tiny(), task="captioning")
    model = uniter.build_model(uniter.Config.tiny())
    for name in ("text_embeddings", "layers", "pooler"):  # shared.bert.load_bert_encoder
        assert hasattr(model.encoder, name), name
    assert uniter.sample_captions(model, None, uniter.Config.tiny(), WORLD_CONFIG, "val", 3) == []


def test_init_bert_starts_the_mlm_head_from_the_checkpoints_cls_predictions(tokenizer, tmp_path):
    """[code]: starting from BERT (train.py --init_bert: shared.bert.init_from_bert with
    BERT_INIT), the MLM head's transform and output bias are BERT's cls.predictions tensors and
    its output layer the word embeddings, so the head gives BERT's MLM logits. Every tensor of
    the checkpoint is drawn at random, so a swapped, transposed or skipped tensor would show."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from shared.bert import init_from_bert

    config = small_config(tokenizer)  # D 32, 2 layers, 2 heads, MLP 64
    torch.manual_seed(1)
    bert = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)).eval()
    with torch.no_grad():
        for p in bert.parameters():  # LayerNorm gains and biases too: none is 0 or 1
            p.copy_(torch.randn_like(p))
    bert.save_pretrained(tmp_path)
    model = tiny_model(config).eval()
    assert init_from_bert(model, tmp_path, uniter.BERT_INIT).endswith("heads: mlm")
    head, theirs = model.heads["mlm"], bert.cls.predictions
    expected = {"transform.dense.weight": theirs.transform.dense.weight,
                "transform.dense.bias": theirs.transform.dense.bias,
                "transform.norm.weight": theirs.transform.LayerNorm.weight,
                "transform.norm.bias": theirs.transform.LayerNorm.bias,
                "bias": theirs.bias}
    ours = dict(head.named_parameters())
    assert set(ours) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    assert torch.equal(model.encoder.text_embeddings.word.weight,
                       bert.bert.embeddings.word_embeddings.weight)
    hidden = torch.randn(5, 32)
    with torch.no_grad():
        logits = head(hidden, model.encoder.text_embeddings.word.weight)  # (5, V)
        assert (logits - theirs(hidden)).abs().max().item() < 1e-4


def test_the_encoder_state_is_the_same_for_every_task_and_heads_hold_the_rest(tokenizer):
    heads = {"pretrain": {"itm", "mlm", "mrfr", "mrc"}, "retrieval": {"itm"}, "vqa": {"vqa"}}
    states = {}
    for task in uniter.TASKS:
        model = tiny_model(small_config(tokenizer, task=task))
        assert set(model.heads) == heads[task], task
        states[task] = model.state_dict()
        assert all(k.startswith(("encoder.", "heads.")) for k in states[task])
    encoder = [{k: v.shape for k, v in state.items() if not k.startswith("heads.")}
               for state in states.values()]
    assert encoder[0] == encoder[1] == encoder[2] and len(encoder[0]) > 0
    # the tied output layers live in the encoder: the heads hold no copy of them
    assert not any(k.endswith(("word.weight", "feature.weight")) for k in states["pretrain"]
                   if k.startswith("heads."))


def test_masked_modalities_is_conditional_masking_and_its_joint_ablation():
    for conditional in (True, False):
        assert uniter.masked_modalities("mlm", conditional) == (True, not conditional)
        for task in ("mrfr", "mrc", "mrc_kl"):
            assert uniter.masked_modalities(task, conditional) == (not conditional, True)
        for task in ("itm", "retrieval", "vqa"):
            assert uniter.masked_modalities(task, conditional) == (False, False)


@pytest.mark.parametrize("task,fresh", [("pretrain", []), ("retrieval", []), ("vqa", ["vqa"])])
def test_fine_tuning_from_pretraining_loads_the_encoder_and_the_itm_head(tokenizer, task, fresh):
    pretrained = tiny_model(small_config(tokenizer), seed=1)
    with torch.no_grad():
        pretrained.heads["itm"].weight.add_(1.0)  # unlike any fresh initialisation
    model = tiny_model(small_config(tokenizer, task=task), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_weights(model, pretrained.state_dict()) == fresh
    theirs = pretrained.state_dict()
    for k, v in model.state_dict().items():
        head = k.split(".")[1] if k.startswith("heads.") else None
        expected = before[k] if head in fresh else theirs[k]
        assert torch.equal(v, expected), k
    if task == "retrieval":  # the rank head starts from the pre-trained ITM head
        assert torch.equal(model.heads["itm"].weight, pretrained.heads["itm"].weight)


# --- (b) the tied output layers ------------------------------------------------------------------

def mrfr_loss_by_hand(model, batch, detach_head: bool = False) -> torch.Tensor:
    """L_MRFR with the output layer written out: transform(h) @ W_f + b, W_f the Image
    Embedder's feature weight (D, F); the masked regions read in row-major (b, n) order."""
    T = batch["tokens"].shape[1]
    h = model.encoder(batch["tokens"], batch["features"], batch["locations"],
                     batch["region_mask"], batch["region_masked"])
    hidden = h[:, T:][batch["region_masked"]]  # (M, D)
    weight = model.encoder.image_embeddings.feature.weight  # (D, F)
    weight = weight.detach() if detach_head else weight
    predicted = model.heads["mrfr"].transform(hidden) @ weight + model.heads["mrfr"].bias  # (M, F)
    return ((predicted - batch["mrfr_targets"]) ** 2).mean()


def mlm_loss_by_hand(model, batch, items, detach_head: bool = False) -> torch.Tensor:
    """L_MLM with the output layer written out: transform(h) @ E_wordᵀ + b."""
    B, T = batch["tokens"].shape
    labels = torch.full((B, T), IGNORE)
    for b, it in enumerate(items):
        labels[b, :len(it["mlm_labels"])] = it["mlm_labels"]
    h = model.encoder(batch["tokens"], batch["features"], batch["locations"],
                     batch["region_mask"])
    hidden = h[:, :T][labels != IGNORE]  # (M, D)
    weight = model.encoder.text_embeddings.word.weight  # (V, D)
    weight = weight.detach() if detach_head else weight
    logits = model.heads["mlm"].transform(hidden) @ weight.T + model.heads["mlm"].bias  # (M, V)
    return F.cross_entropy(logits, labels[labels != IGNORE])


@pytest.mark.parametrize("task", ["mrfr", "mlm"])
def test_the_mlm_and_mrfr_output_layers_are_the_embedding_weights_themselves(world, tokenizer,
                                                                            task):
    config = small_config(tokenizer, **only(task))
    batch, items = dataset_batch(world, tokenizer, config, B=6)
    model = tiny_model(config).eval()
    if task == "mrfr":
        weight = model.encoder.image_embeddings.feature.weight
        by_hand = lambda detach=False: mrfr_loss_by_hand(model, batch, detach)  # noqa: E731
    else:
        weight = model.encoder.text_embeddings.word.weight
        by_hand = lambda detach=False: mlm_loss_by_hand(model, batch, items, detach)  # noqa: E731

    # no other parameter holds a copy of the tied weight
    for name, p in model.named_parameters():
        if p is not weight and p.shape in (weight.shape, weight.T.shape):
            assert not torch.equal(p, weight) and not torch.equal(p, weight.T), name

    with torch.no_grad():
        loss = model(batch)["loss"].item()
        assert loss == pytest.approx(by_hand().item(), rel=1e-5)
        weight.data.add_(0.5 * torch.randn_like(weight))  # edit the embedding in place...
        edited = model(batch)["loss"].item()
        assert edited == pytest.approx(by_hand().item(), rel=1e-5)  # ...the head follows
        assert abs(edited - loss) > 1e-3 * loss

    model.zero_grad()
    model(batch)["loss"].backward()
    through_model = weight.grad.clone()
    through_both = torch.autograd.grad(by_hand(), weight)[0]
    through_embedding_only = torch.autograd.grad(by_hand(detach=True), weight)[0]
    assert torch.allclose(through_model, through_both, rtol=1e-4, atol=1e-7)
    # the output layer's share of the gradient reaches the same Parameter
    head_share = (through_model - through_embedding_only).norm()
    assert head_share > 0.05 * through_model.norm()


# --- (b) retrieval and VQA: the rank forward against a loop, evaluation ----------------------

def test_forward_rank_trains_on_the_hardest_negatives_of_the_batch(world, tokenizer):
    config = small_config(tokenizer, task="retrieval", hard_negatives=2, rank_margin=0.2)
    batch, _ = dataset_batch(world, tokenizer, config, B=4)
    model = tiny_model(config)
    with torch.no_grad():
        model.heads["itm"].weight.mul_(50)  # spread the scores so that the top-k is clear
    model.train()
    out = model(batch)
    assert model.training  # forward_rank scores in eval mode, then gives the mode back
    assert set(out) == {"loss", "rank"} and torch.isfinite(out["loss"]) and out["loss"] > 0

    with torch.no_grad():  # S[i, t] = score of (image i, text t), by hand, one image at a time
        B = 4
        rows = []
        for i in range(B):
            rows.append(model.match_score(batch["tokens"], batch["features"][i:i + 1].expand(
                B, -1, -1), batch["locations"][i:i + 1].expand(B, -1, -1),
                batch["region_mask"][i:i + 1].expand(B, -1)))
        S = torch.stack(rows)  # (B images, B texts)
    sigmoid = torch.sigmoid
    terms = []
    for b in range(B):
        wrong_images = sorted((i for i in range(B) if i != b), key=lambda i: -S[i, b])[:2]
        wrong_texts = sorted((t for t in range(B) if t != b), key=lambda t: -S[b, t])[:2]
        negatives = [S[i, b] for i in wrong_images] + [S[b, t] for t in wrong_texts]
        terms += [max(0.0, (0.2 + sigmoid(n) - sigmoid(S[b, b])).item()) for n in negatives]
    assert out["loss"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-4)

    out["loss"].backward()
    assert model.heads["itm"].weight.grad.abs().sum() > 0
    assert model.encoder.layers[0].attn.q_proj.weight.grad.abs().sum() > 0


def test_retrieval_scores_are_the_match_score_of_every_image_text_pair(world, tokenizer):
    config = small_config(tokenizer)
    model = tiny_model(config).eval()
    examples = [world.example(i) for i in range(5)]
    scores = uniter.retrieval_scores(model, tokenizer, config, examples)
    assert scores.shape == (5, 5)
    with torch.no_grad():
        for i, image in enumerate(examples):
            r = uniter.region_inputs(image, config)
            region_mask = torch.ones(1, len(r["features"]), dtype=torch.bool)
            for t, text in enumerate(examples):
                tokens = torch.tensor([tokenizer.encode(text["captions"][0], config.max_text_len)])
                expected = model.match_score(tokens, r["features"][None], r["locations"][None],
                                             region_mask)
                assert scores[i, t].item() == pytest.approx(expected.item(), abs=1e-5), (i, t)
    assert scores.std() > 0


def test_match_score_is_the_itm_log_odds_which_ignores_what_softmax_cannot_see(world, tokenizer):
    """itm_score log_odds: logit[1] - logit[0] of the ITM head, the log of p / (1 - p) for the
    softmax probability p of "match". A direction added to BOTH rows of the head changes
    neither the softmax nor the ITM loss; it moves the match logit alone ([code]'s score,
    itm_score match_logit) but not the log-odds."""
    config = small_config(tokenizer)
    model = tiny_model(config).eval()
    batch = uniter.collate_fn([uniter.UniterDataset(world, tokenizer, dataclasses.replace(
        config, task="retrieval"))[i] for i in range(6)])
    args = batch["tokens"], batch["features"], batch["locations"], batch["region_mask"]
    with torch.no_grad():
        logits = model.heads["itm"](model.encoder.pooler(model.encoder(*args)))  # (B, 2)
        p = logits.softmax(-1)[:, 1]
        score = model.match_score(*args)
        assert torch.allclose(score, torch.log(p / (1 - p)), atol=1e-4)
        before_match = logits[:, 1].clone()
        shift = torch.randn(config.hidden_size)
        model.heads["itm"].weight.add_(shift)  # the same direction added to both rows
        model.heads["itm"].bias.add_(3.0)
        assert torch.allclose(model.match_score(*args), score, atol=1e-4)  # log-odds: unmoved
        model.config = dataclasses.replace(config, itm_score="match_logit")
        moved = model.match_score(*args)
        assert (moved - before_match).abs().min() > 0.1  # the match logit alone: moved
    with pytest.raises(ValueError, match="itm_score"):
        dataclasses.replace(config, itm_score="probability")


def test_evaluate_pretrain_reports_recall_among_at_most_eval_pairs(tokenizer):
    config = small_config(tokenizer, eval_pairs=2)
    model = tiny_model(config).train()
    metrics = uniter.evaluate(model, tokenizer, config, WORLD_CONFIG, "val", 20)
    assert model.training  # the mode is given back
    assert set(metrics) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
                            "r1_mean"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert metrics["r1_mean"] == pytest.approx((metrics["i2t_r1"] + metrics["t2i_r1"]) / 2)
    assert metrics["i2t_r10"] == metrics["t2i_r10"] == 1.0  # 2 images (eval_pairs), 10 captions
    assert metrics[uniter.MAIN_METRIC["pretrain"]] == metrics["r1_mean"]


def test_evaluate_ranks_every_caption_of_each_image_with_all_five_as_positives(tokenizer,
                                                                           monkeypatch):
    """The COCO / Flickr30K protocol [UNITER §A.2; code utils/itm_eval.py]: eval_pairs images
    and ALL their captions (5 each), every (image, caption) pair scored; an image retrieves
    well if any of its captions ranks high, a caption if its own image does."""
    config = small_config(tokenizer, eval_pairs=4)
    model = tiny_model(config)
    val = World(WORLD_CONFIG, "val")
    examples = [val.example(i) for i in range(4)]
    scored = []
    match_score = model.match_score
    monkeypatch.setattr(model, "match_score", lambda tokens, *args: scored.append(
        len(tokens)) or match_score(tokens, *args))
    metrics = uniter.evaluate(model, tokenizer, config, WORLD_CONFIG, "val", 20)
    captions = [c for ex in examples for c in ex["captions"]]
    assert len(captions) == 20 and sum(scored) == 4 * 20  # n images x 5n captions
    statistics = feature_statistics(WORLD_CONFIG) if config.standardise_features else None
    scores = torch.zeros(4, 20)
    with torch.no_grad():
        model.eval()
        for i, image in enumerate(examples):
            r = uniter.region_inputs(image, config, statistics)
            for t, caption in enumerate(captions):
                tokens = torch.tensor([tokenizer.encode(caption, config.max_text_len)])
                scores[i, t] = match_score(tokens, r["features"][None], r["locations"][None],
                                           torch.ones(1, len(r["features"]), dtype=torch.bool))
    expected = recall_at_k(scores, torch.arange(4).repeat_interleave(5))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_evaluate_vqa_reports_accuracy_per_question_type_and_with_regions_zeroed(tokenizer):
    config = small_config(tokenizer, task="vqa")
    model = tiny_model(config)
    with torch.no_grad():  # an untrained model whose answers follow its inputs, regions included
        for layer in model.encoder.layers:
            layer.attn.v_proj.weight.mul_(30)
            layer.attn.out_proj.weight.mul_(30)
        model.heads["vqa"][3].weight.mul_(100)
    val = World(WORLD_CONFIG, "val")
    examples = [val.example(i) for i in range(6)]

    def predict(zero: bool) -> list[str]:
        answers = []
        with torch.no_grad():
            for example in examples:
                r = uniter.region_inputs(example, config)
                features, locations = r["features"][None], r["locations"][None]
                if zero:
                    features, locations = torch.zeros_like(features), torch.zeros_like(locations)
                for question, _ in example["questions"]:
                    tokens = torch.tensor([tokenizer.encode(question, config.max_text_len)])
                    every = torch.ones(1, features.shape[1], dtype=torch.bool)
                    logits = model.answer_logits(tokens, features, locations, every)
                    answers.append(ANSWERS[logits.argmax().item()])
        return answers

    qa = [(q, a) for example in examples for q, a in example["questions"]]
    predicted, blind = predict(False), predict(True)
    right = [p == a for p, (_, a) in zip(predicted, qa)]
    blind_right = [p == a for p, (_, a) in zip(blind, qa)]
    assert len(set(predicted)) > 1 and sum(right) != sum(blind_right)  # the checks below bite

    model.train()
    metrics = uniter.evaluate(model, tokenizer, config, WORLD_CONFIG, "val", 6)
    assert model.training
    assert metrics["vqa_acc"] == pytest.approx(sum(right) / len(qa))
    assert metrics["vqa_acc_regions_zeroed"] == pytest.approx(sum(blind_right) / len(qa))
    kinds = Counter(question_type(q) for q, _ in qa)
    assert {k for k in metrics if k not in ("vqa_acc", "vqa_acc_regions_zeroed")} == \
        {f"vqa_acc_{kind}" for kind in kinds}
    assert set(kinds) <= {"colour", "shape", "count", "exists", "relation"} and len(kinds) >= 3
    for kind in kinds:
        hits = [r for r, (q, _) in zip(right, qa) if question_type(q) == kind]
        assert metrics[f"vqa_acc_{kind}"] == pytest.approx(sum(hits) / len(hits)), kind


# --- (d) learning --------------------------------------------------------------------------------

def overfit(model, batch, steps: int, lr: float, key: str) -> tuple[float, float]:
    """(first, last) value of out[key] over `steps` AdamW steps on one batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    first = None
    for _ in range(steps):
        out = model(batch)
        first = out[key].item() if first is None else first
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return first, model(batch)[key].item()


def test_mrc_kl_scale_element_divides_the_models_mrc_kl_loss_by_the_classes(world, tokenizer):
    config = small_config(tokenizer, **only("mrc_kl"))
    batch, _ = dataset_batch(world, tokenizer, config, B=4)
    region = tiny_model(config)(batch)["mrc_kl"]
    element = tiny_model(dataclasses.replace(config, mrc_kl_scale="element"))(batch)["mrc_kl"]
    assert element.item() == pytest.approx(region.item() / config.n_region_classes, rel=1e-5)


@pytest.mark.parametrize("task", ["mlm", "itm", "mrfr", "mrc_kl", "vqa"])
def test_a_tiny_model_overfits_one_batch_of_each_task(world, tokenizer, task):
    overrides = dict(task="vqa") if task == "vqa" else only(task)
    config = small_config(tokenizer, **overrides)
    batch, _ = dataset_batch(world, tokenizer, config, B=8)
    first, last = overfit(tiny_model(config), batch, steps=200, lr=1e-3, key=task)
    assert last < first / 10, (task, first, last)  # ITM: with WRA in the trained loss


def itm_accuracy(model, batch) -> float:
    with torch.no_grad():
        logits = model.heads["itm"](model.encoder.pooler(model.encode_batch(batch)))  # (B, 2)
    return ((logits[:, 1] > logits[:, 0]) == batch["is_match"]).float().mean().item()


def test_itm_learns_to_use_the_image_and_fails_when_regions_are_shuffled(world, tokenizer):
    config = small_config(tokenizer, wra_weight=0.0, **only("itm"))
    examples, seen = [], set()
    for i in range(len(world)):  # 8 examples with distinct first captions
        example = world.example(i)
        if example["captions"][0] not in seen:
            seen.add(example["captions"][0])
            examples.append(example)
        if len(examples) == 8:
            break
    regions = [uniter.region_inputs(ex, config) for ex in examples]
    items = []
    for j, example in enumerate(examples):  # each caption with its image and with the next one
        tokens = torch.tensor(tokenizer.encode(example["captions"][0], config.max_text_len))
        for image, is_match in ((j, True), ((j + 1) % 8, False)):
            items.append({"task": "itm", "tokens": tokens, **regions[image], "is_match": is_match})
    batch = uniter.collate_fn(items)  # neither the text nor the image alone tells the label

    model = tiny_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    accuracy = 0.0
    for step in range(600):
        model.train()
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 20 == 19:
            accuracy = itm_accuracy(model.eval(), batch)
            if accuracy >= 0.95:
                break
    assert accuracy >= 0.95

    g = torch.Generator().manual_seed(0)
    shuffled_accuracy = []
    for _ in range(5):
        perm = torch.randperm(len(items), generator=g)
        shuffled = {**batch, "features": batch["features"][perm],
                    "locations": batch["locations"][perm],
                    "region_mask": batch["region_mask"][perm]}
        shuffled_accuracy.append(itm_accuracy(model.eval(), shuffled))
    assert sum(shuffled_accuracy) / 5 <= 0.75, shuffled_accuracy


# --- the paper's recipe of each task: Config.paper(task) -----------------------------------------

UNITER_RECIPES = {  # [code]'s configs (Config.paper's comments); clip and eps: [code]'s / k
    "pretrain": dict(batch_size=6144, grad_accum_steps=6, lr=5e-5, max_steps=200_000,
                     warmup_steps=10_000, lr_schedule="linear", weight_decay=0.01, beta1=0.9,
                     beta2=0.98, grad_clip=5.0 / 6, adam_eps=1e-6 / 6),  # all-data, 8 GPUs
    "vqa": dict(batch_size=1280, grad_accum_steps=5, lr=8e-5, max_steps=6000,
                warmup_steps=600, lr_schedule="linear", weight_decay=0.01, beta1=0.9,
                beta2=0.98, grad_clip=2.0 / 5, adam_eps=1e-6 / 5),  # train-vqa-base-4gpu
    "retrieval": dict(batch_size=128, grad_accum_steps=1, lr=5e-5, max_steps=5000,
                      warmup_steps=500, lr_schedule="linear", weight_decay=0.01, beta1=0.9,
                      beta2=0.98, grad_clip=2.0 / 2, adam_eps=1e-6 / 2),  # itm-*-base-16gpu-hn
}


@pytest.mark.parametrize("task", sorted(UNITER_RECIPES))
def test_paper_gives_each_task_the_official_recipe_and_the_same_model(task):
    """Config.paper(task): the task and its recipe ([code]'s config of that task), a valid
    Config; every other field (the model, the heads' settings) is pre-training's."""
    from shared.config import RECIPE

    assert set(UNITER_RECIPES) == set(uniter.TASKS)
    c = uniter.Config.paper(task)
    assert uniter.config_problems(c) == [] and c.task == task
    assert {name: getattr(c, name) for name in UNITER_RECIPES[task]} == UNITER_RECIPES[task]
    assert c.batch_size % c.grad_accum_steps == 0
    pretrain = dataclasses.asdict(uniter.Config.paper())
    assert {k: v for k, v in dataclasses.asdict(c).items() if k not in RECIPE} == \
        {k: v for k, v in pretrain.items() if k not in RECIPE}
    assert (c.mrc_kl_scale, c.hard_negatives, c.rank_margin, c.vqa_head_lr_mult) == \
        ("element", 31, 0.2, 10.0)  # [code]: MRC-kl's scale, hard_neg_size, margin, lr_mul
    with pytest.raises(ValueError, match="no paper recipe"):
        uniter.Config.paper("nlvr2")


def test_train_paper_preset_takes_the_tasks_recipe_also_from_a_checkpoint():
    """train.py --preset paper --task vqa: the VQA recipe; with --init, setup keeps the
    checkpoint's model (every field but shared.config.RECIPE) and takes the recipe of --task
    from the preset, as train.setup calls make_config."""
    import train
    from shared.config import RECIPE

    vqa = train.make_config(uniter, "paper", {"task": "vqa"})
    assert (vqa.task, vqa.batch_size, vqa.grad_accum_steps, vqa.lr, vqa.max_steps,
            vqa.warmup_steps, vqa.grad_clip, vqa.adam_eps) == \
        ("vqa", 1280, 5, 8e-5, 6000, 600, 2.0 / 5, 1e-6 / 5)
    saved = dataclasses.asdict(dataclasses.replace(  # a pre-training checkpoint's config
        uniter.Config.paper(), hidden_size=384, layers=6, heads=6, intermediate_size=1536))
    kept = {k: v for k, v in saved.items() if k not in RECIPE}
    for task in ("vqa", "retrieval"):
        c = train.make_config(uniter, "paper", {**kept, "task": task})
        assert (c.hidden_size, c.layers, c.heads) == (384, 6, 6)  # the checkpoint's model
        assert {k: getattr(c, k) for k in RECIPE} == \
            {k: getattr(uniter.Config.paper(task), k) for k in RECIPE}  # the task's recipe
    assert train.make_config(uniter, "paper", {**kept, "task": "retrieval"}).lr == 5e-5


@pytest.mark.parametrize("task, code_clip, k", [("pretrain", 5.0, 6), ("vqa", 2.0, 5),
                                               ("retrieval", 2.0, 2)])
def test_the_paper_recipe_on_the_mean_gradient_is_the_codes_on_the_sum(task, code_clip, k):
    """[code] steps AdamW (eps 1e-6) on the SUM of k gradients, clipped at code_clip: the code's
    pretrain.py and the code's train_vqa.py sum their 6 and 5 accumulated gradients, and the
    code's train_itm_hard_negatives.py averages its 8 steps but adds the text-side and the
    image-side losses, twice our mean over both (k = 2). train.py averages. Config.paper(task)'s grad_clip and adam_eps (both / k) on
    the mean give the code's weights, update after update, whether clipping acts or not; the
    code's thresholds applied to the mean clip less often: another run."""
    config = uniter.Config.paper(task)
    torch.manual_seed(0)
    start = torch.nn.Linear(8, 4).double()
    updates = [[(torch.randn(16, 8).double() * size, torch.randn(16, 4).double())
                for _ in range(k)] for size in (0.2, 1.0, 3.0, 0.3, 2.0)]  # norms vary

    def train(scale: float, clip: float, eps: float) -> tuple[torch.Tensor, list[bool]]:
        model = copy.deepcopy(start)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98), eps=eps,
                                weight_decay=0.01)
        clipped = []
        for micro in updates:
            opt.zero_grad()
            for x, y in micro:
                (F.mse_loss(model(x), y) * scale).backward()  # each micro-batch's mean loss
            clipped.append(bool(torch.nn.utils.clip_grad_norm_(model.parameters(), clip) > clip))
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), clipped

    code, code_clipped = train(1.0, code_clip, 1e-6)  # the sum of the k gradients
    ours, our_clipped = train(1.0 / k, config.grad_clip, config.adam_eps)  # their mean
    assert our_clipped == code_clipped and any(code_clipped) and not all(code_clipped)
    assert (ours - code).abs().max() < 1e-7  # float64 rounding, amplified by Adam
    naive, naive_clipped = train(1.0 / k, code_clip, 1e-6)  # the code's numbers on the mean
    assert naive_clipped != code_clipped and (naive - code).abs().max() > 1e-3


def test_ipot_beta_below_the_checked_bound_makes_the_plan_nan_and_at_it_not():
    """Why Config asks ipot_beta >= 0.03: a row whose costs are all 2 (the largest cosine
    distance) has exp(-2/β) outside fp32's normal range below β ≈ 0.023, and its plan turns
    NaN; at 0.03 the plan is finite with exact marginals."""
    cost = torch.full((1, 5, 7), 2.0)
    cost[0, 0, 0] = 0.0
    real_x, real_y = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 7, dtype=torch.bool)
    assert not torch.isfinite(uniter.ipot(cost, real_x, real_y, beta=0.02)).all()
    plan = uniter.ipot(cost, real_x, real_y, beta=0.03)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(2), torch.full((1, 5), 1 / 5))
