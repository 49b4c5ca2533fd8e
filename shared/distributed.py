"""Data parallelism across processes: what torchrun sets, the process group, two collectives.

    torchrun --nproc_per_node N train.py ...     N processes, one global batch split N ways

    launch = Launch.from_env()      rank, world size and local rank from torchrun's environment
    start_process_group(launch, device, timeout_s)   NCCL on CUDA, gloo on the CPU
    world_size(), rank()            1 and 0 when no process group is running (plain python)
    gather_with_grad(x)             (b, ...) on each rank -> (N·b, ...), rank order, gradients
                                    flowing back to the rank that owns each row
    all_mean(x)                     the mean of a tensor over ranks (no gradient)
    any_rank(flags, device)         each flag OR-ed over ranks: decisions all ranks share
    gather_objects(obj)             every rank's obj, in rank order (RNG states)
    pick_device(name, launch)       --device, the local rank's GPU under torchrun
    lost_peer(error)                whether a collective failed because another rank is gone
    with exit_if_a_peer_is_lost(launch): ...   such a failure as one line, not a stack trace
    autocast_for(dtype, device)     the forward's mixed precision: bf16 on CUDA by default

Only torch.distributed: DistributedDataParallel (train.py) all-reduces the gradients; the two
collectives here are for objectives that look across the whole batch (CoCa's contrastive
negatives, and the token count its captioning mean divides by).

Gradients through the gather. Each rank computes the loss of its own rows against every rank's
embeddings ("local loss", open_clip's name): L_r. DDP then averages parameter gradients over
ranks, so the run minimises L = (1/N) Σ_r L_r, the single-process loss of the whole batch. Row x
of rank r appears in every L_r', so dL/dx = (1/N) Σ_r' dL_r'/dx: the backward of the gather sums
the incoming gradients over ranks (an all-reduce) and keeps the rank's own rows; DDP's 1/N does
the rest. tests/test_distributed.py checks loss and gradients against one process in fp64.
"""

import contextlib
import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun job (rank 0 of 1 when started by plain python)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # the process's index on its node: its GPU

    @classmethod
    def from_env(cls) -> "Launch":
        """torchrun's RANK, WORLD_SIZE and LOCAL_RANK; absent: one process. Raises ValueError for
        values that are not consistent integers."""
        if "WORLD_SIZE" not in os.environ:
            return cls()
        try:
            launch = cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                         int(os.environ.get("LOCAL_RANK", 0)))
        except (KeyError, ValueError) as e:
            raise ValueError(f"torchrun's environment is incomplete or not integers ({e}): "
                             f"RANK, WORLD_SIZE, LOCAL_RANK") from None
        if not 0 <= launch.rank < launch.world_size:
            raise ValueError(f"RANK {launch.rank} is not in [0, WORLD_SIZE {launch.world_size})")
        return launch

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def start_process_group(launch: Launch, device: torch.device, timeout_s: float) -> None:
    """The process group of a multi-process job (MASTER_ADDR / MASTER_PORT from torchrun).
    timeout_s bounds every collective: a rank that died or hangs ends the job with an error on
    the others instead of a wait forever."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def stop_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in the forward; in the backward, the sum over ranks of the gradient of the
    gathered tensor, of which each rank keeps its own rows (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (N·b, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # Σ_r' dL_r'/d(gathered): every rank's loss sees every row
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]  # (b, ...)


def gather_with_grad(x: Tensor) -> Tensor:
    """(b, ...) on each of N ranks -> (N·b, ...), rows in rank order; x itself when N = 1. Every
    rank must pass the same b."""
    return _GatherWithGrad.apply(x) if world_size() > 1 else x


def all_mean(x: Tensor) -> Tensor:
    """The mean of x over ranks, as a new tensor without gradient; x itself when N = 1."""
    if world_size() == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / world_size()


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag OR-ed over ranks (one small all-reduce): a decision every rank takes at the same
    step, such as stopping at a signal that reached some ranks only. [flags] when N = 1."""
    if world_size() == 1:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] when N = 1."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def pick_device(name: str, launch: Launch) -> torch.device:
    """--device: "auto" is CUDA where available, else the CPU; under torchrun on CUDA, the GPU of
    the process's local rank. A CUDA device asked for where there is none: a ValueError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asked for, but CUDA is not available here")
    if name == "cuda" and launch.distributed:
        torch.cuda.set_device(launch.local_rank)
        return torch.device("cuda", launch.local_rank)
    return torch.device(name)


def lost_peer(e: RuntimeError) -> bool:
    """A collective that failed because another rank died or timed out (torch.distributed's
    own errors, or gloo / NCCL transport errors raised as RuntimeError)."""
    return (isinstance(e, torch.distributed.DistError)
            or any(word in str(e) for word in ("gloo", "NCCL", "Connection", "timed out")))


def autocast_for(dtype: str, device: torch.device):
    """--dtype: the mixed-precision context of the forward. torch.autocast in bf16 ("bf16", or
    "auto" on CUDA: parameters, optimizer and the losses' reductions stay fp32; each paper's
    notes say what its model keeps in fp32), or off ("fp32", or "auto" on the CPU); the same
    code on CUDA and on the CPU."""
    bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


@contextlib.contextmanager
def exit_if_a_peer_is_lost(launch: Launch):
    """Under torchrun, a collective that fails because another rank died or stopped answering
    (lost_peer) ends this rank with one line saying so; any other error goes on up."""
    try:
        yield
    except RuntimeError as e:
        if not (launch.distributed and lost_peer(e)):
            raise
        raise SystemExit(f"error: rank {launch.rank}: another process of the job died or stopped "
                         f"answering ({str(e).splitlines()[0][:160]}); the last checkpoint "
                         f"written is kept") from None
