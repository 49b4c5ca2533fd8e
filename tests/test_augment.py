"""shared/augment.py: VirTex's crop -> flip (with the caption swap) -> colour jitter."""

import colorsys

import numpy as np
import pytest
import torch

from shared.augment import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation,
                            color_jitter, hflip_caption, horizontal_flip, hsv_to_rgb,
                            random_resized_crop, rgb_to_grayscale, rgb_to_hsv, virtex_augment)


def random_image(H=16, W=16, seed=0) -> torch.Tensor:
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))  # (3, H, W)


def rng(seed=0) -> np.random.Generator:
    return np.random.default_rng(seed)


# --- random resized crop ---------------------------------------------------------------------

def test_crop_of_the_whole_square_image_at_its_own_size_is_the_identity():
    image = random_image(16, 16)
    out = random_resized_crop(image, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), rng=rng())
    torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_crop_has_the_requested_shape_and_keeps_a_constant_image_constant():
    constant = torch.full((3, 20, 30), 0.37)
    for seed in range(5):
        out = random_resized_crop(constant, 12, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                                  rng=rng(seed))
        assert out.shape == (3, 12, 12)
        torch.testing.assert_close(out, torch.full((3, 12, 12), 0.37), atol=1e-6, rtol=0)


def test_crop_is_a_window_of_the_requested_area_and_ratio():
    # area fraction 1/4 and ratio 1 of a 40 x 40 image: a 20 x 20 window, kept at 20 px, so the
    # output must equal one of the 21 x 21 possible windows exactly.
    image = random_image(40, 40)
    for seed in range(3):
        out = random_resized_crop(image, 20, scale=(0.25, 0.25), ratio=(1.0, 1.0), rng=rng(seed))
        errors = [(out - image[:, i: i + 20, j: j + 20]).abs().max().item()
                  for i in range(21) for j in range(21)]
        assert min(errors) < 1e-6


def test_crop_aspect_ratio_is_width_over_height():
    # Area 1/2 and ratio w / h = 2 of a 40 x 40 image: 20 rows by 40 columns, resized to
    # 20 x 20. Channel 0 holds the row index, channel 1 the column index (both / 39). The 20
    # rows are kept, so channel 0 steps by one row; the 40 columns are halved, so inside the
    # image channel 1 steps by two columns (the antialias filter is symmetric).
    index = torch.arange(40.0) / 39.0  # (40,)
    image = torch.stack([index.view(40, 1).expand(40, 40), index.view(1, 40).expand(40, 40),
                         torch.zeros(40, 40)])  # (3, 40, 40)
    out = random_resized_crop(image, 20, scale=(0.5, 0.5), ratio=(2.0, 2.0), rng=rng())
    row_steps = out[0, 1:, 0] - out[0, :-1, 0]  # (19,)
    torch.testing.assert_close(row_steps, torch.full((19,), 1 / 39.0), atol=1e-6, rtol=0)
    column_steps = out[1, 0, 2:-1] - out[1, 0, 1:-2]  # (17,) away from the borders
    torch.testing.assert_close(column_steps, torch.full((17,), 2 / 39.0), atol=1e-6, rtol=0)


def test_crop_falls_back_to_the_centre_crop_clamped_to_the_ratio():
    # A 10 x 40 image cannot hold a square of its whole area: all 10 tries fail, and the
    # fallback is the centre 10 x 10 square (ratio clamped from 4 to 1).
    image = random_image(10, 40)
    out = random_resized_crop(image, 10, scale=(1.0, 1.0), ratio=(1.0, 1.0), rng=rng())
    torch.testing.assert_close(out, image[:, :, 15:25], atol=1e-6, rtol=0)


# --- horizontal flip and the caption swap ----------------------------------------------------

@pytest.mark.parametrize("caption, expected", [
    ("a red circle to the left of a blue square", "a red circle to the right of a blue square"),
    ("a star is left of a circle and right of a square",
     "a star is right of a circle and left of a square"),
    ("Left hand, Right hand, LEFT", "Right hand, Left hand, RIGHT"),
    ("left-hand side", "right-hand side"),
])
def test_caption_swap_exchanges_left_and_right_as_whole_words(caption, expected):
    assert hflip_caption(caption) == expected


@pytest.mark.parametrize("caption", [
    "a bright star", "an upright bottle", "copyright notice", "leftover pizza", "rightly so",
    "no directions here",
])
def test_caption_swap_leaves_words_that_only_contain_left_or_right_alone(caption):
    # the official code's substring replace would turn "bright" into "bleft"
    assert hflip_caption(caption) == caption


