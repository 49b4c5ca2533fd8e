"""VirTex's training data augmentation, written with torch and numpy only.

    Karan Desai, Justin Johnson. VirTex: Learning Visual Representations from Textual
    Annotations. CVPR 2021; arXiv 2006.06666v3. `[VirTex §Implementation]` cites the paper's
    implementation details (VirTex is cited by part names, not section numbers: see virtex.py);
    `official code` means github.com/kdexd/virtex (virtex/config.py, virtex/factories.py,
    virtex/data/transforms.py).

What VirTex does to every training image [VirTex §Implementation; official code:
`_C.DATA.IMAGE_TRANSFORM_TRAIN`; every number below is virtex/factories.py's
ImageTransformsFactory and virtex/config.py's crop size], in this order:

    1. random resized crop   area fraction in (0.2, 1.0), aspect ratio in (3/4, 4/3)
                             (log-uniform), resized to 224 x 224              random_resized_crop
    2. horizontal flip       p = 0.5, and the caption's "left" and "right"
                             are interchanged so that it stays true            horizontal_flip
    3. colour jitter         p = 0.8; brightness 0.4, contrast 0.4,
                             saturation 0.4, hue 0.1 (official code)           color_jitter
    4. normalise             ImageNet mean / std: done by the caller with
                             shared.data.IMAGE_MEAN / IMAGE_STD

`virtex_augment` runs steps 1-3 and returns a float image in [0, 1]. The official code keeps
the hue limit small because captions often name colours and a hue shift changes them; the
strengths above are the official code's.

A note for the synthetic world (shared/world.py): its captions state colour, size and count.
A strong crop can cut an object out (the count turns false) or blow a small object up to the
size of a large one, and a large hue shift can turn "red" into "orange". The VirTex config in
virtex.py decides the values; its CPU preset (`Config.tiny`) uses milder ones than the paper's
(a narrower crop-area range, weaker jitter, little or no hue shift).

Everything random is drawn from the numpy Generator passed in, never from torch's or Python's
global generators, so an augmented item is a pure function of the generator's seed.

Shapes: images are channel-first float tensors (3, H, W) with values in [0, 1]; (3, h, w) is
a crop; the output of the crop is (3, size, size). Channels are R, G, B.
"""

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# Luma weights of ITU-R BT.601, the ones torchvision and PIL use for RGB -> grayscale.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CROP_ATTEMPTS = 10  # tries at a crop that fits before falling back to the centre crop


# --- 1. Argument checks ---------------------------------------------------------------------

def _check_image(image: Tensor) -> None:
    """A float tensor (3, H, W) with H, W >= 1, or a ValueError that says what is wrong."""
    if not isinstance(image, Tensor):
        raise ValueError(f"image must be a torch.Tensor (3, H, W), got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise ValueError(f"image must have shape (3, H, W), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")


def _check_rng(rng) -> None:
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                         f"got {type(rng).__name__}")


def _check_range(name: str, pair, low: float, high: float, low_open: bool) -> tuple[float, float]:
    """`pair` = (a, b) with low < a (or low <= a) and a <= b <= high, returned as floats."""
    if len(pair) != 2:
        raise ValueError(f"{name} must be a pair (min, max), got {pair!r}")
    a, b = float(pair[0]), float(pair[1])
    above_low = a > low if low_open else a >= low
    if not (above_low and a <= b <= high):
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must satisfy {low} {'<' if low_open else '<='} min <= max "
                         f"<= {high}, i.e. lie within {bracket}{low}, {high}], got {pair!r}")
    return a, b


def _check_factor(name: str, factor: float) -> None:
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {factor}")


def _check_jitter(brightness: float, contrast: float, saturation: float, hue: float) -> None:
    """Jitter strengths: brightness, contrast, saturation >= 0; hue in [0, 0.5] turns."""
    for name, strength in (("brightness", brightness), ("contrast", contrast),
                           ("saturation", saturation)):
        _check_factor(name, strength)
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue must be in [0, 0.5] (turns of the hue circle), got {hue}")


# --- 2. Random resized crop [VirTex §Implementation] ---------------------------------------

