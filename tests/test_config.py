"""shared/config.py: every paper's Config rejects the same bad optimisation settings with the
same one-line message, and every numeric field gets the checks its type and name imply (finite,
not negative, dropouts and probabilities in range, learning rates positive)."""

import importlib

import pytest


@pytest.mark.parametrize("paper", ["coca", "virtex", "uniter", "oscar"])
@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=10, grad_accum_steps=3), "not divisible by grad_accum_steps"),
    (dict(max_steps=0), "must be >= 1"),
    (dict(lr_schedule="step"), "lr_schedule must be 'cosine' or 'linear'"),
    (dict(warmup_steps=-1), "warmup_steps must be >= 0, not -1"),
    (dict(lr=float("nan")), "lr must be a finite number, not nan"),
    (dict(lr=0.0), "lr must be > 0"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
    (dict(grad_clip=float("inf")), "grad_clip must be a finite number"),
    (dict(beta2=1.0), "beta1 and beta2 must be in \\[0, 1\\)"),
    (dict(dropout=1.5), "dropout must be in \\[0, 1\\), not 1.5"),
    (dict(train_single_object_prob=1.5), "train_single_object_prob is a probability"),
    (dict(batch_size=-4), "batch_size must be >= 0, not -4"),
])
def test_every_config_checks_the_optimisation_fields(paper, overrides, message):
    config_class = importlib.import_module(paper).Config
    with pytest.raises(ValueError, match=message):
        config_class.tiny().__class__(**{**vars(config_class.tiny()), **overrides})
