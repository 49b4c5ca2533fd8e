"""What a training loop watches without slowing it: loss terms, non-finite values, MFU.

    LossMeter         per-term running means and the first NaN/inf step, kept on the device so
                      that a step needs no host-device sync; read once per progress line
    NonFiniteLoss     raised by LossMeter.check, naming the step and the term
    peak_flops        the dense bf16 peak of an H100 / H200 / A100, else None
    step_flops        the FLOPs of one forward + backward, counted once by FlopCounterMode
    format_duration   seconds -> "4m05s" / "1h02m"
    mfu_per_step      a step's FLOPs over the GPU's peak, counted on the stream's first batch
    progress_line     the line train.py prints every log_every_s
    metrics_text      a metrics dict as "key value ..."
    StopSignals       SIGTERM / Ctrl-C: finish the step, checkpoint, stop
"""

import itertools
import signal
import threading

import torch
from torch import Tensor, nn

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


def progress_line(step: int, max_steps: int, means: dict, lr: float, batch_size: int, steps: int,
                  tokens: int, seconds: float, stop: int, mfu_flops: float | None) -> str:
    """"step s/max | loss terms | lr | steps/s ex/s tok/s [MFU] | eta" over the last `steps`
    steps, which took `seconds` and read `tokens` text tokens."""
    rate = steps / max(seconds, 1e-9)
    parts = " ".join(f"{n} {v:.4f}" for n, v in means.items())
    mfu = f"MFU {mfu_flops * rate:.1%} " if mfu_flops else ""
    return (f"step {step}/{max_steps} | {parts} | lr {lr:.2e} | {rate:.2f} steps/s "
            f"{rate * batch_size:.0f} ex/s {tokens / max(seconds, 1e-9):.0f} tok/s {mfu}"
            f"| eta {format_duration((stop - step) / max(rate, 1e-9))}")


def metrics_text(metrics: dict) -> str:
    """'key value ...': counts (ints) as integers, everything else to 4 decimals."""
    return " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                    for k, v in metrics.items())


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