def random_resized_crop(image: Tensor, size: int, scale: tuple[float, float],
                        ratio: tuple[float, float], rng: np.random.Generator) -> Tensor:
    """Crop a random box of area fraction in `scale` and aspect ratio (w / h) in `ratio`, then
    resize it to (3, size, size).

    The usual algorithm (Inception's "random sized crop", as in torchvision and albumentations,
    which the official code uses): up to 10 times, draw the area fraction uniformly in `scale`
    and the aspect ratio log-uniformly in `ratio` (so 3/4 and 4/3 are equally likely); the first
    box that fits in the image is placed uniformly at random. If none fits, take the largest
    centre crop whose aspect ratio is clamped to `ratio`.

    image: (3, H, W) float in [0, 1]. Returns (3, size, size) float in [0, 1].
    """
    _check_image(image)
    _check_rng(rng)
    if not (isinstance(size, (int, np.integer)) and size >= 1):
        raise ValueError(f"size must be an int >= 1, got {size!r}")
    scale = _check_range("scale", scale, 0.0, 1.0, low_open=True)  # area fraction in (0, 1]
    ratio = _check_range("ratio", ratio, 0.0, math.inf, low_open=True)  # w / h, positive
    _, H, W = image.shape
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    box = None  # (top, left, h, w)
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])  # pixels the crop should cover
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))  # w / h, log-uniform
        w = int(round(math.sqrt(target_area * aspect)))  # w·h = target_area, w / h = aspect
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(rng.integers(0, H - h + 1))  # uniform over the placements that fit
            left = int(rng.integers(0, W - w + 1))
            box = (top, left, h, w)
            break
    if box is None:
        # Fallback: the whole image, narrowed (or flattened) to the nearest allowed ratio.
        in_ratio = W / H
        if in_ratio < ratio[0]:  # too tall: keep the width, cut the height
            w, h = W, int(round(W / ratio[0]))
        elif in_ratio > ratio[1]:  # too wide: keep the height, cut the width
            w, h = int(round(H * ratio[1])), H
        else:
            w, h = W, H
        box = ((H - h) // 2, (W - w) // 2, h, w)

    top, left, h, w = box
    crop = image[:, top: top + h, left: left + w]  # (3, h, w)
    # DEVIATION: antialiased bilinear resize because shrinking a large crop without a low-pass
    # filter aliases; albumentations' OpenCV INTER_LINEAR (the official code) does not filter.
    # The triangle filter has non-negative weights, so the result stays in [0, 1] up to
    # rounding, which the clamp removes.
    out = F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True,
                        align_corners=False)[0]  # (3, size, size)
    return out.clamp(0.0, 1.0)  # (3, size, size)


# --- 3. Horizontal flip with the caption swap [VirTex §Implementation] ---------------------

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", flags=re.IGNORECASE)
_SWAP = {"left": "right", "right": "left"}


def _swap_word(match: re.Match) -> str:
    """"left" -> "right", "Left" -> "Right", "LEFT" -> "RIGHT" (and back)."""
    word = match.group(0)
    swapped = _SWAP[word.lower()]
    if word.isupper():
        return swapped.upper()
    if word[0].isupper():
        return swapped.capitalize()
    return swapped


def hflip_caption(caption: str) -> str:
    """Swap the whole words "left" <-> "right" in a caption, keeping their case.

    Mirroring the image turns "a cat to the left of a dog" false unless the caption says
    "right" instead [VirTex §Implementation; official code: the flip swaps the two words].

    DEVIATION: whole words only (regular-expression word boundaries). The official code does a
    substring replace (caption.replace("left", "[TMP]").replace("right", "left")...), which also
    rewrites words that merely contain "right" or "left": "bright" becomes "bleft", "upright"
    "upleft", "copyright" "copyleft", "leftover" "rightover". Here those words do not change.
    The swap is its own inverse: hflip_caption(hflip_caption(c)) == c.
    """
    return _LEFT_RIGHT.sub(_swap_word, caption)


def horizontal_flip(image: Tensor, caption: str) -> tuple[Tensor, str]:
    """Mirror the image left <-> right and swap "left" / "right" in its caption.

    image: (3, H, W). Returns ((3, H, W), caption)."""
    _check_image(image)
    return image.flip(-1), hflip_caption(caption)  # (3, H, W): column x -> W - 1 - x


# --- 4. Colour: grayscale, HSV and the four adjustments -------------------------------------
# Each adjustment is a blend `factor · image + (1 - factor) · reference` (the formulation of
# PIL's ImageEnhance and torchvision), clamped to [0, 1]; factor 1 is the identity.

def rgb_to_grayscale(image: Tensor) -> Tensor:
    """(3, H, W) RGB -> (1, H, W) luma 0.299 R + 0.587 G + 0.114 B."""
    _check_image(image)
    weights = torch.tensor(GRAY_WEIGHTS, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)  # (1, H, W)


def _blend(image: Tensor, reference: Tensor, factor: float) -> Tensor:
    """factor · image + (1 - factor) · reference, clamped to [0, 1]; reference broadcasts."""
    return (factor * image + (1.0 - factor) * reference).clamp(0.0, 1.0)  # (3, H, W)


