"""shared/checkpoint.py: atomic writes that keep the previous copy, weights-only reads that refuse
a pickle that would run code, one-line refusals, and fine-tuning loads that are strict for the
encoder and per head for the heads."""

import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.filesystems import tmpfs
from shared.checkpoint import (CheckpointError, UnreadableCheckpoint, check_origin,
                               load_checkpoint, load_weights, rng_states, save_checkpoint,
                               set_rng_states)


class Model(nn.Module):
    """An encoder and the heads of one task, as the paper files build them."""

    def __init__(self, heads: dict[str, int], width: int = 4):
        super().__init__()
        self.encoder = nn.Linear(3, width)
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in heads.items()})


def test_the_encoder_loads_strictly_and_same_named_heads_come_along():
    torch.manual_seed(0)
    pretrained = Model({"itm": 2, "mlm": 5})
    finetune = Model({"itm": 2, "vqa": 7})
    fresh_vqa = finetune.heads["vqa"].weight.detach().clone()
    assert load_weights(finetune, pretrained.state_dict()) == ["vqa"]
    assert torch.equal(finetune.encoder.weight, pretrained.encoder.weight)
    assert torch.equal(finetune.heads["itm"].weight, pretrained.heads["itm"].weight)
    assert torch.equal(finetune.heads["vqa"].weight, fresh_vqa)  # kept its initialisation
    assert load_weights(Model({"itm": 2, "mlm": 5}), pretrained.state_dict()) == []


