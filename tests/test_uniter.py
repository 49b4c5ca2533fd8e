"""uniter.py so far: the Config, the 7-d region location, and the objectives (MLM, MRFR, MRC,
MRC-kl, ITM, and WRA with its batched IPOT), against hand computations, loops written from the
equations, and POT's exact optimal transport."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import uniter
from shared.world import DETECTOR_CLASSES, WorldConfig


def ragged_masks(lengths: list[int], width: int) -> torch.Tensor:
    """(B, width) bool, the first lengths[b] entries of row b real."""
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def random_problem(seed: int, lengths_x=(5, 3, 8, 1), lengths_y=(7, 4, 2, 6), T=8, N=7,
                   dtype=torch.float64):
    """Costs in [0, 2] like 1 - cos, garbage (inf, nan, huge) on every padded pair."""
    g = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(len(lengths_x), T, N, generator=g, dtype=dtype)
    x_mask, y_mask = ragged_masks(list(lengths_x), T), ragged_masks(list(lengths_y), N)
    padded = ~(x_mask[:, :, None] & y_mask[:, None, :])
    garbage = torch.tensor([math.inf, math.nan, -1e6], dtype=dtype)
    cost[padded] = garbage[torch.arange(int(padded.sum())) % 3]
    return cost, x_mask, y_mask


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


# --- MLM, MRFR, MRC, MRC-kl, ITM ---------------------------------------------------------------

def test_mlm_loss_is_the_mean_over_labelled_positions_and_ignores_minus_100():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 7, 2, 10
    expected = -(logits[0, 1].log_softmax(-1)[7] + logits[0, 3].log_softmax(-1)[2]
                 + logits[1, 4].log_softmax(-1)[10]) / 3
    assert uniter.mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    changed = logits.clone()
    changed[labels == -100] = 50 * torch.randn(int((labels == -100).sum()), 11)
    assert uniter.mlm_loss(changed, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert uniter.mlm_loss(logits, torch.full((2, 5), -100)).item() == 0.0  # nothing masked


def test_mrfr_loss_is_the_mse_over_masked_regions_only():
    torch.manual_seed(0)
    predicted, target = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    masked = torch.tensor([[True, False, False, True], [False, False, True, False]])
    expected = sum(((predicted[b, n] - target[b, n]) ** 2).mean()
                   for b, n in masked.nonzero().tolist()) / 3
    assert uniter.mrfr_loss(predicted, target, masked).item() == pytest.approx(expected.item())
    predicted[~masked] = 1e3  # unmasked rows do not count
    assert uniter.mrfr_loss(predicted, target, masked).item() == pytest.approx(expected.item())
    assert uniter.mrfr_loss(predicted, target, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def test_mrc_loss_targets_the_best_object_class_never_background_and_only_masked_regions():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4)
    detector_probs = torch.tensor([[[0.7, 0.1, 0.15, 0.05],  # background most likely -> class 2
                                    [0.1, 0.6, 0.2, 0.1],  # -> class 1
                                    [0.0, 0.1, 0.1, 0.8]]])  # unmasked
    masked = torch.tensor([[True, True, False]])
    expected = -(logits[0, 0].log_softmax(-1)[2] + logits[0, 1].log_softmax(-1)[1]) / 2
    assert uniter.mrc_loss(logits, detector_probs, masked).item() == pytest.approx(expected.item())
    logits[0, 2] = 100 * torch.randn(4)  # an unmasked region changes nothing
    assert uniter.mrc_loss(logits, detector_probs, masked).item() == pytest.approx(expected.item())


def test_mrc_kl_loss_equals_a_hand_written_sum_of_t_log_t_over_p():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    t = torch.softmax(3 * torch.randn(2, 3, 5, dtype=torch.float64), dim=-1)
    t[0, 0] = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0], dtype=torch.float64)  # zeros: 0 log 0 = 0
    masked = torch.tensor([[True, False, True], [False, True, True]])
    total, count = 0.0, 0
    for b in range(2):
        for n in range(3):
            if not masked[b, n]:
                continue
            log_p = torch.log_softmax(logits[b, n], dim=-1).tolist()
            total += sum(tc * (math.log(tc) - lp) for tc, lp in zip(t[b, n].tolist(), log_p)
                         if tc > 0)
            count += 1
    assert uniter.mrc_kl_loss(logits, t, masked).item() == pytest.approx(total / count, rel=1e-6)
    # KL(t || t) = 0 when the model reproduces the detector (background included)
    assert uniter.mrc_kl_loss(t.clamp(min=1e-30).log(), t, masked).item() == \
        pytest.approx(0.0, abs=1e-6)


def test_itm_loss_is_binary_cross_entropy_on_the_match_probability():
    torch.manual_seed(0)
    logits = torch.randn(6, 2)
    is_match = torch.tensor([True, False, True, True, False, False])
    match_prob = torch.sigmoid(logits[:, 1] - logits[:, 0])  # softmax(z)_1
    expected = F.binary_cross_entropy(match_prob, is_match.float())
    assert uniter.itm_loss(logits, is_match).item() == pytest.approx(expected.item(), rel=1e-5)
    assert uniter.itm_loss(logits, is_match.long()).item() == pytest.approx(expected.item(),
                                                                             rel=1e-5)


# --- IPOT --------------------------------------------------------------------------------------

def test_ipot_marginals_are_uniform_over_real_entries_and_padding_is_exact_zero():
    cost, x_mask, y_mask = random_problem(0)
    plan = uniter.ipot(cost, x_mask, y_mask)  # 50 iterations, β = 0.5, k = 1
    n_x = x_mask.sum(1, keepdim=True).double()  # (B, 1)
    n_y = y_mask.sum(1, keepdim=True).double()  # (B, 1)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    assert (plan[~(x_mask[:, :, None] & y_mask[:, None, :])] == 0).all()  # exact zeros
    rows, cols = plan.sum(2), plan.sum(1)  # (B, T), (B, N)
    assert torch.allclose(rows[x_mask], (1.0 / n_x).expand_as(rows)[x_mask], atol=1e-12)  # exact
    assert torch.allclose(cols[y_mask], (1.0 / n_y).expand_as(cols)[y_mask], rtol=1e-2)  # close
    assert torch.allclose(plan.sum((1, 2)), torch.ones(4, dtype=torch.float64), atol=1e-12)
    longer = uniter.ipot(cost, x_mask, y_mask, iters=1000)  # the region side converges too
    assert torch.allclose(longer.sum(1)[y_mask], (1.0 / n_y).expand_as(cols)[y_mask], atol=1e-9)


def test_ipot_gives_an_all_zero_plan_to_an_example_without_regions():
    cost, x_mask, y_mask = random_problem(1)
    y_mask[2] = False
    plan = uniter.ipot(cost, x_mask, y_mask)
    assert (plan[2] == 0).all() and torch.isfinite(plan).all()
    assert torch.allclose(plan.sum((1, 2))[[0, 1, 3]], torch.ones(3, dtype=torch.float64))


def test_ipot_with_many_iterations_matches_pot_exact_emd():
    ot = pytest.importorskip("ot")
    lengths_x, lengths_y = (5, 3, 12, 2, 9, 7), (7, 4, 2, 11, 9, 1)
    cost, x_mask, y_mask = random_problem(2, lengths_x, lengths_y, T=12, N=11)
    plan = uniter.ipot(cost, x_mask, y_mask, iters=2000)
    for b, (nx, ny) in enumerate(zip(lengths_x, lengths_y)):
        c = cost[b, :nx, :ny]
        exact = ot.emd2(torch.full((nx,), 1.0 / nx, dtype=torch.float64).numpy(),
                        torch.full((ny,), 1.0 / ny, dtype=torch.float64).numpy(), c.numpy())
        ours = (c * plan[b, :nx, :ny]).sum().item()
        assert ours == pytest.approx(exact, abs=1e-4), (b, ours, exact)


def test_batched_ipot_equals_a_loop_over_examples_cut_to_their_real_sizes():
    cost, x_mask, y_mask = random_problem(3)
    plan = uniter.ipot(cost, x_mask, y_mask, beta=0.5, iters=50, k=2)
    for b in range(cost.shape[0]):
        nx, ny = int(x_mask[b].sum()), int(y_mask[b].sum())
        one = uniter.ipot(cost[b:b + 1, :nx, :ny], x_mask[b:b + 1, :nx], y_mask[b:b + 1, :ny],
                          beta=0.5, iters=50, k=2)
        assert torch.allclose(plan[b, :nx, :ny], one[0], atol=1e-14)


def test_ipot_keeps_the_dtype_computes_no_gradient_and_rejects_bad_input():
    cost, x_mask, y_mask = random_problem(4)
    cost = cost.masked_fill(~(x_mask[:, :, None] & y_mask[:, None, :]), 0.0)
    plans = {}
    for dtype in (torch.float32, torch.float64):
        leaf = cost.to(dtype).requires_grad_()
        plans[dtype] = uniter.ipot(leaf, x_mask, y_mask)
        assert plans[dtype].dtype == dtype
        assert not plans[dtype].requires_grad and plans[dtype].grad_fn is None
    assert torch.allclose(plans[torch.float32].double(), plans[torch.float64], atol=1e-6)
    with pytest.raises(ValueError, match="fp32 or fp64"):
        uniter.ipot(cost.bfloat16(), x_mask, y_mask)
    with pytest.raises(ValueError, match=r"cost must be \(B, T, N\)"):
        uniter.ipot(cost[0], x_mask, y_mask)
    with pytest.raises(ValueError, match="y_mask"):
        uniter.ipot(cost, x_mask, y_mask[:, :-1])
    with pytest.raises(ValueError, match="must be bool"):
        uniter.ipot(cost, x_mask.long(), y_mask)
    with pytest.raises(ValueError, match="beta > 0"):
        uniter.ipot(cost, x_mask, y_mask, beta=0.0)


# --- WRA ---------------------------------------------------------------------------------------

def wra_inputs(seed: int = 0, D: int = 16):
    g = torch.Generator().manual_seed(seed)
    text_mask, region_mask = ragged_masks([6, 3, 8, 5], 8), ragged_masks([7, 5, 2, 7], 7)
    text_hidden = torch.randn(4, 8, D, generator=g, dtype=torch.float64)
    region_hidden = torch.randn(4, 7, D, generator=g, dtype=torch.float64)
    region_hidden[0] = text_hidden[0, :7] + 0.1 * torch.randn(7, D, generator=g,
                                                             dtype=torch.float64)  # aligned
    return text_hidden, region_hidden, text_mask, region_mask


def test_wra_distance_is_sum_of_cosine_cost_times_plan_and_lies_in_0_2():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    d = uniter.wra_distance(text_hidden, region_hidden, text_mask, region_mask)
    assert d.shape == (4,) and d.dtype == torch.float32
    assert ((d >= 0) & (d <= 2)).all()
    assert d[0] < d[1:].min()  # the aligned pair is the closest
    for b in range(4):  # by hand: cosine cost on the real part, plan of that cost
        nx, ny = int(text_mask[b].sum()), int(region_mask[b].sum())
        x = text_hidden[b, :nx].float()
        y = region_hidden[b, :ny].float()
        cost = 1 - (x @ y.T) / (x.norm(dim=1)[:, None] * y.norm(dim=1)[None, :])
        plan = uniter.ipot(cost[None], text_mask[b:b + 1, :nx], region_mask[b:b + 1, :ny])[0]
        assert d[b].item() == pytest.approx((cost * plan).sum().item(), abs=1e-5)


def test_wra_loss_sign_convention_positives_minus_negatives_over_batch_size():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    d = uniter.wra_distance(text_hidden, region_hidden, text_mask, region_mask)
    is_match = torch.tensor([True, False, True, False])
    loss = uniter.wra_loss(text_hidden, region_hidden, text_mask, region_mask, is_match)
    assert loss.item() == pytest.approx(((d[0] + d[2]) - (d[1] + d[3])).item() / 4, abs=1e-6)
    all_match = uniter.wra_loss(text_hidden, region_hidden, text_mask, region_mask,
                                torch.ones(4, dtype=torch.long))
    assert all_match.item() == pytest.approx(d.mean().item(), abs=1e-6)


def test_wra_gradient_reaches_the_hidden_states_only_through_the_cost():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    is_match = torch.tensor([True, False, True, False])
    x = text_hidden.float().requires_grad_()
    y = region_hidden.float().requires_grad_()
    uniter.wra_loss(x, y, text_mask, region_mask, is_match).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad[text_mask].abs().sum(-1).min() > 0  # every real token gets a gradient
    assert y.grad[region_mask].abs().sum(-1).min() > 0  # every real region gets a gradient
    assert (x.grad[~text_mask] == 0).all() and (y.grad[~region_mask] == 0).all()

    # the same gradient as a loss in which the plan is a constant computed beforehand
    x2, y2 = text_hidden.float().requires_grad_(), region_hidden.float().requires_grad_()
    cost = 1 - F.normalize(x2, dim=-1, eps=1e-5) @ F.normalize(y2, dim=-1, eps=1e-5).transpose(1, 2)
    cost = cost.masked_fill(~(text_mask[:, :, None] & region_mask[:, None, :]), 0.0)
    plan = uniter.ipot(cost.detach(), text_mask, region_mask)
    sign = is_match.float() * 2 - 1
    ((sign[:, None, None] * cost * plan).sum() / 4).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-7) and torch.allclose(y.grad, y2.grad,
                                                                           atol=1e-7)


def test_wra_runs_in_fp32_for_bf16_hidden_states_and_under_autocast():
    text_hidden, region_hidden, text_mask, region_mask = wra_inputs()
    is_match = torch.ones(4, dtype=torch.bool)
    x, y = text_hidden.bfloat16(), region_hidden.bfloat16()
    loss = uniter.wra_loss(x, y, text_mask, region_mask, is_match)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train.py trains under autocast
        autocast_loss = uniter.wra_loss(x, y, text_mask, region_mask, is_match)
    assert autocast_loss.dtype == torch.float32 and autocast_loss.item() == loss.item()
