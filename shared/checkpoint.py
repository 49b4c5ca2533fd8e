"""Checkpoints: plain data only, written atomically, read without running code, refused in one line.

    save_checkpoint(path, previous=None, **state)  torch.save to a temp file, then an atomic
                                     rename (the file it replaces becomes `previous`, if given)
    write_json_atomic(path, obj)     the same for JSON
    writable_folder(path, flag)      --out made and tried with a temp file, refused in one line
    load_checkpoint(path)            the dict back, read with torch.load(weights_only=True); a
                                     missing, truncated, foreign or old file is refused in one
                                     line (CheckpointError; UnreadableCheckpoint when the bytes
                                     themselves are bad)
    check_origin(state, path, model, task)   one line when a checkpoint is another model's
    read_checkpoint(path, model, task)       load_checkpoint, then check_origin when model given
    read_latest(out, model, task, log)       --resume: latest.pt, or latest.prev.pt when the
                                     newer file is unreadable
    load_weights(model, state)       fine-tuning: every encoder tensor strictly, each head whose
                                     name the checkpoint also has; returns the heads left fresh
    rng_states / set_rng_states      Python, NumPy, torch (and CUDA) generators, for exact resume
    seed_all(seed)                   seeds all of them
    ReleasedWeights(source, state_dict, wanted)   a converter's bookkeeping: take, put, copy,
                                     finish (converted_state)
    converted_state(source, unused, ours, wanted)   a converter's result, refused in one line
                                     unless every released tensor found a place and every
                                     tensor of the model was set, in its shape
    append_jsonl(path, record)       one JSON line more; a failure is returned, not raised

Why plain data: torch.load(weights_only=False) unpickles anything, and a pickle can name any
Python callable, so a downloaded checkpoint could run a command on load. A checkpoint here holds
only tensors, numbers, strings, lists, tuples and dicts: the model and optimizer state dicts, the
config as a dict, the tokenizer as its JSON text, the generators' states as tensors and tuples.
That is what torch's weights-only unpickler accepts, and it refuses everything else unread.

The model convention (all four paper files): parameters that depend on the task live under
`heads.<name>.` (an nn.ModuleDict called `heads`); every other tensor is the encoder's and is the
same for every task.
"""

import errno
import json
import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

FORMAT = 2  # checkpoints of the layout before encoder + heads have no "format" key
KEYS = ("model", "optimizer", "step", "best", "rng", "config", "run", "tokenizer")  # train.py's


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written; the message names the file and the reason."""


class UnreadableCheckpoint(CheckpointError):
    """The file is missing, truncated or not a torch file: an older copy may still be good."""


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _write_error(path: Path, e: OSError) -> CheckpointError:
    """One line for a failed write: which file, why, and how much room the folder has."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"could not write {path}: {e.strerror or e} ({free}); "
                           f"the previous copy is intact")


def save_checkpoint(path: Path, previous: Path | None = None, **state) -> None:
    """torch.save to a temp file in the same folder, then an atomic rename: a run killed while
    saving leaves the previous checkpoint intact. With `previous`, the file being replaced is
    first renamed to it, so one older good checkpoint is always on disk. A failed write (a full
    disk) removes the temp file and raises CheckpointError in one line."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            torch.save({"format": FORMAT, **state}, tmp)
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            raise (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if _full(tmp) else
                   OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0][:100]}")
                   ) from None
        if previous is not None and path.exists():
            os.replace(path, previous)  # until the next line, only `previous` exists: a resume
        os.replace(tmp, path)  # falls back to it (train.py)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from None


def _full(path: Path) -> bool:
    """Whether the filesystem of `path` has (next to) no room left: what a failed write there
    most likely ran into."""
    try:
        return shutil.disk_usage(path.parent).free < 2**20
    except OSError:
        return False


def writable_folder(path: Path, flag: str = "--out") -> Path:
    """`path` made (with its parents) and tried with a temporary file: a run learns at its start,
    not at its first checkpoint, that the folder is a file, read-only or on a full disk. A
    ValueError naming `flag` and the reason; under torchrun every rank tries (its own temp
    file), so all stop together before any collective."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except FileExistsError:
        raise ValueError(f"{flag} {path}: is a file, not a folder") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return path


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from None


def _unsafe_globals(path: Path) -> list[str]:
    """The Python names a pickle would call, listed without calling them ([] when the file is
    not a torch file, or with a torch older than 2.5)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, read with the weights-only unpickler. Raises CheckpointError, in
    one line, for a file holding Python objects (not loaded: it could run code), for one that is
    not train.py's or lacks its keys, and for the earlier layout; UnreadableCheckpoint for a
    missing, truncated or non-torch file."""
    path = Path(path)
    if not path.exists():
        raise UnreadableCheckpoint(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        names = _unsafe_globals(path)
        if not names:  # not a pickle of objects at all: bytes that are no torch file
            raise UnreadableCheckpoint(f"could not read checkpoint {path}: not a torch file "
                                       f"({str(e).splitlines()[0][:80]})") from None
        raise CheckpointError(
            f"{path} holds Python objects besides tensors and plain data ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); it was not loaded, because unpickling them "
            f"could run code (this project's checkpoints hold none; its earlier versions' held "
            f"NumPy arrays: retrain those)") from None
    except Exception as e:  # truncated, or not a torch file: the first line of torch's reason
        raise UnreadableCheckpoint(f"could not read checkpoint {path}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                                   ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of train.py (no model state in it)")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} was written by an earlier layout of this project (format "
                              f"{state.get('format', 1)}, this one reads {FORMAT}); retrain it")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint of train.py: it lacks "
                              f"{', '.join(missing)}")
    return state


