"""What a training loop watches without slowing it: loss terms, non-finite values, MFU.

    LossMeter         per-term running means and the first NaN/inf step, kept on the device so
                      that a step needs no host-device sync; read once per progress line
    NonFiniteLoss     raised by LossMeter.check, naming the step and the term
    peak_flops        the dense bf16 peak of an H100 / H200 / A100, else None
    step_flops        the FLOPs of one forward + backward, counted once by FlopCounterMode
    format_duration   seconds -> "4m05s" / "1h02m"
    mfu_per_step      a step's FLOPs over the GPU's peak, counted on the stream's first batch
    Throughput        steps, tokens and seconds since the last progress line: steps/s, ex/s,
                      tok/s, MFU
    progress_line     the line train.py prints every log_every_s, from a dict of its numbers
    metrics_text      a metrics dict as "key value ..."
    summary_writer_class   torch's TensorBoard SummaryWriter, or one line: the package is missing
    RunLog            a run's numbers on disk: metrics.jsonl, progress.jsonl, TensorBoard scalars
    StopSignals       SIGTERM / Ctrl-C: finish the step, checkpoint, stop
"""

import itertools
import signal
import threading
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from shared.checkpoint import append_jsonl

# Dense bf16 peak of the GPUs this project is measured on (NVIDIA's data sheets, SXM parts, no
# sparsity), for the model FLOPs utilisation in the progress line; another GPU shows no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class NonFiniteLoss(RuntimeError):
    """Raised when a loss term becomes NaN or inf; the message names the step and the term."""


