"""Data parallelism on the CPU (gloo): what N processes compute equals what one process computes.

1. The contrastive loss across processes (shared.distributed.gather_with_grad): with 2 processes
   each holding half the batch, the mean of the ranks' losses and every gradient equal the
   single-process loss of the whole batch (fp64, 1e-10).
2. train.py under torchrun, 2 processes, for each model: the weights after a few steps equal
   one process's on the same batches. CoCa's objectives look across the whole batch (its
   contrastive negatives and its caption mean span every rank, shared.distributed), so 2
   processes equal one process with the same grad_accum_steps. The other three average their
   objectives per micro-batch as gradient accumulation does (the mean of each process's masked
   tokens or caption tokens; VirTex's BatchNorm statistics; UNITER's ITM negatives come from the
   process's own micro-batch), so 2 processes equal one process with twice the accumulation,
   which sees the same micro-batches. Dropout is 0: each rank has its own dropout stream.
3. Resume under torchrun: k steps + resume + k steps equal 2k steps, bit for bit.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train
from coca import contrastive_loss
from shared.distributed import Launch, gather_with_grad, rank

ROOT = Path(__file__).resolve().parents[1]


def _contrastive_rank(r: int, world: int, init_file: str, inputs: dict, out: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world)
    try:
        b = inputs["x"].shape[0] // world
        x = inputs["x"][r * b:(r + 1) * b].clone().requires_grad_(True)
        y = inputs["y"][r * b:(r + 1) * b].clone().requires_grad_(True)
        scale = inputs["scale"].clone().requires_grad_(True)
        loss = contrastive_loss(x, y, scale, gather_with_grad(x), gather_with_grad(y), rank() * b)
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        scale_grad = scale.grad.clone()
        dist.all_reduce(scale_grad)  # what DDP does to a parameter's gradient (then / N)
        out[r] = dict(loss=mean / world, x=x.grad / world, y=y.grad / world,
                      scale=scale_grad / world)
    finally:
        dist.destroy_process_group()


def test_the_contrastive_loss_across_two_processes_equals_the_whole_batch_in_one(tmp_path):
    torch.manual_seed(0)
    inputs = dict(x=torch.randn(8, 5, dtype=torch.float64),
                  y=torch.randn(8, 5, dtype=torch.float64),
                  scale=torch.tensor(1.3, dtype=torch.float64))
    x, y, scale = (inputs[k].clone().requires_grad_(True) for k in ("x", "y", "scale"))
    loss = contrastive_loss(x, y, scale)
    loss.backward()

    out = mp.Manager().dict()
    mp.spawn(_contrastive_rank, args=(2, str(tmp_path / "init"), inputs, out), nprocs=2)
    assert torch.allclose(out[0]["loss"], loss.detach(), atol=1e-10, rtol=0)
    assert torch.allclose(out[1]["loss"], loss.detach(), atol=1e-10, rtol=0)
    for r in range(2):
        assert torch.allclose(out[r]["x"], x.grad[4 * r:4 * r + 4], atol=1e-10, rtol=0)
        assert torch.allclose(out[r]["y"], y.grad[4 * r:4 * r + 4], atol=1e-10, rtol=0)
        assert torch.allclose(out[r]["scale"], scale.grad, atol=1e-10, rtol=0)
    # the negatives really come from the other rank: half a batch alone gives another loss
    assert not torch.isclose(contrastive_loss(x[:4], y[:4], scale), loss)


def test_the_launch_is_read_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert Launch.from_env() == Launch(0, 1, 0) and not Launch.from_env().distributed
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Launch.from_env() == Launch(1, 2, 1) and Launch.from_env().distributed
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK 2 is not in"):
        Launch.from_env()


MODELS = {
    "coca": ["--model", "coca", "--batch_size", "8", "--vision_width", "32", "--vision_heads",
             "2", "--vision_layers", "1", "--text_width", "32", "--text_heads", "2",
             "--unimodal_layers", "1", "--multimodal_layers", "1", "--n_caption_queries", "4",
             "--embed_dim", "16", "--max_text_len", "12", "--image_size", "32"],
    "virtex": ["--model", "virtex", "--batch_size", "8", "--image_size", "32", "--resnet_width",
               "4", "--hidden_size", "32", "--heads", "2", "--feedforward_size", "64",
               "--max_text_len", "16", "--dropout", "0"],
    "uniter": ["--model", "uniter", "--hidden_size", "32", "--layers", "1", "--heads", "2",
               "--intermediate_size", "64", "--batch_size", "8", "--ipot_iters", "5"],
    "oscar": ["--model", "oscar", "--hidden_size", "32", "--layers", "1", "--heads", "2",
              "--intermediate_size", "64", "--batch_size", "8"],
}
COMMON = ["--vocab_size", "200", "--tokenizer_texts", "50", "--num_workers", "0",
          "--log_every_s", "0", "--warmup_steps", "1", "--max_steps", "8", "--final_n", "8",
          "--eval_pairs", "8"]


def torchrun(*args, nproc: int = 2):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "train.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**env, "OMP_NUM_THREADS": "1"})


def in_process(*args):
    run, paper, overrides = train.parse_args(list(args))
    lines = []
    return train.train(run, paper, overrides, log=lines.append), lines


def weights(folder: Path) -> dict:
    return torch.load(folder / "latest.pt", weights_only=True)["model"]


def extra_args(model: str) -> list[str]:
    """Flags that exist for the model (coca has no --eval_pairs)."""
    return [a for i, a in enumerate(COMMON) if not (
        model in ("coca", "virtex") and (a == "--eval_pairs" or COMMON[i - 1] == "--eval_pairs"))]


def largest_difference(a: dict, b: dict) -> float:
    """Over the parameters. BatchNorm's running statistics legitimately differ: accumulation
    updates them once a micro-batch, DDP keeps rank 0's (it broadcasts buffers each forward)."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point() and ".running_" not in k)