def check_origin(state: dict, path: Path, model: str, task: str | None = None) -> None:
    """One line when `state` (a checkpoint read from `path`) was trained as another model, or
    (if `task` is given) another task, than the run that wants it."""
    run = state["run"] if isinstance(state["run"], dict) else {}
    theirs = (run.get("model"), state["config"].get("task") if isinstance(state["config"], dict)
              else None)
    if theirs[0] != model:
        raise CheckpointError(f"{path} is a {theirs[0]} checkpoint (task {theirs[1]}); "
                              f"--model {model} needs one of its own")
    if task is not None and theirs[1] != task:
        raise CheckpointError(f"{path} is a --task {theirs[1]} run of {model}; resume it with "
                              f"that --task, not {task}")


def read_checkpoint(path: Path, model: str | None = None, task: str | None = None) -> dict:
    """load_checkpoint; with `model` (and `task`), a checkpoint trained as another model (or
    task) is refused too. Every problem is a CheckpointError of one line."""
    state = load_checkpoint(path)
    if model is not None:
        check_origin(state, path, model, task)
    return state


def read_latest(out: Path, model: str, task: str, log) -> dict | None:
    """--resume: <out>/latest.pt, or the copy it replaced (latest.prev.pt) when latest.pt is
    missing or unreadable (truncated by a crash, a full disk, a bad copy). None, said in one
    line, when there is neither yet: a job that a scheduler requeues with the same --resume
    command starts fresh the first time."""
    latest, previous = Path(out) / "latest.pt", Path(out) / "latest.prev.pt"
    if not latest.exists() and not previous.exists():
        log(f"--resume: no checkpoint in {out} yet: starting the run from step 0")
        return None
    try:
        return read_checkpoint(latest, model, task)
    except UnreadableCheckpoint as e:
        if not previous.exists():
            raise
        state = read_checkpoint(previous, model, task)
        log(f"warning: {e}; resuming from the checkpoint before it, {previous} "
            f"(step {state['step']})")
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
    """Every generator's state as tensors and tuples of ints (the weights-only unpickler reads
    both; NumPy's key array is kept as an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(),
              "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                        float(gauss)),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's generators (torch seeds CUDA's too) from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def append_jsonl(path: Path, record: dict) -> str | None:
    """Append `record` to the JSON-lines file `path`. Returns None, or the reason it could not
    (a full disk): a metrics log is worth a warning, not the run."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        return f"could not append to {path}: {e.strerror or e}"
    return None


def converted_state(source: str, unused: list[str], ours: dict, wanted: dict,
                    origin: dict | None = None, dtype: torch.dtype | None = torch.float32) -> dict:
    """The state dict a converter of released weights built (the papers' CONVERTERS), checked:
    `unused` the released tensors it found no place for, `ours` {our name: tensor}, `wanted`
    {our name: shape} of the model, `origin` {our name: the released name} where the converter
    kept it (the shape error then names the released tensor). Any leftover, any tensor of the model not set, any shape
    not the model's is a ValueError of one line naming them. Returns the tensors in the
    model's order, each with its own contiguous storage (in `dtype`; None: as released)."""
    def listed(names: list[str]) -> str:
        return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")

    if unused:
        raise ValueError(f"{source} tensors this model has no place for: {listed(sorted(unused))}")
    unset = sorted(set(wanted) - set(ours))
    if unset:
        raise ValueError(f"tensors of the model no {source} tensor sets: {listed(unset)}")
    bad = [f"{origin[n]} gives {n}" if origin and n in origin else n
           for n, shape in wanted.items() if ours[n].shape != shape]
    if bad:
        n = next(n for n, shape in wanted.items() if ours[n].shape != shape)
        raise ValueError(f"{source} tensors of the wrong shape: {listed(bad)} (the first "
                         f"{tuple(ours[n].shape)}, the model's {tuple(wanted[n])})")
    return {n: (ours[n].detach() if dtype is None else ours[n].detach().to(dtype)).clone(
        memory_format=torch.contiguous_format) for n in wanted}


class ReleasedWeights:
    """What a converter of released weights (the papers' CONVERTERS) keeps track of while it
    maps one state dict onto a model: the released tensors it took (`used`), the tensors of the
    model it set (`ours`) and the released name each came from (`origin`). `wanted` is {our
    name: shape} of the model; `hint` ends the message for a tensor the release lacks."""

    def __init__(self, source: str, state_dict: dict, wanted: dict, hint: str = ""):
        self.source, self.state_dict, self.wanted, self.hint = source, state_dict, wanted, hint
        self.ours, self.origin, self.used = {}, {}, set()

    def take(self, key: str) -> torch.Tensor:
        """The released tensor `key`, marked used; a ValueError naming it where it is missing."""
        if key not in self.state_dict:
            raise ValueError(f"the {self.source} weights lack {key}{self.hint}")
        self.used.add(key)
        return self.state_dict[key]

    def put(self, name: str, key: str, tensor: torch.Tensor) -> None:
        """Our tensor `name` is `tensor`, made from the released `key`."""
        self.ours[name], self.origin[name] = tensor, key

    def copy(self, name: str, key: str, parts=("weight", "bias")) -> None:
        """A module copied as it is (a Linear, a LayerNorm, an Embedding: parts ("weight",))."""
        for part in parts:
            self.put(f"{name}.{part}", f"{key}.{part}", self.take(f"{key}.{part}"))

    def finish(self, dtype: torch.dtype | None = torch.float32) -> dict:
        """converted_state over what was taken and set."""
        return converted_state(self.source, list(set(self.state_dict) - self.used), self.ours,
                               self.wanted, self.origin, dtype)
