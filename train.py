"""One training script for the four papers, read top to bottom.

    python train.py                                        # the main job: CoCa `tiny` on the world
    python train.py --model uniter --task vqa --init runs/uniter-tiny/best.pt   # fine-tune
    python train.py --model coca --preset small            # one GPU (bf16 autocast, fused attention)
    python train.py --model coca --lr 1e-3 --max_steps 500 # any Config field is a flag
    python train.py --out runs/coca-tiny --resume          # continue runs/coca-tiny/latest.pt exactly
    python train.py --help                                 # every flag, with its default

Order: setup (CLI, config, device) -> data (world or --data, tokenizer, loader) -> model
(--init, --init_bert) and optimizer -> the loop (one `train_step` a step) -> final evaluation,
using of a paper file only the contract of the README's table (below each paper's fence line).

Outputs in --out: metrics.jsonl, progress.jsonl, tensorboard/ (shared.monitor.RunLog), final.json,
latest.pt (latest.prev.pt: the one it replaced), best.pt, tokenizer.json, config.json. SIGTERM
or Ctrl-C: the step finishes, latest.pt is written, the run exits with its resume command.
"""

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from shared.benchmarks import check_spec, evaluate_corpus
from shared.bert import encoder_sizes, init_from_bert
from shared.checkpoint import (CheckpointError, load_weights, read_checkpoint, read_latest,
                               rng_states, save_checkpoint, seed_all, set_rng_states,
                               writable_folder, write_json_atomic)
from shared.config import RECIPE
from shared.cli import add_dataclass_flags, known_flags, number_problems, one_line, split_flags
from shared.data import caption_texts, close_loader, train_batches, worker_message
from shared.distributed import (Launch, any_rank, autocast_for, exit_if_a_peer_is_lost,
                                gather_objects, pick_device, start_process_group,
                                stop_process_group)
from shared.folders import corpus_counts, kept_statistics, training_corpus
from shared.vqa import MIN_ANSWER_COUNT
from shared.monitor import (LossMeter, NonFiniteLoss, RunLog, StopSignals, Throughput,
                            format_duration, metrics_text, mfu_per_step, progress_line,
                            summary_writer_class)
from shared.optim import learning_rate
from shared.tokenizer import Tokenizer
from shared.world import World, WorldConfig

MODELS = ("coca", "virtex", "uniter", "oscar")
CHOICES = {"model": MODELS, "preset": ("tiny", "small", "paper"), "dtype": ("auto", "bf16", "fp32")}


# --- 1. Setup: run options, the CLI generated from the dataclasses, device ---------------------

@dataclasses.dataclass
class RunConfig:
    """Options of a run (not of a model). The paper's recipe lives in its own Config."""
    model: str = "coca"  # which paper file: coca, virtex, uniter, oscar
    preset: str = "tiny"  # tiny (CPU, minutes), small (one GPU), paper (the paper's sizes)
    task: str = "pretrain"  # pretraining; the paper files list their downstream tasks in TASKS
    out: str = ""  # output folder; default runs/<model>-<preset>[-<task>]
    seed: int = 0  # seeds the world, the initialisation and dropout
    device: str = "auto"  # auto = cuda if available, else cpu (torchrun: one GPU per process)
    dtype: str = "auto"  # autocast: auto = bf16 on CUDA and fp32 on the CPU; bf16 or fp32 anywhere
    resume: bool = False  # continue from <out>/latest.pt exactly (none yet: start at step 0)
    init: str = ""  # start from the weights of this checkpoint (fine-tuning)
    vocab: str = ""  # a BERT vocab.txt; default: WordPiece trained on the world's captions
    init_bert: str = ""  # Oscar, UNITER: start the encoder from this BERT checkpoint folder
    data: str = ""  # a corpus on disk (default: the world): coco:JSON[,IMAGE_DIR], jsonl:FILE,
    #                 regions:JSON[,REGION_DIR], vqa:QUESTIONS,ANNOTATIONS[,REGION_DIR] (--task vqa)
    min_answer_count: int = MIN_ANSWER_COUNT  # --data vqa: the answers (classes) are the most
    #                                           common one of >= this many training questions
    val_data: str = ""  # what --eval_every and the final evaluation read, on disk: karpathy:
    #                     SPLIT_JSON[,ROOT] (its val split, then test), coco:, jsonl:, regions:, vqa:
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to max_steps
    eval_every: int = 0  # evaluate on the val split every this many steps; 0 = only at the end
    eval_n: int = 200  # val examples per periodic evaluation
    final_n: int = 1000  # test examples for the final evaluation
    log_every_s: float = 5.0  # seconds between progress lines
    tensorboard: bool = False  # write losses, lr, speed, metrics to TensorBoard (<out>/tensorboard)
    ckpt_every_s: float = 120.0  # seconds between latest.pt checkpoints
    num_workers: int = 1  # DataLoader worker processes making world examples
    compile: bool = False  # torch.compile the training forward (the first steps compile)
    eval_only: bool = False  # evaluate --init's model (all its heads) on the test split, no training
    tokenizer_texts: int = 2000  # world examples whose captions train the tokenizer
    dist_timeout_s: float = 1800.0  # torchrun: seconds a collective waits for a rank (rank 0's
    #                                 final evaluation too) before the job ends


