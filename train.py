"""One training script for the four papers, read top to bottom.

    python train.py                                        # the main job: CoCa `tiny` on the world
    python train.py --model uniter --task vqa --init runs/uniter-tiny/best.pt   # fine-tune
    python train.py --model coca --preset small            # one GPU (bf16 autocast, fused attention)
    python train.py --model coca --lr 1e-3 --max_steps 500 # any Config field is a flag
    python train.py --out runs/coca-tiny --resume          # continue runs/coca-tiny/latest.pt exactly
    python train.py --help                                 # every flag, with its default

Order: setup (CLI, config, device) -> data (world or --data, tokenizer, loader) -> model
(--init, --init_bert) and optimizer -> the loop (one `train_step` a step) -> final evaluation.

What a paper file defines, and all train.py uses of it (coca.py, virtex.py, uniter.py, oscar.py):
    Config                 dataclass with presets paper() / small() / tiny(); besides the model it
                           holds the task and the recipe: task, batch_size, lr, weight_decay,
                           beta1, beta2, warmup_steps, max_steps, lr_schedule, grad_clip,
                           grad_accum_steps, train_single_object_prob, image_size, max_text_len,
                           vocab_size (and n_regions, feature_dim where INPUTS is "regions")
    TASKS, MAIN_METRIC     the tasks (the first is "pretrain") and, per task, the key of
                           `evaluate` that picks best.pt (higher is better)
    UNUSED_PARAMETERS      True where some parameters get no gradient in some steps (DDP)
    INPUTS, BERT_INIT      "pixels" or "regions"; None (no --init_bert) or the heads that start
                           from BERT's pre-training heads, {head: "cls.predictions", ...}
    build_model(config)    -> model; model(batch) -> dict(loss=scalar, <term>=scalar, ...);
                           task-specific parameters under model.heads (shared/checkpoint.py)
    make_optimizer(model, config), after_optimizer_step(model)
    train_dataset(source, tokenizer, config, seed) -> item p of the stream, its `epochs`
                           (shared.data.Epochs); collate_fn(items) -> batch with "tokens"
    evaluate(model, tokenizer, config, world_config, split, n) -> dict of metrics
    sample_captions(model, tokenizer, config, world_config, split, n) -> [(generated, truth)]

Outputs in --out DIR: metrics.jsonl (one JSON line per evaluation), final.json, latest.pt (and
latest.prev.pt, the one it replaced) and best.pt (plain data, written atomically: see
shared/checkpoint.py), tokenizer.json, config.json. SIGTERM or Ctrl-C: the step in progress
finishes, latest.pt is written at it, and the run exits with the command that resumes it.
"""

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from shared.benchmarks import evaluate_corpus
from shared.bert import encoder_sizes, load_bert_encoder, load_bert_heads
from shared.checkpoint import (CheckpointError, UnreadableCheckpoint, check_origin,
                               load_checkpoint, load_weights, rng_states, save_checkpoint,
                               set_rng_states, write_json_atomic)
from shared.cli import add_dataclass_flags
from shared.data import close_loader, train_loader, worker_message
from shared.distributed import (Launch, any_rank, gather_objects, start_process_group,
                                stop_process_group)
