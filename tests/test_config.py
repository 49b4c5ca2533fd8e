"""shared/config.py: every paper's Config rejects the same bad optimisation settings with the
same one-line message."""

import importlib

import pytest


@pytest.mark.parametrize("paper", ["coca", "virtex", "uniter", "oscar"])
@pytest.mark.parametrize("overrides, message", [
    (dict(batch_size=10, grad_accum_steps=3), "not divisible by grad_accum_steps"),
    (dict(max_steps=0), "must be >= 1"),
    (dict(lr_schedule="step"), "lr_schedule must be 'cosine' or 'linear'"),
    (dict(warmup_steps=-1), "warmup_steps and grad_clip must be >= 0"),
])
def test_every_config_checks_the_optimisation_fields(paper, overrides, message):
    config_class = importlib.import_module(paper).Config
    with pytest.raises(ValueError, match=message):
        config_class.tiny().__class__(**{**vars(config_class.tiny()), **overrides})