def import_paper(name: str):
    """The paper file for `--model`; a plain if-chain, so find-definition works."""
    if name == "coca":
        import coca as paper
    elif name == "virtex":
        import virtex as paper
    elif name == "uniter":
        import uniter as paper
    elif name == "oscar":
        import oscar as paper
    else:
        raise SystemExit(f"error: unknown model {name!r}; choose from {', '.join(MODELS)}")
    return paper


def parse_args(argv: list[str] | None = None):
    """Two passes: --model / --preset pick the Config class and preset, then every field of both
    dataclasses becomes a flag. Returns (RunConfig, paper module, Config overrides dict)."""
    argv = sys.argv[1:] if argv is None else argv
    run = known_flags(argv, RunConfig, CHOICES)
    paper = import_paper(run.model)
    parser = build_parser(run, paper)
    run, overrides = split_flags(vars(parser.parse_args(argv)), RunConfig)
    for problem in number_problems(dataclasses.asdict(run), ("eval_n", "final_n",
                                                            "tokenizer_texts", "min_answer_count")):
        parser.error(problem)
    if run.task not in paper.TASKS:
        parser.error(f"argument --task: invalid choice {run.task!r} for {run.model} "
                     f"(choose from {', '.join(paper.TASKS)})")
    if run.eval_only and not run.init:
        parser.error("--eval_only evaluates a checkpoint: give it with --init")
    if run.init_bert and paper.BERT_INIT is None:
        parser.error(f"--init_bert starts a BERT encoder (Oscar, UNITER); {run.model} has none")
    if run.init_bert and run.init:
        parser.error("give --init (our checkpoint) or --init_bert (BERT), not both")
    if run.tensorboard:  # an optional package: a missing one stops the run now, not after setup
        summary_writer_class()
    if run.eval_only and not run.out:  # beside the checkpoint, never over its run's files
        run.out = str(Path(run.init).parent / "eval")
    if run.data.startswith("karpathy:") and not run.val_data:  # its val and test splits
        run.val_data = run.data
    if not run.out:  # a fine-tuning task gets its own folder: it must not overwrite its --init
        run.out = f"runs/{run.model}-{run.preset}" + ("" if run.task == "pretrain"
                                                      else f"-{run.task}")
    return run, paper, overrides