from shared.folders import CaptionFolder, RegionFolder, open_corpus, unreadable_files
from shared.vqa import MIN_ANSWER_COUNT, VQAFolder, count_unanswerable
from shared.monitor import LossMeter, NonFiniteLoss, format_duration, peak_flops, step_flops
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
    resume: bool = False  # continue from <out>/latest.pt exactly where it stopped
    init: str = ""  # start from the weights of this checkpoint (fine-tuning)
    vocab: str = ""  # a BERT vocab.txt; default: WordPiece trained on the world's captions
    init_bert: str = ""  # Oscar, UNITER: start the encoder from this BERT checkpoint folder
    data: str = ""  # a corpus on disk: coco:JSON[,IMAGE_DIR] or jsonl:FILE (pixels),
    #                 regions:JSON[,REGION_DIR] (regions), vqa:QUESTIONS,ANNOTATIONS[,REGION_DIR]
    #                 (VQA v2, --task vqa); default: the world
    min_answer_count: int = MIN_ANSWER_COUNT  # --data vqa: the answer vocabulary is every
    #                                           answer that is the most common one of at least
    #                                           this many training questions (9: 3,129 answers
    #                                           on VQA v2 train + val)
    val_data: str = ""  # what --eval_every and the final evaluation read, on disk: karpathy:
    #                     SPLIT_JSON[,ROOT] (its val split, then test; the default when --data
    #                     is karpathy:), coco:, jsonl:, regions: (a held-out corpus), vqa:
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to max_steps
    eval_every: int = 0  # evaluate on the val split every this many steps; 0 = only at the end
    eval_n: int = 200  # val examples per periodic evaluation
    final_n: int = 1000  # test examples for the final evaluation
    log_every_s: float = 5.0  # seconds between progress lines
    ckpt_every_s: float = 120.0  # seconds between latest.pt checkpoints
    num_workers: int = 1  # DataLoader worker processes making world examples
    compile: bool = False  # torch.compile the training forward (the first steps compile)
    eval_only: bool = False  # evaluate --init's model (all its heads) on the test split, no training
    tokenizer_texts: int = 2000  # world examples whose captions train the tokenizer
    dist_timeout_s: float = 1800.0  # torchrun: how long a collective waits for a rank (the final
    #                                 evaluation of rank 0 included) before the job ends


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
    first = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(first, RunConfig, RunConfig(), "run", choices=CHOICES)
    known, _ = first.parse_known_args(argv)
    run = dataclasses.replace(RunConfig(), **vars(known))
    paper = import_paper(run.model)
    parser = build_parser(run, paper)
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    args = vars(parser.parse_args(argv))
    run = dataclasses.replace(RunConfig(), **{k: v for k, v in args.items() if k in run_names})
    for problem in run_problems(run):
        parser.error(problem)
    if run.task not in paper.TASKS:
        parser.error(f"argument --task: invalid choice {run.task!r} for {run.model} "
                     f"(choose from {', '.join(paper.TASKS)})")
    if run.eval_only and not run.init:
        parser.error("--eval_only evaluates a checkpoint: give it with --init")
    if run.eval_only and not run.out:  # beside the checkpoint, never over its run's files
        run.out = str(Path(run.init).parent / "eval")
    if run.data.startswith("karpathy:") and not run.val_data:  # its val and test splits
        run.val_data = run.data
    if not run.out:  # a fine-tuning task gets its own folder: it must not overwrite its --init
        run.out = f"runs/{run.model}-{run.preset}" + ("" if run.task == "pretrain"
                                                      else f"-{run.task}")
    return run, paper, {k: v for k, v in args.items() if k not in run_names}


