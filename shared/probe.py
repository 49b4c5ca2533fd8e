"""The linear probe shared by the four papers: how good are frozen image features?

VirTex's main evaluation [VirTex §Downstream: linear probe] trains a linear classifier on
features of a frozen image encoder. CoCa's frozen-feature evaluation [CoCa §3.3, §4.2.1] instead
learns an attentional pooler and a softmax classifier on the frozen encoder's outputs; the linear
probe on its pooled contrastive embedding stands in for it here. The classifier is a multinomial
logistic regression fitted with full-batch L-BFGS on the world's classification view
(`ClassificationWorld`: single-object images, 36 (colour, shape) classes) and tested on another
split. The paper file decides what a "feature" is: CoCa's pooled contrastive embedding, VirTex's
globally pooled layer-4 activations, both L2-normalised.

Shapes: n images, D feature width, C classes.
"""

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from shared.metrics import top1_accuracy


def _features(embed: Callable[[list[np.ndarray]], Tensor], world, count: int,
              chunk: int) -> tuple[Tensor, Tensor]:
    """The first `count` items of a ClassificationWorld -> (features (n, D), labels (n,))."""
    items = [world.item(i) for i in range(min(count, len(world)))]
    images = [image for image, _ in items]
    x = torch.cat([embed(images[s:s + chunk]).float()
                   for s in range(0, len(images), chunk)])  # (n, D)
    return x, torch.tensor([label for _, label in items], device=x.device)  # (n,)


def linear_probe(embed: Callable[[list[np.ndarray]], Tensor], world_config, split: str, n: int,
                 n_train: int | None = None, steps: int = 200,
                 l2s: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1), chunk: int = 250) -> float:
    """Top-1 accuracy of a linear classifier on frozen features.

    Args:
        embed: list of uint8 (H, W, 3) images -> (m, D) features; called under torch.no_grad()
            by the caller's evaluate(), with the model in eval mode (BatchNorm statistics frozen).
        world_config: the run's WorldConfig (image size, seed).
        split: the test split ("val" or "test"); the classifier is fitted on "train".
        n: test images. n_train: training images (default: 2·n, clamped to 100 .. 1000).
        steps: L-BFGS iterations. l2s: candidate weight decays on W, one picked on held-out
            training images (OURS: the values; the papers also pick theirs by validation).
    Returns:
        accuracy in [0, 1] on the n test images (chance is 1/36).
    """
    if n < 1:
        raise ValueError(f"linear_probe needs n >= 1 test images, got {n}")
    from shared.world import CLASS_NAMES, ClassificationWorld  # read here only: see shared/data.py
    n_train = n_train or min(1000, max(100, 2 * n))
    x_train, y_train = _features(embed, ClassificationWorld(world_config, "train"), n_train, chunk)
    x_test, y_test = _features(embed, ClassificationWorld(world_config, split), n, chunk)
    return probe_accuracy(x_train, y_train, x_test, y_test, len(CLASS_NAMES), steps, l2s)


def probe_accuracy(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                   n_classes: int, steps: int = 200,
                   l2s: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)) -> float:
    """Top-1 accuracy on (x_test (n, D), y_test (n,)) of the linear classifier over n_classes
    fitted on (x_train (m, D), y_train (m,)): the fit of linear_probe, for features of any
    source (the world, or image folders on disk: infer.py probe). The weight decay is chosen on
    the last fifth of the training rows, so they must be in random order (not class by class)."""
    # OURS: standardise each feature with the training set's mean and std. L2-normalised features
    # of a random or young network differ between images by tiny amounts; without this the fit
    # depends on their scale (a weight-decayed classifier cannot reach large enough weights).
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-6)  # (D,), (D,)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std  # (m, D), (n, D)
    # the weight decay is chosen as VirTex / SimCLR choose the SVM's C: by accuracy on held-out
    # training images (the last fifth), then the classifier is refitted on all of them
    n_fit = len(x_train) * 4 // 5
    held_out = {}
    for l2 in l2s:
        params = _fit(x_train[:n_fit], y_train[:n_fit], l2, steps, n_classes)
        held_out[l2] = float(top1_accuracy(_predict(params, x_train[n_fit:]), y_train[n_fit:]))
    best = max(l2s, key=lambda l2: (held_out[l2], l2))  # ties: the stronger decay
    params = _fit(x_train, y_train, best, steps, n_classes)
    return float(top1_accuracy(_predict(params, x_test), y_test))


def _fit(x: Tensor, y: Tensor, l2: float, steps: int, C: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, full-batch L-BFGS: x (m, D), y (m,) -> W (D, C), b (C,)."""
    W = torch.zeros(x.shape[1], C, device=x.device, requires_grad=True)  # (D, C)
    b = torch.zeros(C, device=x.device, requires_grad=True)  # (C,)
    with torch.enable_grad():  # the caller runs under no_grad; the probe itself is trained
        optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ W + b, y) + l2 * W.pow(2).sum()  # ()
            loss.backward()
            return loss
        optimizer.step(closure)
    return W.detach(), b.detach()


def _predict(params: tuple[Tensor, Tensor], x: Tensor) -> Tensor:
    W, b = params
    return x @ W + b  # (n, C) logits
