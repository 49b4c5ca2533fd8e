"""--tensorboard and the run's numbers on disk (shared.monitor.RunLog): every number a progress
line prints and every evaluation metric, read back with TensorBoard's own reader at its step; a
resumed run over a crashed one's events; the one-line error without the package; a full disk."""

import errno
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from shared.monitor import (TENSORBOARD_MISSING, THROUGHPUT, RunLog, Throughput,
                            progress_line)

ROOT = Path(__file__).resolve().parents[1]
# The default model (CoCa tiny) for a few steps: a progress line a step, one periodic evaluation
# (step 3) and the final one (step 6), on few examples.
SHORT = ["--max_steps", "6", "--log_every_s", "0", "--num_workers", "0", "--tokenizer_texts",
         "50", "--final_n", "8", "--eval_n", "8", "--eval_every", "3", "--batch_size", "16"]
# A much smaller CoCa (tests/test_train.py's sizes) where the model does not matter.
SMALLER = ["--batch_size", "4", "--vision_width", "32", "--vision_heads", "2", "--vision_layers",
           "1", "--text_width", "32", "--text_heads", "2", "--unimodal_layers", "1",
           "--multimodal_layers", "1", "--n_caption_queries", "4", "--embed_dim", "16",
           "--max_text_len", "12", "--warmup_steps", "2", "--vocab_size", "200", "--image_size",
           "32"]


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the event files in `folder`, as TensorBoard loads them (after its
    purge of a restarted run's steps); a step written twice would show as fewer points."""
    reader = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    reader.Reload()
    out = {}
    for tag in reader.Tags()["scalars"]:
        events = reader.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step written twice"
    return out


def printed_numbers(line: str) -> dict[str, str]:
    """{tag: the number as printed} of a progress line "step s/m | terms | lr x | speed | eta":
    each loss term as train/<term>, lr as train/lr, each rate as throughput/<key>."""
    _, terms, lr, speed, _ = line.split(" | ")
    words = terms.split()
    numbers = {f"train/{name}": value for name, value in zip(words[::2], words[1::2])}
    numbers["train/lr"] = lr.split()[1]
    label_to_key = {label: key for key, label in THROUGHPUT.items()}
    for value, label in re.findall(r"(\S+) (steps/s|ex/s|tok/s)", speed):
        numbers[f"throughput/{label_to_key[label]}"] = value
    if "MFU" in speed:
        numbers["throughput/mfu"] = str(float(re.search(r"MFU (\S+)%", speed)[1]) / 100)
    return numbers


def half_unit(text: str) -> float:
    """Half the last printed digit of a number: how far the printed value may be from the one
    it rounds ("18.0378": 5e-5; "1.00e-05": 5e-8; "27": 0.5)."""
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.partition(".")[2])
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def test_every_printed_number_and_metric_is_a_scalar_at_its_step(tmp_path):
    lines = []
    run, paper, overrides = train.parse_args([*SHORT, "--tensorboard", "--out", str(tmp_path)])
    train.train(run, paper, overrides, log=lines.append)
    found = scalars(tmp_path / "tensorboard")
    progress = {int(line.split()[1].split("/")[0]): line for line in lines
                if line.startswith("step ")}
    assert sorted(progress) == [1, 2, 3, 4, 5, 6]
    tags = set()
    for step, line in progress.items():
        for tag, text in printed_numbers(line).items():
            tags.add(tag)
            assert step in found.get(tag, {}), (tag, step)
            # the event holds the number the line printed (as a float32), to the printed digits
            assert abs(found[tag][step] - float(text)) <= half_unit(text) + 1e-6 * abs(
                float(text)), (tag, step, found[tag][step], text)
    assert {"train/loss", "train/contrastive", "train/captioning", "train/lr",
            "throughput/steps_per_s", "throughput/examples_per_s",
            "throughput/tokens_per_s"} <= tags
    # progress.jsonl: the same numbers, one record per progress line
    records = [json.loads(row) for row in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [(s, "train") for s in range(1, 7)]
    for record in records:
        for key, value in record.items():
            if key not in ("step", "split"):
                group = "throughput" if key in THROUGHPUT else "train"
                assert found[f"{group}/{key}"][record["step"]] == pytest.approx(value, rel=1e-6)
    # metrics.jsonl stays one record per evaluation; each metric is a scalar at its step
    evaluations = [json.loads(row) for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in evaluations] == [(3, "val"), (6, "test")]
    for record in evaluations:
        metrics = {k: v for k, v in record.items() if k not in ("step", "split")}
        assert {"zero_shot_acc", "i2t_r1", "cider", "linear_probe_acc"} <= set(metrics)
        for name, value in metrics.items():
            tag = f"{record['split']}/{name}"
            assert set(found[tag]) == {record["step"]}, tag
            assert found[tag][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30)


def test_a_resumed_run_replaces_the_steps_a_crashed_run_wrote_past_its_checkpoint(tmp_path):
    """The run stops at step 3 (latest.pt), then a crash is faked: events at steps 4 and 5 that
    no checkpoint holds. The resumed run writes steps 4 to 6 again, and TensorBoard shows each
    step once, with the resumed run's values (purge_step), and steps 1 to 3 kept."""
    from torch.utils.tensorboard import SummaryWriter

    common = [*SMALLER, "--max_steps", "6", "--log_every_s", "0", "--num_workers", "0",
              "--tokenizer_texts", "50", "--final_n", "8", "--tensorboard", "--out",
              str(tmp_path)]
    run, paper, overrides = train.parse_args([*common, "--stop_at", "3"])
    train.train(run, paper, overrides, log=lambda line: None)
    first = scalars(tmp_path / "tensorboard")["train/loss"]
    assert sorted(first) == [1, 2, 3]
    with SummaryWriter(str(tmp_path / "tensorboard")) as crashed:
        for step in (4, 5):
            crashed.add_scalar("train/loss", 999.0, step)
    run, paper, overrides = train.parse_args([*common, "--resume"])
    train.train(run, paper, overrides, log=lambda line: None)
    loss = scalars(tmp_path / "tensorboard")["train/loss"]
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert 999.0 not in loss.values()
    assert all(loss[step] == first[step] for step in (1, 2, 3))
    records = [json.loads(row) for row in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in records} == pytest.approx(loss, rel=1e-6)


def test_without_the_package_the_flag_stops_at_start_in_one_line(tmp_path, monkeypatch):
    """As if tensorboard were not installed (an import of it fails): one line, before the run
    writes anything; RunLog (what train.train opens) says the same."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main(["--tensorboard", "--out", str(out)])
    assert stopped.value.code == TENSORBOARD_MISSING
    assert TENSORBOARD_MISSING == ("error: --tensorboard needs the tensorboard package: "
                                   "pip install tensorboard")
    assert not out.exists()
    with pytest.raises(SystemExit, match="needs the tensorboard package"):
        RunLog(tmp_path, tensorboard=True)
    with RunLog(tmp_path) as log:  # without the flag it is never imported
        log.eval(1, "val", {"acc": 0.5})
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["acc"] == 0.5


def test_without_the_flag_nothing_imports_tensorboard(tmp_path):
    code = ("import sys, train\n"
            f"run, paper, overrides = train.parse_args(['--out', {str(tmp_path)!r}])\n"
            f"with train.RunLog({str(tmp_path)!r}) as log:\n"
            "    log.train(1, {'loss': 1.0, 'lr': 0.1, 'steps_per_s': 2.0})\n"
            "    log.eval(1, 'val', {'acc': 0.5})\n"
            "print(sorted(m for m in sys.modules if 'tensorboard' in m))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_progress_line_prints_the_numbers_it_is_given(monkeypatch):
    from types import SimpleNamespace

    from shared import monitor

    clock = iter([100.0, 102.0])  # the window: 2 seconds
    monkeypatch.setattr(monitor, "time", SimpleNamespace(time=lambda: next(clock)))
    speed = Throughput(batch_size=64, mfu_flops=0.125)
    speed.add(300)
    speed.add(500)
    numbers = {"loss": 1.23456, "contrastive": 0.5, "lr": 1e-4, **speed.read()}
    assert numbers == {"loss": 1.23456, "contrastive": 0.5, "lr": 1e-4, "steps_per_s": 1.0,
                       "examples_per_s": 64.0, "tokens_per_s": 400.0, "mfu": 0.125}
    assert progress_line(3, 10, numbers, 10) == (
        "step 3/10 | loss 1.2346 contrastive 0.5000 | lr 1.00e-04 | 1.00 steps/s 64 ex/s "
        "400 tok/s MFU 12.5% | eta 0m07s")
    assert printed_numbers(progress_line(3, 10, numbers, 10))["throughput/mfu"] == "0.125"


def test_a_full_disk_is_one_warning_a_file_and_the_run_goes_on(tmp_path, monkeypatch):
    """progress.jsonl on /dev/full (every write fails with ENOSPC): one warning, however many
    lines; metrics.jsonl still written. TensorBoard failing: one warning, then no more writes."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    (tmp_path / "progress.jsonl").symlink_to("/dev/full")
    warnings = []
    with RunLog(tmp_path, tensorboard=True, log=warnings.append) as log:
        for step in (1, 2, 3):
            log.train(step, {"loss": 1.0, "lr": 0.1})
        log.eval(3, "val", {"acc": 0.5})
        assert len(warnings) == 1 and "progress.jsonl" in warnings[0], warnings
        assert "No space left on device" in warnings[0]

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(log.writer, "add_scalar", full)
        log.eval(4, "val", {"acc": 0.6})
        log.eval(5, "val", {"acc": 0.7})
    assert len(warnings) == 2 and "without TensorBoard" in warnings[1], warnings
    assert [json.loads(r)["acc"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        == [0.5, 0.6, 0.7]
    assert scalars(tmp_path / "tensorboard")["val/acc"] == {3: 0.5}