@pytest.mark.parametrize("model", ["coca", "virtex", "uniter", "oscar"])
def test_two_processes_train_as_one(tmp_path, model):
    """After 3 AdamW steps at lr 1e-3 (each weight moves up to ~3e-3), the 2-process weights
    differ from the matching 1-process run by float rounding only (all-reduce vs accumulation
    order, amplified by Adam's normalisation of tiny gradients: ~1e-5), and from the
    non-matching one by far more (CoCa: negatives from half the batch; VirTex: BatchNorm
    statistics of the whole batch)."""
    args = [*MODELS[model], *extra_args(model), "--stop_at", "3"]
    result = torchrun(*args, "--out", str(tmp_path / "ddp"))
    assert result.returncode == 0, result.stderr[-3000:]
    accum, other = ("1", "2") if model == "coca" else ("2", "1")  # the module docstring
    in_process(*args, "--grad_accum_steps", accum, "--out", str(tmp_path / "one"))
    worst = largest_difference(weights(tmp_path / "ddp"), weights(tmp_path / "one"))
    assert worst < 1e-4, f"{model}: the largest weight difference is {worst:.2e}"
    if model in ("coca", "virtex"):
        in_process(*args, "--grad_accum_steps", other, "--out", str(tmp_path / "other"))
        wrong = largest_difference(weights(tmp_path / "ddp"), weights(tmp_path / "other"))
        assert wrong > 10 * max(worst, 1e-5), (worst, wrong)


def test_a_resumed_two_process_run_equals_the_uninterrupted_one(tmp_path):
    args = [*MODELS["coca"], *extra_args("coca"), "--dropout", "0.1"]
    straight = torchrun(*args, "--stop_at", "6", "--out", str(tmp_path / "a"))
    first = torchrun(*args, "--stop_at", "3", "--out", str(tmp_path / "b"))
    second = torchrun(*args, "--stop_at", "6", "--resume", "--out", str(tmp_path / "b"))
    for result in (straight, first, second):
        assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    assert saved["step"] == 6 and len(saved["rng_ranks"]) == 2
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
def test_a_rank_that_dies_ends_the_job_with_one_line_from_the_others(tmp_path):
    import signal

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", *MODELS["coca"], *extra_args("coca"), "--max_steps", "100000",
         "--out", str(tmp_path)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    ranks = children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)  # the job ends: no rank waits forever
    assert proc.returncode != 0
    assert "error: rank 0: another process of the job died or stopped answering" in err, err[-4000:]
    assert "[rank0]: Traceback" not in err, err[-4000:]


def test_sigterm_to_torchrun_stops_every_rank_at_one_step_with_a_checkpoint(tmp_path):
    """torchrun passes SIGTERM on to the ranks; they agree on the next step that is a multiple of
    10 and rank 0 writes latest.pt there with both ranks' random states."""
    import signal

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", *MODELS["coca"], *extra_args("coca"), "--max_steps", "100000",
         "--ckpt_every_s", "1e9", "--out", str(tmp_path)], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    saved = torch.load(tmp_path / "latest.pt", weights_only=True)
    assert saved["step"] % 10 == 0 and len(saved["rng_ranks"]) == 2
    assert f"SIGTERM: stopped at step {saved['step']} with" in out
    assert "continue with: torchrun" in out


def test_an_out_that_is_a_file_stops_every_rank_in_one_line(tmp_path):
    """Each rank tries --out before the process group starts: both stop, none waits for a peer."""
    (tmp_path / "file").write_text("x")
    result = torchrun(*MODELS["coca"], *extra_args("coca"), "--out", str(tmp_path / "file"))
    assert result.returncode != 0
    assert result.stderr.count(f"error: --out {tmp_path / 'file'}: is a file, not a folder") == 2
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]  # torchrun's own
    assert "[rank1]: Traceback" not in result.stderr  # report of failed ranks follows theirs