def test_an_encoder_that_does_not_fit_is_refused_naming_the_tensor():
    state = Model({"itm": 2}).state_dict()
    with pytest.raises(CheckpointError, match="is \\(8, 3\\), the model's is \\(4, 3\\)"):
        load_weights(Model({"itm": 2}), Model({"itm": 2}, width=8).state_dict() | {
            "heads.itm.weight": state["heads.itm.weight"],
            "heads.itm.bias": state["heads.itm.bias"]})
    with pytest.raises(CheckpointError, match="lacks 'encoder.bias'"):
        load_weights(Model({}), {"encoder.weight": torch.zeros(4, 3)})
    with pytest.raises(CheckpointError, match="has 'extra'"):
        load_weights(Model({}), Model({}).state_dict() | {"extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="head 'itm'"):
        load_weights(Model({"itm": 2}), Model({}).state_dict() | {
            "heads.itm.weight": torch.zeros(2, 4)})


def full(step: int, **extra) -> dict:
    """A checkpoint with every key train.py writes."""
    return dict(model={"w": torch.ones(2) * step}, optimizer={"state": {}, "param_groups": []},
                step=step, best=-1.0, rng=rng_states(), config={"task": "pretrain"},
                run={"model": "coca"}, tokenizer="{}", **extra)


def test_save_then_load_round_trips_and_old_or_foreign_files_are_refused(tmp_path):
    save_checkpoint(tmp_path / "a.pt", **full(3))
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["step"] == 3 and torch.equal(state["model"]["w"], 3 * torch.ones(2))
    assert not (tmp_path / "a.pt.tmp").exists()
    torch.save({"model": {}, "step": 1}, tmp_path / "old.pt")  # the layout before "format"
    with pytest.raises(CheckpointError, match="earlier layout"):
        load_checkpoint(tmp_path / "old.pt")
    save_checkpoint(tmp_path / "part.pt", model={}, step=1)
    with pytest.raises(CheckpointError, match="not a complete checkpoint .* lacks optimizer, best"):
        load_checkpoint(tmp_path / "part.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableCheckpoint, match="could not read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UnreadableCheckpoint, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    good = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[:len(good) // 2])  # a copy cut short
    with pytest.raises(UnreadableCheckpoint, match="could not read checkpoint .*cut.pt: [^\\n]*$"):
        load_checkpoint(tmp_path / "cut.pt")


class Payload:
    """A pickle that runs a command when it is loaded: what a crafted checkpoint would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"format": 2, **full(1), "extra": Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe way runs it...
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="holds Python objects .*posix.system.*not loaded"):
        load_checkpoint(tmp_path / "evil.pt")  # ...ours refuses it, and nothing ran
    assert not marker.exists()
    np_state = {"format": 2, **full(1), "rng": {"numpy": np.random.get_state()}}
    torch.save(np_state, tmp_path / "numpy.pt")  # the earlier version's RNG state
    with pytest.raises(CheckpointError, match="numpy"):
        load_checkpoint(tmp_path / "numpy.pt")


def test_latest_keeps_the_copy_it_replaces(tmp_path):
    latest, previous = tmp_path / "latest.pt", tmp_path / "latest.prev.pt"
    save_checkpoint(latest, previous, **full(1))
    assert not previous.exists()
    save_checkpoint(latest, previous, **full(2))
    assert load_checkpoint(latest)["step"] == 2 and load_checkpoint(previous)["step"] == 1


def test_a_failed_write_leaves_no_temp_file_and_the_previous_copies_intact(tmp_path, monkeypatch):
    latest, previous = tmp_path / "latest.pt", tmp_path / "latest.prev.pt"
    save_checkpoint(latest, previous, **full(1))
    save_checkpoint(latest, previous, **full(2))

    def disk_full(obj, f):
        Path(f).write_bytes(b"the first bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write .*latest.pt: No space left on "
                                              "device .*MiB free there.*previous copy is intact"):
        save_checkpoint(latest, previous, **full(3))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.prev.pt", "latest.pt"]
    assert load_checkpoint(latest)["step"] == 2 and load_checkpoint(previous)["step"] == 1


def test_check_origin_names_the_model_and_task_found_and_wanted(tmp_path):
    state = full(1)
    check_origin(state, tmp_path / "c.pt", "coca", "pretrain")  # its own: no complaint
    with pytest.raises(CheckpointError, match="c.pt is a coca checkpoint .*--model virtex"):
        check_origin(state, tmp_path / "c.pt", "virtex")
    with pytest.raises(CheckpointError, match="--task pretrain run of coca; .* not caption"):
        check_origin(state, tmp_path / "c.pt", "coca", "caption")


def test_generator_states_survive_the_weights_only_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path / "r.pt", **full(1))
    expected = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_states(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 6 MiB filesystem: a full disk as torch.save meets it (tests/filesystems.py)."""
    with tmpfs(tmp_path / "small", "size=6m") as folder:
        yield folder


def test_a_really_full_disk_is_one_line_and_leaves_no_temp_file(small_filesystem):
    path = small_filesystem / "latest.pt"
    with pytest.raises(CheckpointError, match="could not write .*latest.pt: No space left on "
                                              "device .*the previous copy is intact"):
        save_checkpoint(path, model={"w": torch.zeros(4_000_000)})
    assert not any(small_filesystem.iterdir())  # no latest.pt.tmp


def test_train_py_on_a_really_full_disk_ends_in_one_line(small_filesystem):
    """CoCa tiny's latest.pt (weights and AdamW's moments, ~22 MB) cannot fit in 6 MiB: the run's
    last checkpoint fails, and the run ends with that line, no traceback, no temp file."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "train.py", "--max_steps", "1", "--warmup_steps", "0",
                           "--final_n", "4", "--num_workers", "0", "--tokenizer_texts", "50",
                           "--out", str(small_filesystem / "run")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "No space left on device" in last
    assert "Traceback" not in done.stderr
    assert not list((small_filesystem / "run").glob("*.tmp"))


@pytest.fixture
def read_only_filesystem(tmp_path):
    """A real read-only filesystem: root writes into a chmod 555 folder, so only a mount shows
    the refusal everyone else meets (tests/filesystems.py)."""
    with tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


def test_an_out_folder_that_is_a_file_or_read_only_is_refused_at_once(tmp_path,
                                                                      read_only_filesystem):
    from shared.checkpoint import writable_folder

    assert writable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"  # made, with parents
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the trial file is gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*file: is a file, not a folder$"):
        writable_folder(tmp_path / "file")
    with pytest.raises(ValueError, match=r"cannot write there \(Not a directory\)"):
        writable_folder(tmp_path / "file" / "run")
    for out in (read_only_filesystem, read_only_filesystem / "run"):
        with pytest.raises(ValueError, match=r"cannot write there \(Read-only file system\)"):
            writable_folder(out)


@pytest.mark.parametrize("where", ["file", "read-only"])
def test_train_py_refuses_such_an_out_before_any_work(tmp_path, read_only_filesystem, where):
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" if where == "file" else read_only_filesystem / "run"
    done = subprocess.run([sys.executable, "train.py", "--max_steps", "1", "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: --out {out}: " + ("is a file, not a folder" if where == "file" else
                                   "cannot write there (Read-only file system)")]
    assert done.stdout == ""  # nothing was built, read or trained