def test_flipping_twice_is_the_identity_for_image_and_caption():
    image = random_image(8, 12)
    caption = "a bright star to the left of an upright Right arrow"
    once_image, once_caption = horizontal_flip(image, caption)
    assert once_caption == "a bright star to the right of an upright Left arrow"
    assert torch.equal(once_image[:, :, 0], image[:, :, -1])  # column x -> W - 1 - x
    twice_image, twice_caption = horizontal_flip(once_image, once_caption)
    assert torch.equal(twice_image, image) and twice_caption == caption


# --- colour: HSV and the four adjustments ----------------------------------------------------

def test_rgb_to_hsv_matches_colorsys_and_round_trips():
    image = random_image(24, 24, seed=1)
    # include greys, black and white, whose hue is undefined (0 by convention)
    image[:, 0, 0] = 0.0
    image[:, 0, 1] = 1.0
    image[:, 0, 2] = 0.5
    hsv = rgb_to_hsv(image)  # (3, H, W)
    for y, x in [(0, 0), (0, 1), (0, 2), (3, 5), (10, 20), (23, 23)]:
        expected = colorsys.rgb_to_hsv(*image[:, y, x].double().tolist())
        assert np.allclose(hsv[:, y, x].double().numpy(), expected, atol=1e-6)
    for seed in range(3):
        image = random_image(32, 32, seed=seed)
        assert (hsv_to_rgb(rgb_to_hsv(image)) - image).abs().max() < 1e-5


def test_hue_shift_zero_is_the_identity_and_a_third_turns_red_into_green():
    image = random_image(16, 16, seed=2)
    assert (adjust_hue(image, 0.0) - image).abs().max() < 1e-5

    def pixel(r, g, b):
        return torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1)  # (3, 1, 1)

    torch.testing.assert_close(adjust_hue(pixel(1, 0, 0), 1 / 3), pixel(0, 1, 0), atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(pixel(0, 1, 0), 1 / 3), pixel(0, 0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(pixel(1, 0, 0), -1 / 3), pixel(0, 0, 1), atol=1e-6,
                               rtol=0)
    # a half turn of orange (hue 1/12) gives azure (hue 7/12): same saturation and value
    torch.testing.assert_close(adjust_hue(pixel(1, 0.5, 0), 0.5), pixel(0, 0.5, 1), atol=1e-6,
                               rtol=0)


def test_saturation_zero_gives_the_grayscale_image():
    image = random_image(seed=3)
    out = adjust_saturation(image, 0.0)
    gray = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]  # (H, W)
    for c in range(3):
        torch.testing.assert_close(out[c], gray, atol=1e-6, rtol=0)
    torch.testing.assert_close(rgb_to_grayscale(image)[0], gray, atol=1e-6, rtol=0)


def test_brightness_zero_gives_black_and_contrast_zero_the_mean_grey():
    image = random_image(seed=4)
    assert torch.equal(adjust_brightness(image, 0.0), torch.zeros_like(image))
    torch.testing.assert_close(adjust_brightness(image, 0.5), image * 0.5)
    grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).mean()
    torch.testing.assert_close(adjust_contrast(image, 0.0), grey.expand(3, 16, 16), atol=1e-6,
                               rtol=0)


def test_adjustments_clamp_to_the_unit_interval():
    image = random_image(seed=5)
    for out in (adjust_brightness(image, 3.0), adjust_contrast(image, 3.0),
                adjust_saturation(image, 3.0), adjust_hue(image, 0.37)):
        assert out.min() >= 0.0 and out.max() <= 1.0
    assert adjust_brightness(image, 3.0).max() == 1.0  # it did need clamping


# --- colour jitter ---------------------------------------------------------------------------

def test_color_jitter_with_all_strengths_zero_is_the_identity():
    image = random_image(seed=6)
    assert torch.equal(color_jitter(image, 0.0, 0.0, 0.0, 0.0, rng()), image)


def test_color_jitter_brightness_factor_is_uniform_in_its_range():
    # brightness only, on a constant 0.5 image: out / 0.5 is the factor, in [0.6, 1.4]
    image = torch.full((3, 2, 2), 0.5)
    factors = np.array([color_jitter(image, 0.4, 0.0, 0.0, 0.0, rng(s))[0, 0, 0].item() / 0.5
                        for s in range(200)])
    assert factors.min() >= 0.6 - 1e-6 and factors.max() <= 1.4 + 1e-6
    assert factors.min() < 0.65 and factors.max() > 1.35 and abs(factors.mean() - 1.0) < 0.05


