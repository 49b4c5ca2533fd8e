"""A command line generated from dataclasses: one typed flag per field (train.py).

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Config, Config.tiny(), "model")   # --d_model 128, --resume, ...
"""

import argparse
import dataclasses


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_flags(parser, cls, defaults, title: str, skip=frozenset(),
                        choices: dict | None = None) -> None:
    """One flag per dataclass field: --name VALUE, typed from the default, shown in --help; a
    bool works bare (--resume = --resume true). Defaults are SUPPRESSed, so the namespace holds
    only what the user typed. Fields in `skip` get no flag; `choices` maps a field to its allowed
    values."""
    group = parser.add_argument_group(title)
    choices = choices or {}
    values = dataclasses.asdict(defaults)
    for field in dataclasses.fields(cls):
        value = values[field.name]
        kind = type(value)
        if kind not in (int, float, str, bool) or field.name in skip:
            continue  # nested or tuple fields are not flags
        extra = dict(type=parse_bool, nargs="?", const=True) if kind is bool else dict(type=kind)
        group.add_argument(f"--{field.name}", default=argparse.SUPPRESS,
                           choices=choices.get(field.name), help=f"(default: {value})",
                           metavar=None if field.name in choices else kind.__name__.upper(),
                           **extra)