def build_parser(run: RunConfig, paper) -> argparse.ArgumentParser:
    """Every flag: RunConfig's, then the paper's Config's (preset defaults), comments as help."""
    parser = argparse.ArgumentParser(
        description="Train Oscar, UNITER, VirTex or CoCa on the synthetic world.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    add_dataclass_flags(parser, RunConfig, RunConfig(), "run options", choices=CHOICES)
    add_dataclass_flags(parser, paper.Config, preset_config(paper, run.preset, run.task),
                        f"{run.model}.Config fields ({run.preset} preset defaults)", run_names)
    return parser


def preset_config(paper, preset: str, task: str = "pretrain"):
    """paper.Config.paper(task) (the paper's recipe for that task), .small() or .tiny()."""
    if preset == "paper":
        return paper.Config.paper(task)
    return {"small": paper.Config.small, "tiny": paper.Config.tiny}[preset]()


def make_config(paper, preset: str, overrides: dict, base=None):
    """The preset (or `base`, e.g. a resumed run's config) with the command-line overrides; an
    invalid combination is reported in one line (Config.__post_init__ raises ValueError)."""
    base = preset_config(paper, preset, overrides.get("task", "pretrain")) if base is None else base
    try:
        return dataclasses.replace(base, **overrides)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: invalid config: {e}") from None


# --- 2. Data: the world (or a corpus on disk), the tokenizer, the loader ----------------------

def make_world_config(paper, config, seed: int) -> WorldConfig:
    """The world the paper config asks for: its image size, training mix and region sizes."""
    regions = (dict(n_regions=config.n_regions, feature_dim=config.feature_dim)
               if paper.INPUTS == "regions" else {})
    return WorldConfig(seed=seed, image_size=config.image_size,
                       single_object_prob=config.train_single_object_prob, **regions)


def make_tokenizer(run: RunConfig, config, world_config: WorldConfig, corpus=None) -> Tokenizer:
    """A BERT vocab.txt when --vocab is given, else WordPiece trained on the captions of the
    first tokenizer_texts images of the corpus (--data) or of the world."""
    if run.vocab:
        with one_line(f"--vocab {run.vocab}: "):
            return Tokenizer.from_vocab_file(run.vocab)
    return Tokenizer.train(caption_texts(corpus or World(world_config, "train"),
                                         run.tokenizer_texts), vocab_size=config.vocab_size)


# --- 3. Model and optimizer: fresh, from our checkpoint (--init) or from BERT (--init_bert) ---

def make_model(run: RunConfig, paper, config, device, init: dict | None, log):
    """The paper's model with --init's encoder (and same-named heads) or --init_bert's BERT."""
    model = paper.build_model(config)
    if init is not None:
        with one_line(f"--init {run.init}: "):
            fresh = load_weights(model, init["model"])
        if run.eval_only and fresh:
            raise SystemExit(f"error: --eval_only: {run.init} has no trained {', '.join(fresh)} "
                             f"head for --task {config.task}")
        log(f"init from {run.init}: the encoder loaded; heads starting fresh: "
            f"{', '.join(fresh) or 'none'}")
    if run.init_bert:
        with one_line("--init_bert: "):
            log(init_from_bert(model, run.init_bert, paper.BERT_INIT))
    return model.to(device)


# --- 4. The loop ------------------------------------------------------------------------------

def train_step(model, forward, ddp, optimizer, paper, config, batches, step: int,
               meter: LossMeter, device, autocast) -> int:
    """One optimizer update over grad_accum_steps micro-batches; returns the text tokens seen
    (counted on the CPU batch: no device sync). Under torchrun (`ddp`) gradients are all-reduced
    once, in the last micro-batch's backward; DDP averages over ranks as / grad_accum_steps
    averages over micro-batches."""
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    tokens = 0
    for i in range(config.grad_accum_steps):
        try:
            batch = next(batches)
        except ValueError as e:  # an example that does not fit (a region file of another size)
            raise SystemExit(f"error: a training batch: {worker_message(e)}") from None
        tokens += int((batch["tokens"] != 0).sum())
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        last = i == config.grad_accum_steps - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast:
                losses = forward(batch)
            (losses["loss"] / config.grad_accum_steps).backward()
        meter.add(losses, step)
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    paper.after_optimizer_step(model)
    return tokens


def evaluate(s: "State", split: str, n: int, log) -> dict:
    """The paper's metrics on n examples of a world split or of --val_data (all of it), logged."""
    if s.run.val_data:
        cap = s.config.eval_pairs if s.paper.CROSS_ENCODER else 0
        with one_line("--val_data: "):
            metrics = evaluate_corpus(s.model, s.paper, s.tokenizer, s.config, s.run.model,
                                      s.world_config, s.run.val_data, split, n,
                                      max_retrieval_images=cap)
        metrics.pop("images", None)
    else:
        metrics = s.paper.evaluate(s.model, s.tokenizer, s.config, s.world_config, split, n)
    s.runlog.eval(s.step, split, metrics)  # a full disk: a warning, the metrics still printed
    head = f"eval step {s.step}" if split == "val" else f"final ({split})"
    log(f"{head}: {metrics_text(metrics)}")
    return metrics


# --- 5. A run: set up (or resume), loop, finish -----------------------------------------------

@dataclasses.dataclass
class State:
    """Everything a run holds while it trains; `step` and `best` are what a checkpoint adds."""
    run: RunConfig
    paper: object
    out: Path
    device: torch.device
    config: object
    world_config: WorldConfig
    corpus: object  # a corpus on disk (shared.folders), or None: the world
    tokenizer: Tokenizer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    launch: Launch = Launch()
    batches: object = None
    runlog: RunLog = None  # metrics.jsonl, progress.jsonl, TensorBoard: opened by `train`
    step: int = 0
    best: float = -math.inf


def setup(run: RunConfig, paper, overrides: dict, log, launch: Launch = Launch()) -> State:
    """The run from the command line, or from <out>/latest.pt (--resume). Under torchrun every
    rank sets up the same run; rank 0 alone writes to --out."""
    with one_line(""):
        out, device = writable_folder(Path(run.out)), pick_device(run.device, launch)
    if launch.distributed:
        start_process_group(launch, device, run.dist_timeout_s)
    with one_line(""):  # a checkpoint of another model or task, or none readable
        ckpt = read_latest(out, run.model, run.task, log) if run.resume else None
        init = read_checkpoint(Path(run.init), run.model) if run.init and ckpt is None else None
    saved = ckpt or init  # --init: the checkpoint's model, the preset's recipe (RECIPE)
    kept = {k: v for k, v in (saved or {}).get("config", {}).items() if ckpt or k not in RECIPE}
    base = None if saved is None else make_config(paper, run.preset, {**kept, "task": run.task})
    config = make_config(paper, run.preset, {**overrides, "task": run.task}, base)
    if run.init_bert and ckpt is None:
        with one_line("--init_bert: "):  # the encoder sizes of the BERT checkpoint
            config = make_config(paper, run.preset, encoder_sizes(run.init_bert), config)
        run = dataclasses.replace(run, vocab=str(Path(run.init_bert) / "vocab.txt"))
    seed_all(run.seed)
    world_config = make_world_config(paper, config, run.seed)
    corpus = None
    if run.data:
        with one_line(f"--data ({run.model}): "):
            corpus, config = training_corpus(run.data, paper.INPUTS, config, ckpt is None,
                                             run.min_answer_count, out, log)
    if run.val_data:  # read its index now: a bad one stops the run here, not after training
        with one_line("--val_data: "):
            check_spec(run.val_data, paper, config, ("val",) * bool(run.eval_every) + ("test",))
    if ckpt is None and paper.INPUTS == "regions" and config.standardise_features:
        with one_line("--data: "):  # --init's feature statistics, or the corpus's
            config = kept_statistics(config, init and init["config"], corpus, log)
    tokenizer = (Tokenizer.from_str(saved["tokenizer"]) if saved is not None
                 else make_tokenizer(run, config, world_config, corpus))
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    if launch.rank == 0:
        tokenizer.save(out / "tokenizer.json")
        write_json_atomic(out / "config.json", {"run": dataclasses.asdict(run),
                                                "config": dataclasses.asdict(config)})
    model = make_model(run if ckpt is None else dataclasses.replace(run, init="", init_bert=""),
                       paper, config, device, init, log)
    s = State(run, paper, out, device, config, world_config, corpus, tokenizer, model,
              paper.make_optimizer(model, config), launch)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.step, s.best = ckpt["step"], ckpt["best"]
    with one_line(""):  # data that does not fit, a batch that does not split over processes
        s.batches = train_batches(paper, corpus or World(world_config, "train"), tokenizer,
                                  config, run.seed, s.step, run.num_workers,
                                  device.type == "cuda", launch.rank, launch.world_size, log)
    # after the loader took its seed: the same random stream continues. Across processes each
    # rank has its own stream (dropout masks differ between ranks), saved in rng_ranks.
    if ckpt is not None:
        ranks = ckpt.get("rng_ranks", [])
        set_rng_states(ranks[launch.rank] if len(ranks) == launch.world_size else ckpt["rng"])
    elif launch.distributed:
        seed_all(run.seed + launch.rank)
    return s


def checkpoint(s: State, name: str, log=None) -> bool:
    """<out>/<name> at the current step, by rank 0; latest.pt holds every rank's generators and
    moves the copy it replaces to latest.prev.pt (a resume's fallback). With `log`, a failed
    write (a full disk) is a warning: the previous file is intact, the next write tries again.
    Without (the last write), it ends the run in one line. Returns whether it was written."""
    latest = name == "latest.pt"
    ranks = gather_objects(rng_states()) if latest and s.launch.distributed else None
    if s.launch.rank != 0:
        return True
    try:
        save_checkpoint(s.out / name, s.out / "latest.prev.pt" if latest else None,
                        model=s.model.state_dict(), optimizer=s.optimizer.state_dict(),
                        step=s.step, best=s.best, rng=rng_states(),
                        config=dataclasses.asdict(s.config), run=dataclasses.asdict(s.run),
                        tokenizer=s.tokenizer.to_str(), **({"rng_ranks": ranks} if ranks else {}))
    except CheckpointError as e:
        if log is None:
            raise SystemExit(f"error: {e}") from None
        log(f"warning: {e}; training goes on and the next checkpoint tries again")
        return False
    return True


def train(run: RunConfig, paper, overrides: dict, log=print) -> dict:
    """Set up (or resume) a run and train it to max_steps (or run.stop_at): the final metrics,
    else {"stopped_at": step} (and "signal"). Under torchrun (RANK, WORLD_SIZE in the
    environment) every rank calls it; rank 0 logs, evaluates and writes."""
    with one_line(""):
        launch = Launch.from_env()
    log = log if launch.rank == 0 else (lambda line: None)
    s = None
    try:
        with exit_if_a_peer_is_lost(launch):
            s = setup(run, paper, overrides, log, launch)
            with RunLog(s.out, run.tensorboard, s.step, log, launch.rank == 0) as s.runlog:
                result = train_loop(s, log)
            if launch.distributed:  # every rank leaves together: none tears down the process
                torch.distributed.barrier()  # group while another still uses it (rank 0 writes)
        return result
    finally:
        if s is not None:  # the loader's workers first, also when the run ends in an error
            close_loader(s.batches)
        stop_process_group()


def train_loop(s: State, log) -> dict:
    """The loop of `train`: steps, progress lines, periodic evaluation and checkpoints."""
    run, config, model, paper = s.run, s.config, s.model, s.paper
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    processes = f" x {s.launch.world_size} processes" if s.launch.distributed else ""
    log(f"{run.model} {run.preset} ({config.task}): {millions:.2f}M parameters on {s.device}"
        f"{processes}, {config.max_steps} steps of {config.batch_size} examples -> {s.out}")
    autocast = autocast_for(run.dtype, s.device)
    # torchrun: DDP all-reduces the gradients; where some parameters sit out some steps (UNITER
    # draws one task an update) it must look for them. Checkpoints and evaluation use `model`.
    ddp = (DistributedDataParallel(model, device_ids=[s.device.index] if s.device.type == "cuda"
                                   else None, find_unused_parameters=paper.UNUSED_PARAMETERS)
           if s.launch.distributed else None)
    # --compile: the same module through torch.compile (checkpoints and evaluation use `model`);
    # dynamic=True: text lengths change from batch to batch, so sizes are symbolic from the start
    forward = ddp or model
    forward = torch.compile(forward, dynamic=True) if run.compile else forward
    stop = min(run.stop_at or config.max_steps, config.max_steps)
    meter, kept = LossMeter(s.device), f"the last good checkpoint ({s.out / 'latest.pt'}) is kept"
    if run.eval_only:
        return finish(s, 0.0, 0, log) if s.launch.rank == 0 else {"step": s.step}
    model.train()
    mfu, s.batches = mfu_per_step(model, s.batches, s.device, config.grad_accum_steps, autocast)
    t_ckpt = t_start = time.time()
    start_step, stopping, speed = s.step, False, Throughput(config.batch_size, mfu)
    with StopSignals() as signals:
        while s.step < stop and not stopping:
            # text tokens of the job: rank 0's count times N (an estimate under torchrun)
            speed.add(s.launch.world_size * train_step(
                model, forward, ddp, s.optimizer, paper, config, s.batches, s.step, meter,
                s.device, autocast))
            s.step += 1
            now = time.time()
            if now - speed.start >= run.log_every_s or s.step == stop:
                meter.check(kept)
                numbers = dict(meter.means(), lr=learning_rate(s.step - 1, config), **speed.read())
                log(progress_line(s.step, config.max_steps, numbers, stop))
                s.runlog.train(s.step, numbers)
            if (run.eval_every and s.step % run.eval_every == 0 and s.step < config.max_steps
                    and s.launch.rank == 0):  # the other ranks wait at the next all-reduce
                meter.check(kept)
                keep_if_best(s, evaluate(s, "val", run.eval_n, log), log)
            due, signalled = now - t_ckpt >= run.ckpt_every_s, bool(signals.received)
            if s.launch.distributed:  # rank 0's clock and any rank's signal, every few steps
                if s.step % 10 and s.step != stop:
                    continue
                due, signalled = any_rank([due and s.launch.rank == 0, signalled], s.device)
            stopping = signalled
            if due or stopping or s.step == stop:
                meter.check(kept)
                checkpoint(s, "latest.pt", None if stopping or s.step == stop else log)
                t_ckpt = now
    resume = (f"{'torchrun <the same options>' if s.launch.distributed else 'python'} train.py "
              f"--model {run.model} --preset {run.preset} --task {run.task} --out {s.out} --resume")
    if stopping:  # the step in progress finished and latest.pt holds it
        name = signals.received or "SIGTERM"  # (a signal that reached another rank)
        log(f"{name}: stopped at step {s.step} with {s.out / 'latest.pt'} written; "
            f"continue with: {resume}")
        return {"stopped_at": s.step, "signal": name}
    if s.step < config.max_steps:
        log(f"stopped at step {s.step}; continue with: {resume}")
        return {"stopped_at": s.step}
    if s.launch.rank != 0:
        return {"step": s.step}
    return finish(s, time.time() - t_start, s.step - start_step, log)


def keep_if_best(s: State, metrics: dict, log) -> None:
    """best.pt: the model of the task's highest MAIN_METRIC so far (or its `best` stays)."""
    key = s.paper.MAIN_METRIC[s.config.task]
    if key not in metrics:  # on data on disk: VQA accuracy, mean R@1, or CIDEr-D
        key = next(k for k in ("vqa_acc", "r1_mean", "cider") if k in metrics)
    if metrics[key] > s.best:
        before, s.best = s.best, metrics[key]
        if not checkpoint(s, "best.pt", log):
            s.best = before


def finish(s: State, seconds: float, steps: int, log) -> dict:
    """final.json and best.pt: the test-split metrics (on the world) or the corpus counts."""
    log(f"trained {steps} steps in {format_duration(seconds)}")
    final = {"step": s.step, "train_seconds": round(seconds, 1)}
    if s.corpus is not None:  # the training corpus's counts
        final.update(data=s.run.data, **corpus_counts(s.corpus, s.out / "unreadable.txt"))
    if s.run.val_data:  # the test split (karpathy:) or the held-out data, all of it
        final.update(split="test", val_data=s.run.val_data, **evaluate(s, "test", 0, log))
    elif s.corpus is not None:
        log("no evaluation: give --val_data (the world's metrics do not apply to --data); "
            "final.json has the corpus counts")
    else:
        final.update(split="test", **evaluate(s, "test", s.run.final_n, log))
        for generated, truth in s.paper.sample_captions(s.model, s.tokenizer, s.config,
                                                        s.world_config, "test", 5):
            log(f"  generated: {generated!r:60}  truth: {truth!r}")
    final |= {"init": s.run.init} if s.run.eval_only else {}
    write_json_atomic(s.out / "final.json", final)
    if s.best == -math.inf and not s.run.eval_only:  # no periodic evaluation: the final model
        checkpoint(s, "best.pt")
    return final


def main(argv: list[str] | None = None) -> None:
    run, paper, overrides = parse_args(argv)
    try:
        result = train(run, paper, overrides)
    except (NonFiniteLoss, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: stopped at once; the last checkpoint written is kept") \
            from None
    if "signal" in result:  # the exit status of a process ended by that signal
        raise SystemExit(128 + signal.Signals[result["signal"]])


if __name__ == "__main__":
    main()