class LossMeter:
    """Sums and counts of every loss term since the last read, and the first step at which each
    term was NaN/inf (-1 = never), as device tensors. A paper that trains one task a step
    (UNITER) returns different terms on different steps, so each term keeps its own count."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.first_bad: dict[str, Tensor] = {}

    def add(self, losses: dict[str, Tensor], step: int) -> None:
        """Record one micro-batch's terms (scalars on the device); no sync."""
        for name, value in losses.items():
            value = value.detach().float()  # (), stays on the device
            if name not in self.sums:
                self.sums[name] = torch.zeros((), device=self.device)
                self.counts[name] = 0
                self.first_bad[name] = torch.full((), -1, dtype=torch.long, device=self.device)
            self.sums[name] += value
            self.counts[name] += 1
            newly_bad = ~torch.isfinite(value) & (self.first_bad[name] < 0)
            self.first_bad[name] = torch.where(newly_bad, step, self.first_bad[name])

    def check(self, where: str) -> None:
        """One sync: raise NonFiniteLoss if any term was NaN/inf since the start. `where` says
        what was kept (the last good checkpoint)."""
        if not self.first_bad:
            return
        steps = torch.stack(list(self.first_bad.values())).tolist()
        bad = [(s, name == "loss", name) for s, name in zip(steps, self.first_bad) if s >= 0]
        if bad:
            s, _, name = min(bad)  # the earliest step; a named term before the total "loss"
            raise NonFiniteLoss(f"non-finite loss at step {s + 1}: term '{name}' became NaN/inf; "
                                f"stopped, {where}")

    def means(self) -> dict[str, float]:
        """{term: mean since the last call} of the terms seen since then (one sync); resets."""
        names = [n for n in self.sums if self.counts[n]]
        values = torch.stack([self.sums[n] / self.counts[n] for n in names]).tolist() \
            if names else []
        for n in self.sums:
            self.sums[n].zero_()
            self.counts[n] = 0
        return dict(zip(names, values))


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA device by its name, or None (CPU, or a GPU not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def step_flops(model: nn.Module, batch: dict) -> int:
    """The FLOPs of one training micro-batch, forward and backward, counted by PyTorch's
    FlopCounterMode (matmuls, convolutions and attention; elementwise work not counted, as MFU
    conventions do). Measured once on the first batch: later batches with other text lengths
    differ a little. The gradients it leaves are zeroed."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def mfu_per_step(model: nn.Module, batches, device: torch.device, grad_accum_steps: int,
                 autocast) -> tuple[float | None, object]:
    """(The FLOPs of one optimizer step over the GPU's bf16 peak, the batches): None off an
    H100 / H200 / A100. The FLOPs are counted once, on the first batch of the stream, which is
    then put back at its head (hence the iterator returned)."""
    peak = peak_flops(device)
    if peak is None:
        return None, batches
    first = next(batches)
    with autocast:
        flops = step_flops(model, {k: v.to(device) if torch.is_tensor(v) else v
                                   for k, v in first.items()})
    return flops * grad_accum_steps / peak, itertools.chain([first], batches)


# The keys of Throughput.read, as the progress line labels them.
THROUGHPUT = {"steps_per_s": "steps/s", "examples_per_s": "ex/s", "tokens_per_s": "tok/s",
              "mfu": "MFU"}


class Throughput:
    """The optimizer steps and text tokens since the last progress line, and the time they
    took: the speed a progress line reports. `mfu_flops` is mfu_per_step's number (the seconds
    one step would take at the GPU's peak), None where the peak is not known."""

    def __init__(self, batch_size: int, mfu_flops: float | None = None):
        self.batch_size, self.mfu_flops = batch_size, mfu_flops
        self.start, self.steps, self.tokens = time.time(), 0, 0

    def add(self, tokens: int) -> None:
        """One optimizer step, which read `tokens` text tokens."""
        self.steps += 1
        self.tokens += tokens

    def read(self) -> dict:
        """{"steps_per_s", "examples_per_s", "tokens_per_s"} since the last read (or the start),
        and "mfu" (a fraction of the GPU's peak) where mfu_flops is known; then starts anew."""
        now = time.time()
        seconds = max(now - self.start, 1e-9)
        rate = self.steps / seconds
        numbers = {"steps_per_s": rate, "examples_per_s": rate * self.batch_size,
                   "tokens_per_s": self.tokens / seconds}
        self.start, self.steps, self.tokens = now, 0, 0
        return numbers | ({"mfu": self.mfu_flops * rate} if self.mfu_flops else {})


def progress_line(step: int, max_steps: int, numbers: dict, stop: int) -> str:
    """"step s/max | loss terms | lr | steps/s ex/s tok/s [MFU] | eta" from `numbers`: {term:
    mean, ..., "lr", Throughput.read's keys}, computed once, so that the printed line,
    progress.jsonl and TensorBoard carry the same numbers. The eta is to step `stop`."""
    terms = " ".join(f"{n} {v:.4f}" for n, v in numbers.items()
                     if n != "lr" and n not in THROUGHPUT)
    rate = numbers["steps_per_s"]
    mfu = f"MFU {numbers['mfu']:.1%} " if "mfu" in numbers else ""
    return (f"step {step}/{max_steps} | {terms} | lr {numbers['lr']:.2e} | {rate:.2f} steps/s "
            f"{numbers['examples_per_s']:.0f} ex/s {numbers['tokens_per_s']:.0f} tok/s {mfu}"
            f"| eta {format_duration((stop - step) / max(rate, 1e-9))}")


def metrics_text(metrics: dict) -> str:
    """'key value ...': counts (ints) as integers, everything else to 4 decimals."""
    return " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                    for k, v in metrics.items())


TENSORBOARD_MISSING = "error: --tensorboard needs the tensorboard package: pip install tensorboard"


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter, which needs the optional tensorboard package:
    without it, SystemExit with one line that says so. Imported here, at the call, so that a
    run without --tensorboard never imports the package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit(TENSORBOARD_MISSING) from None
    return SummaryWriter


class RunLog:
    """A run's numbers on disk, in its --out folder, besides the lines it prints:

        metrics.jsonl   one record per evaluation: {"step", "split": "val" or "test", metric...}
        progress.jsonl  one record per progress line: {"step", "split": "train", term...,
                        "lr", "steps_per_s", "examples_per_s", "tokens_per_s"[, "mfu"]}
        tensorboard/    with tensorboard=True, the same numbers as TensorBoard scalars at their
                        step: train/<term>, train/lr, throughput/<key>, val/<metric>,
                        test/<metric>

    The training records have a file of their own so that metrics.jsonl keeps one record per
    evaluation, as its readers expect. `write=False` (every rank but 0 under torchrun) writes
    nothing. A run that starts at step k (0, or a resumed checkpoint's step) opens its event
    file with purge_step k + 1: TensorBoard then hides the events of later steps already in the
    folder, a crashed run's steps past its checkpoint (which the resumed run writes again) or an
    earlier run's. A failed write (a full disk) never stops the run: a file that starts failing
    gets one warning, and TensorBoard, whose writer thread dies on an error, is given up with
    one. Each call flushes, so that TensorBoard shows a live run within its reload interval;
    `close` (or leaving the `with` block, an error path included) flushes and closes."""

    def __init__(self, out: Path, tensorboard: bool = False, start_step: int = 0, log=print,
                 write: bool = True):
        self.out, self.log, self.write = Path(out), log, write
        self.failing: set[str] = set()  # the files whose last write failed
        writer_class = summary_writer_class() if tensorboard else None  # every rank checks
        self.writer = None
        if writer_class is not None and write:
            try:
                self.writer = writer_class(str(self.out / "tensorboard"),
                                           purge_step=start_step + 1)
            except OSError as e:
                self._tensorboard_failed(e)

    def train(self, step: int, numbers: dict) -> None:
        """A progress line's numbers (progress_line's `numbers`) at `step`."""
        self._append("progress.jsonl", {"step": step, "split": "train", **numbers})
        self._scalars(step, {f"{'throughput' if name in THROUGHPUT else 'train'}/{name}": value
                             for name, value in numbers.items()})

    def eval(self, step: int, split: str, metrics: dict) -> None:
        """An evaluation's metrics on `split` ("val": periodic, "test": final) at `step`."""
        self._append("metrics.jsonl", {"step": step, "split": split, **metrics})
        self._scalars(step, {f"{split}/{name}": value for name, value in metrics.items()})

    def close(self) -> None:
        """Flush and close the event file; idempotent."""
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._tensorboard_failed(e)
            self.writer = None

    def _append(self, name: str, record: dict) -> None:
        if not self.write:
            return
        problem = append_jsonl(self.out / name, record)
        if problem and name not in self.failing:
            self.log(f"warning: {problem}; the run goes on (the numbers are printed)")
        (self.failing.add if problem else self.failing.discard)(name)

    def _scalars(self, step: int, scalars: dict) -> None:
        if self.writer is None:
            return
        try:
            for tag, value in scalars.items():
                if isinstance(value, (int, float)):  # not a string (a file name, a split)
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as e:
            self._tensorboard_failed(e)

    def _tensorboard_failed(self, e: OSError) -> None:
        """One warning, and no TensorBoard for the rest of the run: the writer's thread ended
        at the error, and every later call (closing too) raises it again."""
        self.log(f"warning: could not write {self.out / 'tensorboard'}: {e.strerror or e}; "
                 f"the run goes on without TensorBoard")
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StopSignals:
    """SIGTERM (a cluster preempting the job) and SIGINT (Ctrl-C) while training: the first one
    lets the step in progress finish, and the loop then writes latest.pt and stops; a second one
    stops at once (KeyboardInterrupt). Installed only in the main thread (Python's rule)."""

    def __init__(self):
        self.received = ""  # the name of the first signal, e.g. "SIGTERM"
        self.before = {}

    def handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.before[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.before.items():
            signal.signal(sig, handler)
