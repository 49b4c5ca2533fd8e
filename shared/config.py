"""What every paper's Config shares: the optimisation fields train.py reads, and their checks.

Each paper's Config (coca.py, virtex.py, uniter.py, oscar.py) is its own dataclass, with the
paper's defaults beside each field. These fields mean the same in all four, so they are checked
once, here:

    batch_size, max_steps, grad_accum_steps, lr_schedule, warmup_steps, grad_clip, lr,
    weight_decay, beta1, beta2

and, by name, every field of a Config: numbers finite, integers not negative, `*dropout*` in
[0, 1), `*_prob` in [0, 1], `*lr` > 0 (a typo such as --lr nan or --dropout 1.5 is refused at start,
naming the flag, instead of surfacing as a traceback from inside torch.optim or as NaN weights)

and the region papers' (Oscar, UNITER) BERT encoder and downstream fields:

    hidden_size, heads, layers, intermediate_size, feature_dim, init_std, dropout, task,
    eval_pairs
"""

import dataclasses
import math

LR_SCHEDULES = ("cosine", "linear")  # train.py's schedules after the warmup
# The recipe: what a fine-tuning run (--init) takes from its preset and flags, not from the
# checkpoint it starts from; every other field (sizes, vocabulary, image statistics, answers)
# is the checkpoint's model and comes with it.
RECIPE = ("task", "batch_size", "max_steps", "grad_accum_steps", "lr_schedule", "warmup_steps",
          "grad_clip", "lr", "weight_decay", "beta1", "beta2", "adam_eps")


def optimisation_problems(config) -> list[str]:
    """The problems with a Config's optimisation fields, one line each ([] = none). A Config's
    __post_init__ adds its own and raises one ValueError with all of them."""
    c, problems = config, field_problems(config)
    if not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        problems.append(f"beta1 and beta2 must be in [0, 1), not {c.beta1} and {c.beta2}")
    if c.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule must be 'cosine' or 'linear', not {c.lr_schedule!r}")
    if 0 in (c.batch_size, c.max_steps, c.grad_accum_steps):  # < 0: field_problems
        problems.append("batch_size, max_steps and grad_accum_steps must be >= 1")
    elif c.batch_size % c.grad_accum_steps:
        problems.append(f"batch_size {c.batch_size} is not divisible by grad_accum_steps "
                        f"{c.grad_accum_steps}")
    return problems


def field_problems(config) -> list[str]:
    """The checks every numeric field gets from its type and name, one line each."""
    problems = []
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{name} must be a finite number, not {value}")
        elif value < 0:
            problems.append(f"{name} must be >= 0, not {value}")
        elif "dropout" in name and not value < 1:
            problems.append(f"{name} must be in [0, 1), not {value}")
        elif name.endswith("_prob") and not value <= 1:
            problems.append(f"{name} is a probability: it must be in [0, 1], not {value}")
        elif name.endswith("lr") and not value > 0:
            problems.append(f"{name} must be > 0, not {value}")
    return problems


def encoder_problems(config, tasks: tuple[str, ...]) -> list[str]:
    """The problems with the BERT encoder and task fields of Oscar's and UNITER's Configs."""
    c, problems = config, []
    if c.hidden_size % c.heads:
        problems.append(f"hidden_size {c.hidden_size} is not divisible by heads {c.heads}")
    if min(c.layers, c.heads, c.intermediate_size, c.feature_dim) < 1:
        problems.append("layers, heads, intermediate_size and feature_dim must be >= 1")
    if not c.init_std > 0:
        problems.append(f"init_std must be > 0, not {c.init_std}")
    if c.task not in tasks:
        problems.append(f"task must be one of {', '.join(tasks)}, not {c.task!r}")
    if c.eval_pairs < 2:
        problems.append(f"eval_pairs must be >= 2, not {c.eval_pairs}")
    return problems
