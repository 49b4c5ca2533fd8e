"""A command line generated from dataclasses: one typed flag per field (train.py), whose help is
the field's comment in the class source.

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Config, Config.tiny(), "model")   # --d_model 128, --resume, ...
    known_flags(argv, Run)                   a first pass: the dataclass's flags alone
    split_flags(args, Run)                   (a Run from its fields' flags, the other flags)
    number_problems(values, at_least_one)   what is wrong with numeric flags, one line each
    with one_line("--data: "): ...           an OSError / ValueError inside ends the program
                                             with "error: --data: <reason>", no stack trace
"""

import argparse
import ast
import contextlib
import dataclasses
import functools
import inspect
import io
import math
import textwrap
import tokenize


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """{field: its comment} from the dataclass's source: the `# comment` at the end of the
    field's line with the indented `#   ...` lines that continue it, else the comment lines right
    above the field. Fields without one, or a class without source, are left out."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {token.start[0]: token.string for token in
                tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}  # line -> "# text"
    lines = source.splitlines()
    alone = {n for n in comments if lines[n - 1].lstrip().startswith("#")}  # comment-only lines
    fields = [node for node in ast.parse(source).body[0].body
              if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)]
    found = {node.target.id: _comment_of(node, comments, alone) for node in fields}
    return {name: text for name, text in found.items() if text}


def _comment_of(node: ast.AnnAssign, comments: dict[int, str], alone: set[int]) -> str:
    """The comment text of one field (field_comments), "# " markers dropped, lines joined."""
    continues = lambda n: n in alone and comments[n].startswith("#  ")  # "#   more of it"
    if node.end_lineno in comments and node.end_lineno not in alone:  # on the field's line
        n, parts = node.end_lineno + 1, [comments[node.end_lineno]]
        while continues(n):
            parts.append(comments[n])
            n += 1
    else:  # the comment lines right above it
        n, parts = node.lineno - 1, []
        while n in alone and not continues(n):
            parts.insert(0, comments[n])
            n -= 1
    return " ".join(part.lstrip("#").strip() for part in parts)


def add_dataclass_flags(parser, cls, defaults, title: str, skip=frozenset(),
                        choices: dict | None = None) -> None:
    """One flag per dataclass field: --name VALUE, typed from the default, shown in --help with
    the field's comment (field_comments); a bool works bare (--resume = --resume true). Defaults
    are SUPPRESSed, so the namespace holds only what the user typed. Fields in `skip` get no
    flag; `choices` maps a field to its allowed values."""
    group = parser.add_argument_group(title)
    choices = choices or {}
    values = dataclasses.asdict(defaults)
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        value = values[field.name]
        kind = type(value)
        if kind not in (int, float, str, bool) or field.name in skip:
            continue  # nested or tuple fields are not flags
        extra = dict(type=parse_bool, nargs="?", const=True) if kind is bool else dict(type=kind)
        text = f"{comments.get(field.name, '')} (default: {value})".strip()
        group.add_argument(f"--{field.name}", default=argparse.SUPPRESS,
                           choices=choices.get(field.name), help=text.replace("%", "%%"),
                           metavar=None if field.name in choices else kind.__name__.upper(),
                           **extra)


def number_problems(values: dict, at_least_one=()) -> list[str]:
    """One line per numeric flag that is negative, NaN or infinite, per flag in `at_least_one`
    that is 0, and for a seed NumPy cannot take (it takes 32-bit seeds)."""
    problems = [f"argument --{name}: must be a finite number >= 0, not {value}"
                for name, value in values.items()
                if not isinstance(value, (bool, str)) and not 0 <= value < math.inf]
    problems += [f"argument --{name}: must be >= 1, not 0" for name in at_least_one
                 if values[name] == 0]
    if values.get("seed", 0) >= 2**32:
        problems.append(f"argument --seed: must be < 2**32, not {values['seed']}")
    return problems


@contextlib.contextmanager
def one_line(what: str):
    """Bad input (an OSError or ValueError: a file, a flag, a checkpoint) ends the program with
    one line naming it, 'error: <what><reason>', never a stack trace."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {what}{e}") from None


def known_flags(argv: list[str], cls, choices: dict | None = None):
    """A first pass over argv: an instance of the dataclass `cls` from the flags of its fields,
    every other flag left for the full parser (e.g. --model picks which Config's flags exist)."""
    first = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(first, cls, cls(), "", choices=choices)
    return dataclasses.replace(cls(), **vars(first.parse_known_args(argv)[0]))


def split_flags(args: dict, cls) -> tuple:
    """(An instance of the dataclass `cls` from the parsed flags that are its fields, the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return (dataclasses.replace(cls(), **{k: v for k, v in args.items() if k in names}),
            {k: v for k, v in args.items() if k not in names})
