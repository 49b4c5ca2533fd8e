"""What every paper's Config shares: the optimisation fields train.py reads, and their checks.

Each paper's Config (coca.py, virtex.py, uniter.py, oscar.py) is its own dataclass, with the
paper's defaults beside each field. These fields mean the same in all four, so they are checked
once, here:

    batch_size, max_steps, grad_accum_steps, lr_schedule, warmup_steps, grad_clip

and the region papers' (Oscar, UNITER) BERT encoder and downstream fields:

    hidden_size, heads, layers, intermediate_size, feature_dim, init_std, dropout, task,
    eval_pairs
"""

LR_SCHEDULES = ("cosine", "linear")  # train.py's schedules after the warmup


def optimisation_problems(config) -> list[str]:
    """The problems with a Config's optimisation fields, one line each ([] = none). A Config's
    __post_init__ adds its own and raises one ValueError with all of them."""
    c, problems = config, []
    if c.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule must be 'cosine' or 'linear', not {c.lr_schedule!r}")
    if min(c.batch_size, c.max_steps, c.grad_accum_steps) < 1:
        problems.append("batch_size, max_steps and grad_accum_steps must be >= 1")
    elif c.batch_size % c.grad_accum_steps:
        problems.append(f"batch_size {c.batch_size} is not divisible by grad_accum_steps "
                        f"{c.grad_accum_steps}")
    if c.warmup_steps < 0 or c.grad_clip < 0:
        problems.append("warmup_steps and grad_clip must be >= 0 (grad_clip 0 = off)")
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
    if not 0 <= c.dropout < 1:
        problems.append(f"dropout must be in [0, 1), not {c.dropout}")
    if c.task not in tasks:
        problems.append(f"task must be one of {', '.join(tasks)}, not {c.task!r}")
    if c.eval_pairs < 2:
        problems.append(f"eval_pairs must be >= 2, not {c.eval_pairs}")
    return problems