def build_parser(run: RunConfig, paper) -> argparse.ArgumentParser:
    """Every flag: RunConfig's, then the paper's Config fields with the preset's defaults, each
    with its field's comment as help."""
    parser = argparse.ArgumentParser(
        description="Train Oscar, UNITER, VirTex or CoCa on the synthetic world.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    add_dataclass_flags(parser, RunConfig, RunConfig(), "run options", choices=CHOICES)
    add_dataclass_flags(parser, paper.Config, preset_config(paper, run.preset),
                        f"{run.model}.Config fields ({run.preset} preset defaults)", run_names)
    return parser


def run_problems(run: RunConfig) -> list[str]:
    """What is wrong with the run options, one line each naming the flag."""
    values = dataclasses.asdict(run)
    problems = [f"argument --{name}: must be a finite number >= 0, not {value}"
                for name, value in values.items()
                if not isinstance(value, (bool, str)) and not 0 <= value < math.inf]
    problems += [f"argument --{name}: must be >= 1, not 0"
                 for name in ("eval_n", "final_n", "tokenizer_texts", "min_answer_count")
                 if values[name] == 0]
    if run.seed >= 2**32:  # NumPy's generator takes 32-bit seeds
        problems.append(f"argument --seed: must be < 2**32, not {run.seed}")
    return problems


def preset_config(paper, preset: str):
    """paper.Config.paper(), .small() or .tiny()."""
    return {"paper": paper.Config.paper, "small": paper.Config.small,
            "tiny": paper.Config.tiny}[preset]()


def make_config(paper, preset: str, overrides: dict, base=None):
    """The preset (or `base`, e.g. a resumed run's config) with the command-line overrides; an
    invalid combination is reported in one line (Config.__post_init__ raises ValueError)."""
    base = preset_config(paper, preset) if base is None else base
    try:
        return dataclasses.replace(base, **overrides)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: invalid config: {e}") from None


def bert_sizes(run: RunConfig, paper, config):
    """--init_bert: the Config with the encoder sizes of the BERT checkpoint folder."""
    if paper.BERT_INIT is None:
        raise SystemExit(f"error: --init_bert is for Oscar and UNITER (BERT encoders), "
                         f"not {run.model}")
    if run.init:
        raise SystemExit("error: give --init (our checkpoint) or --init_bert (BERT), not both")
    try:
        return make_config(paper, run.preset, encoder_sizes(run.init_bert), config)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --init_bert: {e}") from None


def pick_device(name: str, launch: Launch) -> torch.device:
    """--device; under torchrun on CUDA, the GPU of the process's local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but CUDA is not available here")
    if name == "cuda" and launch.distributed:
        torch.cuda.set_device(launch.local_rank)
        return torch.device("cuda", launch.local_rank)
    return torch.device(name)


def autocast_for(run: RunConfig, device: torch.device):
    """The mixed-precision context of the forward: torch.autocast in bf16 (parameters, optimizer
    and losses' reductions stay fp32; see the papers' notes for what each model keeps in fp32),
    the same code on CUDA and on the CPU."""
    bf16 = run.dtype == "bf16" or (run.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_checkpoint(path: Path, model: str | None = None, task: str | None = None) -> dict:
    """load_checkpoint, with any problem as one line; with `model` (and `task`), a checkpoint
    trained as another model (or task) is refused too."""
    try:
        state = load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    return state if model is None else checked_origin(state, path, model, task)


def checked_origin(state: dict, path: Path, model: str, task: str | None) -> dict:
    try:
        check_origin(state, path, model, task)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    return state


def read_latest(out: Path, model: str, task: str, log) -> dict:
    """--resume: <out>/latest.pt, or the copy it replaced (latest.prev.pt) when latest.pt is
    missing or unreadable (truncated by a crash, a full disk, a bad copy)."""
    latest, previous = out / "latest.pt", out / "latest.prev.pt"
    try:
        state = load_checkpoint(latest)
    except UnreadableCheckpoint as e:
        if not previous.exists():
            raise SystemExit(f"error: {e}") from None
        state = read_checkpoint(previous, model, task)
        log(f"warning: {e}; resuming from the checkpoint before it, {previous} "
            f"(step {state['step']})")
        return state
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    return checked_origin(state, latest, model, task)


# --- 2. Data: the world (or a corpus on disk), the tokenizer, the loader ----------------------

def make_world_config(paper, config, seed: int) -> WorldConfig:
    """The world the paper config asks for: its image size, training mix and region sizes."""
    regions = (dict(n_regions=config.n_regions, feature_dim=config.feature_dim)
               if paper.INPUTS == "regions" else {})
    return WorldConfig(seed=seed, image_size=config.image_size,
                       single_object_prob=config.train_single_object_prob, **regions)


def open_data(run: RunConfig, paper, config) -> CaptionFolder | RegionFolder:
    """--data: a corpus on disk (shared/folders.py) of the kind the paper reads (INPUTS)."""
    try:
        if run.data.startswith("vqa:"):  # VQA v2 questions, annotations and region files
            if paper.INPUTS != "regions" or run.task != "vqa":
                raise ValueError("VQA data trains --task vqa of a region model (uniter, oscar)")
            corpus = VQAFolder.from_spec(run.data)
            corpus.notes.append(f"{corpus.n_questions} questions; {len(corpus.missing)} "
                                f"questions dropped: their image has no region file")
            return corpus
        return open_corpus(run.data, paper.INPUTS, config.image_size)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --data ({run.model}): {e}") from None


def vqa_answers(corpus: VQAFolder, min_count: int, log) -> tuple[str, ...]:
    """The VQA head's classes: every answer that is the most common one of >= min_count
    training questions (--min_answer_count). The log also counts the questions none of whose
    human answers is a class: their soft-score target is all zero."""
    try:
        answers = corpus.answers(min_count)
    except ValueError as e:
        raise SystemExit(f"error: --data: {e}") from None
    if not answers:
        raise SystemExit(f"error: --data: no answer is the most common one of >= {min_count} "
                         f"questions (--min_answer_count)")
    records = [r for rs in corpus.questions for r in rs]
    missed = count_unanswerable(records, answers)
    log(f"answer vocabulary: {len(answers):,} answers (the most common answer of >= {min_count} "
        f"questions); {missed:,} of {len(records):,} training questions "
        f"({100 * missed / len(records):.1f} %) have no answer in it")
    return answers


def keep_feature_statistics(paper, config, init: dict | None, corpus, log=print):
    """Oscar / UNITER with standardise_features: the (mean, std) the run standardises its region
    features with, kept in its config and so in its checkpoints (shared.data.standardisation):
    --init's where it kept some (fine-tuning goes on with the numbers its encoder learned with),
    else those of the region files of --data, whose near-constant dimensions it logs (their std
    is floored, shared.folders.floored_std). A run on the world keeps none: the world's config
    gives them."""
    if paper.INPUTS != "regions" or not config.standardise_features:
        return config
    kept = init["config"].get("feature_mean", ()) if init is not None else ()
    if kept:
        return dataclasses.replace(config, feature_mean=tuple(kept),
                                   feature_std=tuple(init["config"]["feature_std"]))
    if corpus is None:
        return config
    try:
        mean, std = corpus.feature_statistics()  # (F,) each, of its first images
    except ValueError as e:
        raise SystemExit(f"error: --data: {e}") from None
    if len(mean) != config.feature_dim:
        raise SystemExit(f"error: --data: the region files have {len(mean)}-d features but "
                         f"feature_dim is {config.feature_dim} (--feature_dim)")
    floored, floor = corpus.near_constant
    log(f"feature standardisation: {floored} of {len(std)} dimensions near-constant (std < "
        f"{floor:.3g}) on the first {min(500, len(corpus))} images; their std is floored at "
        f"{floor:.3g}")
    return dataclasses.replace(config, feature_mean=tuple(mean.tolist()),
                               feature_std=tuple(std.tolist()))


def make_tokenizer(run: RunConfig, config, world_config: WorldConfig, corpus=None) -> Tokenizer:
    """A BERT vocab.txt when --vocab is given, else WordPiece trained on the captions of the
    first tokenizer_texts images of the corpus (--data) or of the world."""
    if run.vocab:
        if not Path(run.vocab).exists():
            raise SystemExit(f"error: --vocab {run.vocab}: no such file")
        return Tokenizer.from_vocab_file(run.vocab)
    if corpus is not None:
        texts = [c for _, captions in corpus.records[:run.tokenizer_texts] for c in captions]
    else:
        world = World(world_config, "train")
        texts = [c for i in range(run.tokenizer_texts)
                 for c in world.example(i, regions=False)["captions"]]
    return Tokenizer.train(texts, vocab_size=config.vocab_size)


def make_batches(run: RunConfig, paper, config, source, tokenizer, step: int, device,
                 launch: Launch, log=print):
    """The endless iterator of micro-batches, started at `step` (a resumed run continues the
    same stream), whose epochs (the dataset's shared.data.Epochs) are logged. The loader draws
    a worker seed from torch's RNG when it starts."""
    if config.batch_size % config.grad_accum_steps:
        raise SystemExit(f"error: batch_size {config.batch_size} is not divisible by "
                         f"grad_accum_steps {config.grad_accum_steps}")
    try:
        dataset = paper.train_dataset(source, tokenizer, config, seed=run.seed)
    except ValueError as e:
        raise SystemExit(f"error: --data: {e}") from None
    epochs = config.max_steps * config.batch_size / len(dataset)
    log(f"training data: {dataset.epochs.describe()}; {config.max_steps:,} steps of "
        f"{config.batch_size} items make {epochs:.2f} epochs")
    micro = config.batch_size // config.grad_accum_steps
    if micro % launch.world_size:
        raise SystemExit(f"error: the micro-batch of {micro} examples (batch_size / "
                         f"grad_accum_steps) cannot be split over {launch.world_size} processes")
    return iter(train_loader(dataset, micro, step * config.grad_accum_steps, paper.collate_fn,
                             num_workers=run.num_workers, pin_memory=device.type == "cuda",
                             rank=launch.rank, world_size=launch.world_size))


# --- 3. Model and optimizer: fresh, from our checkpoint (--init) or from BERT (--init_bert) ---

def make_model(run: RunConfig, paper, config, device, init: dict | None, log):
    """The paper's model with --init's encoder (and same-named heads) or --init_bert's BERT."""
    model = paper.build_model(config)
    if init is not None:
        try:
            fresh = load_weights(model, init["model"])
        except CheckpointError as e:
            raise SystemExit(f"error: --init {run.init}: {e}") from None
        if run.eval_only and fresh:
            raise SystemExit(f"error: --eval_only: {run.init} has no trained {', '.join(fresh)} "
                             f"head for --task {config.task}")
        log(f"init from {run.init}: the encoder loaded; heads starting fresh: "
            f"{', '.join(fresh) or 'none'}")
    if run.init_bert:
        try:
            n = load_bert_encoder(model.encoder, run.init_bert)
            heads = load_bert_heads(model.heads, run.init_bert, paper.BERT_INIT)
        except (ValueError, KeyError, ImportError) as e:
            raise SystemExit(f"error: --init_bert: {e}") from None
        log(f"init from BERT {run.init_bert}: {n} tensors (embeddings, encoder, pooler); "
            f"heads from its pre-training heads: {', '.join(heads) or 'none'}")
    return model.to(device)


# --- 4. The loop ------------------------------------------------------------------------------

def train_step(model, forward, ddp, optimizer, paper, config, batches, step: int,
               meter: LossMeter, device, autocast) -> int:
    """One optimizer update over grad_accum_steps micro-batches; returns the text tokens seen
    (counted on the CPU batch: no device sync). Across processes (`ddp`, the
    DistributedDataParallel wrapper), gradients are all-reduced once, in the backward of the
    last micro-batch (no_sync before it); DDP averages them over ranks as the division by
    grad_accum_steps averages over micro-batches."""
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


def progress_line(step: int, config, means: dict, steps: int, tokens: int, seconds: float,
                  stop: int, mfu_flops: float | None) -> str:
    rate = steps / max(seconds, 1e-9)
    parts = " ".join(f"{n} {v:.4f}" for n, v in means.items())
    mfu = f"MFU {mfu_flops * rate:.1%} " if mfu_flops else ""
    return (f"step {step}/{config.max_steps} | {parts} | lr {learning_rate(step - 1, config):.2e}"
            f" | {rate:.2f} steps/s {rate * config.batch_size:.0f} ex/s "
            f"{tokens / max(seconds, 1e-9):.0f} tok/s {mfu}"
            f"| eta {format_duration((stop - step) / max(rate, 1e-9))}")


def metrics_text(metrics: dict) -> str:
    """'key value ...': counts (ints) as integers, everything else to 4 decimals."""
    return " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                    for k, v in metrics.items())


def evaluate(s: "State", split: str, n: int, log) -> dict:
    """The paper's metrics on n examples of a world split, or of --val_data on disk (the
    protocols of shared.benchmarks.evaluate_corpus; n = 0 there: all of it, but a
    cross-encoder's retrieval among the first eval_pairs images only), appended to
    metrics.jsonl."""
    if s.run.val_data:
        try:
            cap = s.config.eval_pairs if s.paper.CROSS_ENCODER else 0
            metrics = evaluate_corpus(s.model, s.paper, s.tokenizer, s.config, s.run.model,
                                      s.world_config, s.run.val_data, split, n,
                                      max_retrieval_images=cap)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --val_data: {e}") from None
        metrics.pop("images", None)
    else:
        metrics = s.paper.evaluate(s.model, s.tokenizer, s.config, s.world_config, split, n)
    try:
        with open(s.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": s.step, "split": split, **metrics}) + "\n")
    except OSError as e:  # a full disk: the metrics are still printed below
        log(f"warning: could not append to {s.out / 'metrics.jsonl'}: {e.strerror or e}")
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
    corpus: CaptionFolder | RegionFolder | None
    tokenizer: Tokenizer
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    launch: Launch = Launch()
    batches: object = None
    step: int = 0
    best: float = -math.inf


def setup(run: RunConfig, paper, overrides: dict, log, launch: Launch = Launch()) -> State:
    """The run from the command line, or from <out>/latest.pt (--resume). Under torchrun every
    rank sets up the same run; rank 0 alone writes to --out."""
    out, device = Path(run.out), pick_device(run.device, launch)
    if launch.distributed:
        start_process_group(launch, device, run.dist_timeout_s)
    ckpt = read_latest(out, run.model, run.task, log) if run.resume else None
    base = None if ckpt is None else make_config(paper, run.preset, ckpt["config"])
    config = make_config(paper, run.preset, {**overrides, "task": run.task}, base)
    if run.init_bert and ckpt is None:
        config = bert_sizes(run, paper, config)
        run = dataclasses.replace(run, vocab=str(Path(run.init_bert) / "vocab.txt"))
    init = read_checkpoint(Path(run.init), run.model) if run.init and ckpt is None else None
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(run.seed)
    world_config = make_world_config(paper, config, run.seed)
    corpus = open_data(run, paper, config) if run.data else None
    if corpus is not None:
        corpus.unreadable_log = out / "unreadable.txt"  # every worker appends what it skips
        log(f"--data {run.data}: {len(corpus)} images; dropped {corpus.dropped_images} images "
            f"(no caption or no file) and {corpus.dropped_captions} empty captions")
        for line in corpus.notes:  # e.g. a Karpathy file's split counts
            log(line)
    if init is not None and "answers" in init["config"] and run.task == "vqa":  # its head's
        config = dataclasses.replace(config, answers=tuple(init["config"]["answers"]))  # classes
    if isinstance(corpus, VQAFolder) and ckpt is None:  # the VQA head's classes
        config = dataclasses.replace(config, answers=vqa_answers(corpus, run.min_answer_count,
                                                                 log))
    if ckpt is None:
        config = keep_feature_statistics(paper, config, init, corpus, log)
    if isinstance(corpus, RegionFolder) and corpus.most_regions() > config.n_regions:
        log(f"the region files hold up to {corpus.most_regions()} regions (first "
            f"{min(500, len(corpus))} files); the model keeps n_regions = {config.n_regions}: "
            f"raise --n_regions to use them all")
    saved = ckpt or init  # a fine-tuning run keeps the tokenizer its weights were trained with
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
    s.batches = make_batches(run, paper, config, corpus or World(world_config, "train"),
                             tokenizer, s.step, device, launch, log)
    # after the loader took its seed: the same random stream continues. Across processes each
    # rank has its own stream (dropout masks differ between ranks), saved in rng_ranks.
    if ckpt is not None:
        ranks = ckpt.get("rng_ranks", [])
        set_rng_states(ranks[launch.rank] if len(ranks) == launch.world_size else ckpt["rng"])
    elif launch.distributed:
        seed_everything(run.seed + launch.rank)
    return s


def checkpoint(s: State, name: str, rng_ranks: list | None = None) -> None:
    """<out>/<name> at the current step, written by rank 0; latest.pt first moves the copy it
    replaces to latest.prev.pt, so a resume has a good checkpoint to fall back on. rng_ranks:
    every rank's generators (torchrun), for an exact resume."""
    if s.launch.rank != 0:
        return
    previous = s.out / "latest.prev.pt" if name == "latest.pt" else None
    extra = {} if rng_ranks is None else {"rng_ranks": rng_ranks}
    save_checkpoint(s.out / name, previous, model=s.model.state_dict(),
                    optimizer=s.optimizer.state_dict(), step=s.step, best=s.best,
                    rng=rng_states(), config=dataclasses.asdict(s.config),
                    run=dataclasses.asdict(s.run), tokenizer=s.tokenizer.to_str(), **extra)


def save_latest(s: State, log, last: bool) -> None:
    """latest.pt. When a periodic write fails (a full disk), the run goes on and the next one
    tries again: the previous checkpoint is intact, and stopping would lose the steps since it
    for certain. When the write at the end of the run (or at a signal) fails, the run stops
    with that line: there is no next write."""
    rng_ranks = gather_objects(rng_states()) if s.launch.distributed else None  # every rank
    try:
        checkpoint(s, "latest.pt", rng_ranks)
    except CheckpointError as e:
        if last:
            raise SystemExit(f"error: {e}") from None
        log(f"warning: {e}; training goes on and the next checkpoint tries again")


def resume_command(s: State) -> str:
    launcher = "torchrun <the same options> train.py" if s.launch.distributed else "python train.py"
    return (f"{launcher} --model {s.run.model} --preset {s.run.preset} --task {s.run.task} "
            f"--out {s.out} --resume")


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


def mfu_per_step(s: State, autocast) -> float | None:
    """The FLOPs of one step over the GPU's bf16 peak (None off an H100 / H200 / A100), counted
    once on the first batch, which is then put back at the head of the stream."""
    peak = peak_flops(s.device)
    if peak is None:
        return None
    first = next(s.batches)
    s.batches = itertools.chain([first], s.batches)
    with autocast:
        flops = step_flops(s.model, {k: v.to(s.device) if torch.is_tensor(v) else v
                                     for k, v in first.items()})
    return flops * s.config.grad_accum_steps / peak


def train(run: RunConfig, paper, overrides: dict, log=print) -> dict:
    """Set up (or resume) a run and train it to max_steps (or run.stop_at). Returns the final
    metrics when the run reaches max_steps, else {"stopped_at": step} (and "signal"). Under
    torchrun (RANK, WORLD_SIZE in the environment) every rank calls it; rank 0 logs, evaluates
    and writes."""
    try:
        launch = Launch.from_env()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    log = log if launch.rank == 0 else (lambda line: None)
    s = None
    try:
        s = setup(run, paper, overrides, log, launch)
        result = train_loop(s, log)
        if launch.distributed:  # every rank leaves together: none tears down the process
            torch.distributed.barrier()  # group while another still uses it (rank 0 writing)
        return result
    except RuntimeError as e:
        if not (launch.distributed and lost_peer(e)):
            raise
        raise SystemExit(f"error: rank {launch.rank}: another process of the job died or stopped "
                         f"answering ({str(e).splitlines()[0][:160]}); the last checkpoint "
                         f"written is kept") from None
    finally:
        if s is not None:  # the loader's workers first, also when the run ends in an error
            close_loader(s.batches)
        stop_process_group()


def lost_peer(e: RuntimeError) -> bool:
    """A collective that failed because another rank died or timed out (torch.distributed's
    own errors, or gloo / NCCL transport errors raised as RuntimeError)."""
    return (isinstance(e, torch.distributed.DistError)
            or any(word in str(e) for word in ("gloo", "NCCL", "Connection", "timed out")))


AGREE_EVERY = 10  # torchrun: steps between the ranks' shared decisions (checkpoint, stop)


def train_loop(s: State, log) -> dict:
    """The loop of `train`: steps, progress lines, periodic evaluation and checkpoints."""
    run, config, model, paper = s.run, s.config, s.model, s.paper
    log(f"{run.model} {run.preset} ({config.task}): "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {s.device}"
        f"{f' x {s.launch.world_size} processes' if s.launch.distributed else ''}, "
        f"{config.max_steps} steps of {config.batch_size} examples -> {s.out}")
    autocast = autocast_for(run, s.device)
    # torchrun: DDP all-reduces the gradients; where some parameters sit out some steps
    # (UNITER draws one task an update) it must look for them. Checkpoints and evaluation use
    # `model`.
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
    mfu = mfu_per_step(s, autocast)
    t_log = t_ckpt = t_start = time.time()
    start_step, window_steps, window_tokens = s.step, 0, 0
    stopping = False
    with StopSignals() as signals:
        while s.step < stop and not stopping:
            # text tokens of the job: rank 0's count times N (an estimate under torchrun)
            window_tokens += s.launch.world_size * train_step(
                model, forward, ddp, s.optimizer, paper, config, s.batches, s.step, meter,
                s.device, autocast)
            s.step += 1
            window_steps += 1
            now = time.time()
            if now - t_log >= run.log_every_s or s.step == stop:
                meter.check(kept)
                log(progress_line(s.step, config, meter.means(), window_steps, window_tokens,
                                  now - t_log, stop, mfu))
                window_steps, window_tokens, t_log = 0, 0, now
            if (run.eval_every and s.step % run.eval_every == 0 and s.step < config.max_steps
                    and s.launch.rank == 0):  # the other ranks wait at the next all-reduce
                meter.check(kept)
                keep_if_best(s, evaluate(s, "val", run.eval_n, log), log)
            due, signalled = now - t_ckpt >= run.ckpt_every_s, bool(signals.received)
            if s.launch.distributed:  # rank 0's clock and any rank's signal, every few steps
                if s.step % AGREE_EVERY and s.step != stop:
                    continue
                due, signalled = any_rank([due and s.launch.rank == 0, signalled], s.device)
            stopping = signalled
            if due or stopping or s.step == stop:
                meter.check(kept)
                save_latest(s, log, last=stopping or s.step == stop)
                t_ckpt = now
    if stopping:  # the step in progress finished and latest.pt holds it
        name = signals.received or "SIGTERM"  # (a signal that reached another rank)
        log(f"{name}: stopped at step {s.step} with {s.out / 'latest.pt'} written; "
            f"continue with: {resume_command(s)}")
        return {"stopped_at": s.step, "signal": name}
    if s.step < config.max_steps:
        log(f"stopped at step {s.step}; continue with: {resume_command(s)}")
        return {"stopped_at": s.step}
    if s.launch.rank != 0:
        return {"step": s.step}
    return finish(s, time.time() - t_start, s.step - start_step, log)


def keep_if_best(s: State, metrics: dict, log) -> None:
    """best.pt: the model with the highest MAIN_METRIC of the task so far (a failed write is
    reported and leaves `best` as it was, so the next evaluation tries again)."""
    key = s.paper.MAIN_METRIC[s.config.task]
    if key not in metrics:  # on data on disk: VQA accuracy, mean R@1, or CIDEr-D
        key = next(k for k in ("vqa_acc", "r1_mean", "cider") if k in metrics)
    value, before = metrics[key], s.best
    if value > s.best:
        s.best = value
        try:
            checkpoint(s, "best.pt")
        except CheckpointError as e:
            s.best = before
            log(f"warning: {e}")


def finish(s: State, seconds: float, steps: int, log) -> dict:
    """final.json and best.pt: the test-split metrics (on the world) or the corpus counts."""
    log(f"trained {steps} steps in {format_duration(seconds)}")
    final = {"step": s.step, "train_seconds": round(seconds, 1)}
    if s.corpus is not None:  # the training corpus's counts
        final.update(data=s.run.data, images=len(s.corpus),
                     dropped_images=s.corpus.dropped_images,
                     dropped_captions=s.corpus.dropped_captions,
                     unreadable_files=unreadable_files(s.out / "unreadable.txt"),
                     corpus_notes=s.corpus.notes)
    if s.run.val_data:  # the test split (karpathy:) or the held-out data, all of it
        final.update(split="test", val_data=s.run.val_data, **evaluate(s, "test", 0, log))
    elif s.corpus is not None:
        log("no evaluation: give --val_data (the world's metrics do not apply to --data); "
            "final.json has the corpus counts")
    else:
        final["split"] = "test"
        final.update(evaluate(s, "test", s.run.final_n, log))
        samples = s.paper.sample_captions(s.model, s.tokenizer, s.config, s.world_config,
                                          "test", 5)
        for generated, truth in samples:
            log(f"  generated: {generated!r:60}  truth: {truth!r}")
    if s.run.eval_only:
        final["init"] = s.run.init
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
