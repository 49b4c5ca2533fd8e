"""uniter.py's Config (presets, validation) and the Image Embedder's 7-d region location
[UNITER §3.1, fn. 3]. The objectives' maths: tests/test_losses.py; the masking, data,
model and evaluation: tests/test_uniter_model.py."""

import dataclasses

import pytest
import torch

import uniter
from shared.world import DETECTOR_CLASSES, WorldConfig


# --- Config ----------------------------------------------------------------------------------

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
    assert (c.beta1, c.beta2, c.lr, c.warmup_steps, c.lr_schedule, c.grad_clip) == \
        (0.9, 0.98, 5e-5, 10_000, "linear", 5.0)
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
    (dict(ipot_beta=0.0), "need ipot_beta > 0"),
    (dict(ipot_iters=0), "need ipot_beta > 0"),
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


# --- The region location ---------------------------------------------------------------------

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
