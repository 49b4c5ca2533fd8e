"""shared/checkpoint.py: atomic writes, one-line refusals, and fine-tuning loads that are strict
for the encoder and per head for the heads."""

import pytest
import torch
from torch import nn

from shared.checkpoint import (CheckpointError, load_checkpoint, load_weights, save_checkpoint)


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


def test_save_then_load_round_trips_and_old_or_foreign_files_are_refused(tmp_path):
    save_checkpoint(tmp_path / "a.pt", model={"w": torch.ones(2)}, step=3)
    state = load_checkpoint(tmp_path / "a.pt")
    assert state["step"] == 3 and torch.equal(state["model"]["w"], torch.ones(2))
    assert not (tmp_path / "a.pt.tmp").exists()
    torch.save({"model": {}, "step": 1}, tmp_path / "old.pt")  # the layout before "format"
    with pytest.raises(CheckpointError, match="earlier layout"):
        load_checkpoint(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