def adjust_brightness(image: Tensor, factor: float) -> Tensor:
    """Blend with black: image · factor. 0 gives a black image, 1 the image. (3, H, W)."""
    _check_image(image)
    _check_factor("brightness factor", factor)
    return _blend(image, torch.zeros_like(image), factor)  # (3, H, W)


def adjust_contrast(image: Tensor, factor: float) -> Tensor:
    """Blend with the mean grey level of the image (one number, the mean of its grayscale).
    0 gives a uniform grey image, 1 the image, > 1 more contrast. (3, H, W)."""
    _check_image(image)
    _check_factor("contrast factor", factor)
    mean = rgb_to_grayscale(image).mean()  # () the image's mean luma
    return _blend(image, mean, factor)  # (3, H, W)


def adjust_saturation(image: Tensor, factor: float) -> Tensor:
    """Blend with the grayscale image, per pixel. 0 gives grey (all channels equal), 1 the
    image, > 1 more saturated colours. (3, H, W)."""
    _check_image(image)
    _check_factor("saturation factor", factor)
    gray = rgb_to_grayscale(image)  # (1, H, W), broadcast over the 3 channels
    return _blend(image, gray, factor)  # (3, H, W)


def rgb_to_hsv(image: Tensor) -> Tensor:
    """(3, H, W) RGB in [0, 1] -> (3, H, W) hue, saturation, value, each in [0, 1].

    The hexcone model (Python's colorsys, written for tensors). With max = max(R, G, B),
    min = min(R, G, B), delta = max - min:
        V = max,   S = delta / max (0 where max = 0),
        H = (one sixth of a turn) · { (G - B) / delta        if R is the max
                                    { 2 + (B - R) / delta    if G is the max
                                    { 4 + (R - G) / delta    if B is the max,
    taken modulo one turn; grey pixels (delta = 0) get H = 0.
    """
    r, g, b = image.unbind(0)  # (H, W) each
    maxc = image.amax(0)  # (H, W)
    minc = image.amin(0)  # (H, W)
    delta = maxc - minc  # (H, W)
    value = maxc  # (H, W)
    saturation = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1.0), 0.0)  # (H, W)
    safe = torch.where(delta > 0, delta, 1.0)  # (H, W), no division by zero for grey pixels
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe  # (H, W) each
    # (G - B) / delta = bc - gc, (B - R) / delta = rc - bc, (R - G) / delta = gc - rc
    sixths = torch.where(maxc == r, bc - gc,
                         torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))  # (H, W)
    hue = torch.where(delta > 0, (sixths / 6.0) % 1.0, 0.0)  # (H, W) in [0, 1)
    return torch.stack([hue, saturation, value])  # (3, H, W)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """(3, H, W) hue, saturation, value in [0, 1] -> (3, H, W) RGB in [0, 1].

    The hue circle is cut into six sectors i = floor(6 H) mod 6 with position f = 6 H - floor(6 H)
    inside the sector; with p = V (1 - S), q = V (1 - S f), t = V (1 - S (1 - f)):
        sector   0  1  2  3  4  5
        R        V  q  p  p  t  V
        G        t  V  V  q  p  p
        B        p  p  t  V  V  q
    """
    hue, saturation, value = hsv.unbind(0)  # (H, W) each
    sector_float = torch.floor(hue * 6.0)  # (H, W)
    f = hue * 6.0 - sector_float  # (H, W) in [0, 1)
    sector = sector_float.long() % 6  # (H, W) in 0..5 (hue = 1 is sector 0 again)
    p = value * (1.0 - saturation)  # (H, W)
    q = value * (1.0 - saturation * f)  # (H, W)
    t = value * (1.0 - saturation * (1.0 - f))  # (H, W)
    v = value
    table = torch.stack([torch.stack([v, q, p, p, t, v]),  # R by sector: (6, H, W)
                         torch.stack([t, v, v, q, p, p]),  # G
                         torch.stack([p, p, t, v, v, q])])  # B -> (3, 6, H, W)
    index = sector[None, None].expand(3, 1, *sector.shape)  # (3, 1, H, W)
    return table.gather(1, index)[:, 0]  # (3, H, W)


def adjust_hue(image: Tensor, shift: float) -> Tensor:
    """Turn every pixel's hue by `shift` turns of the hue circle (in [-0.5, 0.5]), keeping its
    saturation and value: RGB -> HSV, H <- (H + shift) mod 1, HSV -> RGB. 1/3 turn takes pure
    red to pure green; 0 is the identity (up to float rounding). (3, H, W)."""
    _check_image(image)
    if not -0.5 <= shift <= 0.5:
        raise ValueError(f"hue shift must be in [-0.5, 0.5] turns, got {shift}")
    hsv = rgb_to_hsv(image)  # (3, H, W)
    hue = (hsv[0] + shift) % 1.0  # (H, W)
    rgb = hsv_to_rgb(torch.stack([hue, hsv[1], hsv[2]]))  # (3, H, W)
    return rgb.clamp(0.0, 1.0)  # (3, H, W)


# --- 5. Colour jitter [VirTex §Implementation; official code: b, c, s 0.4, hue 0.1, p 0.8]

def color_jitter(image: Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float, rng: np.random.Generator) -> Tensor:
    """Random brightness, contrast, saturation and hue, applied in a random order.

    Factors are drawn uniformly: brightness in [max(0, 1 - brightness), 1 + brightness], the
    same for contrast and saturation; the hue shift in [-hue, hue] turns. The four operations
    run in an order drawn from `rng`, as torchvision's and albumentations' ColorJitter do (the
    official code uses albumentations'). A strength of 0 skips its operation (its factor would
    be 1 anyway, or a hue shift of 0). image: (3, H, W) -> (3, H, W), values in [0, 1].
    """
    _check_image(image)
    _check_rng(rng)
    _check_jitter(brightness, contrast, saturation, hue)

    order = rng.permutation(4)  # which operation runs first, second, ...
    ops = [(adjust_brightness, brightness), (adjust_contrast, contrast),
           (adjust_saturation, saturation)]
    for k in order:
        if k < 3:
            op, strength = ops[k]
            if strength > 0:
                factor = rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)
                image = op(image, float(factor))  # (3, H, W)
        elif hue > 0:
            image = adjust_hue(image, float(rng.uniform(-hue, hue)))  # (3, H, W)
    return image  # (3, H, W)


# --- 6. The VirTex pipeline: crop -> flip -> jitter [VirTex §Implementation] ---------------

def virtex_augment(image_uint8: np.ndarray, caption: str, rng: np.random.Generator, size: int,
                   crop_scale: tuple[float, float] = (0.2, 1.0),
                   crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                   flip_prob: float = 0.5, jitter_prob: float = 0.8,
                   brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                   hue: float = 0.1) -> tuple[Tensor, str]:
    """One training pair, augmented as VirTex does: random resized crop to (size, size), then a
    horizontal flip with probability `flip_prob` (swapping "left"/"right" in the caption), then
    colour jitter with probability `jitter_prob`. Defaults are the official code's
    (virtex/factories.py, ImageTransformsFactory).

    image_uint8: (H, W, 3) uint8 as the world renders it. Returns ((3, size, size) float in
    [0, 1], caption). Normalising with IMAGE_MEAN / IMAGE_STD is the caller's job. Every random
    draw comes from `rng`, in a fixed order (crop, flip coin, jitter coin, jitter), so the
    output is a pure function of the generator's state.
    """
    if not isinstance(image_uint8, np.ndarray) or image_uint8.dtype != np.uint8:
        raise ValueError("image_uint8 must be a numpy uint8 array (H, W, 3), got "
                         f"{type(image_uint8).__name__} {getattr(image_uint8, 'dtype', '')}")
    if image_uint8.ndim != 3 or image_uint8.shape[2] != 3:
        raise ValueError(f"image_uint8 must have shape (H, W, 3), got {image_uint8.shape}")
    for name, prob in (("flip_prob", flip_prob), ("jitter_prob", jitter_prob)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {prob}")
    # Checked here, not only when the jitter coin comes up, so a bad config fails every time.
    _check_jitter(brightness, contrast, saturation, hue)
    _check_rng(rng)

    image = torch.from_numpy(np.ascontiguousarray(image_uint8)).permute(2, 0, 1)  # (3, H, W)
    image = image.float() / 255.0  # (3, H, W) in [0, 1]
    image = random_resized_crop(image, size, crop_scale, crop_ratio, rng)  # (3, size, size)
    # Both coins are tossed whatever the probabilities, so the jitter draws come at the same
    # place in the stream for every flip_prob.
    if rng.random() < flip_prob:  # rng.random() is in [0, 1): p = 0 never, p = 1 always
        image, caption = horizontal_flip(image, caption)  # (3, size, size)
    if rng.random() < jitter_prob:
        image = color_jitter(image, brightness, contrast, saturation, hue, rng)  # (3, size, size)
    return image, caption  # (3, size, size) in [0, 1], str