def test_color_jitter_runs_the_four_operations_in_a_random_order(monkeypatch):
    import shared.augment as augment

    calls = []
    for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"):
        original = getattr(augment, name)
        monkeypatch.setattr(augment, name, lambda image, factor, _name=name, _original=original:
                            calls.append(_name) or _original(image, factor))
    image = random_image(seed=7)
    orders = set()
    for s in range(30):
        calls.clear()
        out = augment.color_jitter(image, 0.4, 0.4, 0.4, 0.1, rng(s))
        assert out.shape == image.shape and out.min() >= 0.0 and out.max() <= 1.0
        assert sorted(calls) == ["adjust_brightness", "adjust_contrast", "adjust_hue",
                                 "adjust_saturation"]
        orders.add(tuple(calls))
    assert len(orders) >= 10  # 24 orders possible, 30 draws
    calls.clear()
    augment.color_jitter(image, 0.4, 0.0, 0.4, 0.0, rng())  # zero strengths are skipped
    assert sorted(calls) == ["adjust_brightness", "adjust_saturation"]


# --- the VirTex pipeline ---------------------------------------------------------------------

def uint8_image(H=24, W=32, seed=0) -> np.ndarray:
    return np.random.default_rng([seed, 99]).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def test_virtex_augment_is_a_pure_function_of_the_seed_and_stays_in_range():
    image, caption = uint8_image(), "a red circle to the left of a blue square"
    outputs = [virtex_augment(image, caption, rng(seed), size=16) for seed in (0, 0, 1, 2)]
    (a, ca), (b, cb), (c, _), (d, _) = outputs
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, c) and not torch.equal(a, d) and not torch.equal(c, d)
    for out, cap in outputs:
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert cap in (caption, "a red circle to the right of a blue square")


def test_virtex_augment_flips_image_and_caption_together():
    image = uint8_image(16, 16)
    expected = torch.from_numpy(image).permute(2, 0, 1).float().flip(-1) / 255.0  # (3, 16, 16)
    out, caption = virtex_augment(image, "a star to the left of a bright square", rng(), size=16,
                                  crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=1.0,
                                  jitter_prob=0.0)
    assert caption == "a star to the right of a bright square"
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    out, caption = virtex_augment(image, "left", rng(), size=16, crop_scale=(1.0, 1.0),
                                  crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0)
    assert caption == "left"
    torch.testing.assert_close(out, expected.flip(-1), atol=1e-6, rtol=0)


# --- argument checks -------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: random_resized_crop(torch.rand(16, 16), 8, (0.2, 1.0), (0.75, 1.33), rng()),
     r"shape \(3, H, W\)"),
    (lambda: random_resized_crop(torch.rand(4, 16, 16), 8, (0.2, 1.0), (0.75, 1.33), rng()),
     r"shape \(3, H, W\)"),
    (lambda: random_resized_crop(torch.zeros(3, 8, 8, dtype=torch.uint8), 8, (0.2, 1.0),
                                 (0.75, 1.33), rng()), "float"),
    (lambda: random_resized_crop(torch.rand(3, 8, 8), 8, (0.0, 1.0), (0.75, 1.33), rng()),
     "scale"),
    (lambda: random_resized_crop(torch.rand(3, 8, 8), 8, (0.2, 1.5), (0.75, 1.33), rng()),
     "scale"),
    (lambda: random_resized_crop(torch.rand(3, 8, 8), 8, (0.9, 0.2), (0.75, 1.33), rng()),
     "scale"),
    (lambda: random_resized_crop(torch.rand(3, 8, 8), 8, (0.2, 1.0), (1.33, 0.75), rng()),
     "ratio"),
    (lambda: random_resized_crop(torch.rand(3, 8, 8), 0, (0.2, 1.0), (0.75, 1.33), rng()),
     "size"),
    (lambda: random_resized_crop(torch.rand(3, 8, 8), 8, (0.2, 1.0), (0.75, 1.33), 0), "rng"),
    (lambda: adjust_hue(torch.rand(3, 4, 4), 0.7), "hue shift"),
    (lambda: adjust_brightness(torch.rand(3, 4, 4), -0.1), "brightness"),
    (lambda: color_jitter(torch.rand(3, 4, 4), 0.4, 0.4, 0.4, 0.6, rng()), "hue"),
    (lambda: color_jitter(torch.rand(3, 4, 4), -0.4, 0.4, 0.4, 0.1, rng()), "brightness"),
    (lambda: virtex_augment(np.zeros((8, 8, 3), np.float32), "", rng(), 8), "uint8"),
    (lambda: virtex_augment(np.zeros((8, 8), np.uint8), "", rng(), 8), r"\(H, W, 3\)"),
    (lambda: virtex_augment(np.zeros((8, 8, 3), np.uint8), "", rng(), 8, flip_prob=1.5),
     "flip_prob"),
    (lambda: virtex_augment(np.zeros((8, 8, 3), np.uint8), "", rng(), 8, hue=0.6), "hue"),
])
def test_bad_arguments_raise_value_errors_that_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()
