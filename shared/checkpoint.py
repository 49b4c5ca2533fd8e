"""Checkpoints: written atomically, read with a one-line error, loaded encoder-strict.

    save_checkpoint(path, **state)   torch.save to a temp file, then an atomic rename
    write_json_atomic(path, obj)     the same for JSON
    load_checkpoint(path)            the dict back; a missing, truncated, foreign or old file is
                                     refused in one line (CheckpointError)
    load_weights(model, state)       fine-tuning: every encoder tensor strictly, each head whose
                                     name the checkpoint also has; returns the heads left fresh
    rng_states / set_rng_states      Python, NumPy, torch (and CUDA) generators, for exact resume

The model convention (all four paper files): parameters that depend on the task live under
`heads.<name>.` (an nn.ModuleDict called `heads`); every other tensor is the encoder's and is the
same for every task.
"""

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = 2  # checkpoints of the layout before encoder + heads have no "format" key


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def save_checkpoint(path: Path, **state) -> None:
    """torch.save to a temp file in the same folder, then an atomic rename: a run killed while
    saving leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`. Raises CheckpointError, in one line, for a missing or unreadable
    file and for a checkpoint of the earlier layout (no "format" key)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which file, not a pickle trace
        raise CheckpointError(f"could not read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of train.py")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by an earlier layout of this project (format "
                              f"{state.get('format', 1)}, this one reads {FORMAT}); retrain it")
    return state


def _head(name: str) -> str | None:
    """"heads.mlm.transform.weight" -> "mlm"; an encoder tensor -> None."""
    parts = name.split(".")
    return parts[1] if parts[0] == "heads" and len(parts) > 2 else None


def load_weights(model: nn.Module, state: dict) -> list[str]:
    """Load a checkpoint's model state for fine-tuning: the encoder strictly (every tensor, same
    shapes, nothing extra), and each of the model's heads that the checkpoint also has, strictly.
    Returns the names of the model's heads that keep their fresh initialisation.
    Raises CheckpointError naming the first tensor that does not fit."""
    own = model.state_dict()
    encoder = {k for k in own if _head(k) is None}
    theirs = {k for k in state if _head(k) is None}
    if encoder != theirs:
        missing, extra = sorted(encoder - theirs), sorted(theirs - encoder)
        what = f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the model has not"
        raise CheckpointError(f"the checkpoint's encoder does not fit this model: it {what} "
                              f"(same --model and --preset?)")
    heads = sorted({_head(k) for k in own} - {None})
    loaded = [h for h in heads if any(_head(k) == h for k in state)]
    merged = {k: state[k] if _head(k) is None or _head(k) in loaded else v
              for k, v in own.items() if _head(k) is None or _head(k) not in loaded}
    for h in loaded:
        mine = {k for k in own if _head(k) == h}
        given = {k for k in state if _head(k) == h}
        if mine != given:
            raise CheckpointError(f"the checkpoint's head {h!r} does not fit this model's: "
                                  f"{sorted(mine ^ given)[0]!r}")
        merged.update({k: state[k] for k in given})
    for k, v in merged.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"the checkpoint's {k} is {tuple(v.shape)}, the model's is "
                                  f"{tuple(own[k].shape)} (same --preset and --vocab?)")
    model.load_state_dict(merged, strict=True)
    return [h for h in heads if h not in loaded]


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
