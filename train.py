"""One training script for the four papers, read top to bottom.

    python train.py                                        # the main job: CoCa `tiny` on the world
    python train.py --model coca --preset small            # one GPU (bf16 autocast, fused attention)
    python train.py --model coca --preset tiny --lr 1e-3   # any Config field is a flag
    python train.py --out runs/a --resume                  # continue runs/a/latest.pt exactly
    python train.py --help                                 # every flag, with its default

Order: setup (CLI, device, seeds) -> data (world, tokenizer, loader) -> model -> optimizer ->
schedule (`get_lr`) -> `evaluate` -> the loop (`train`). Every step is a function, so tests import
them; `main()` runs only under `if __name__ == "__main__"`.

The contract with a paper file (coca.py, virtex.py, uniter.py, oscar.py). Each defines:
    Config                 dataclass with presets paper() / small() / tiny(); besides the model it
                           holds the paper's recipe under these names: batch_size, lr, weight_decay,
                           beta1, beta2, warmup_steps, max_steps, lr_schedule ("cosine"|"linear"),
                           grad_clip (0 = off), grad_accum_steps, train_single_object_prob,
                           image_size, max_text_len, vocab_size
    build_model(config)    -> nn.Module; model(batch) -> dict(loss=scalar, <term>=scalar, ...)
    train_dataset(world, tokenizer, config) and collate_fn(items) -> batch dict
    evaluate(model, tokenizer, config, world_config, split, n) -> dict of downstream metrics
    MAIN_METRIC            the key of `evaluate` that picks best.pt (higher is better), or a
                           dict {task: key} for a paper with several tasks
A paper with downstream tasks lists them in TASKS (the first is pretraining) and has a Config
field `task`, which train.py sets from --task. Optionally sample_captions(...), param_groups(model, config), and a model method
after_optimizer_step() (CoCa clamps its temperature there).

Outputs in --out DIR: metrics.jsonl (one JSON line per evaluation), final.json, latest.pt and
best.pt (written atomically: temp file + rename), tokenizer.json, config.json.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from shared.bert import load_bert_encoder, read_config
from shared.data import train_loader
from shared.folders import CaptionFolder, RegionFolder, unreadable_files
from shared.tokenizer import Tokenizer
from shared.world import World, WorldConfig

MODELS = ("coca", "virtex", "uniter", "oscar")  # the four papers, in the order they land


# --- 1. Setup: run options, the CLI generated from the dataclasses, device ---------------------

@dataclasses.dataclass
class RunConfig:
    """Options of a run (not of a model). The paper's recipe lives in its own Config."""
    model: str = "coca"  # which paper file: coca, virtex, uniter, oscar
    preset: str = "tiny"  # tiny (CPU, minutes), small (one GPU), paper (the paper's sizes)
    task: str = "pretrain"  # pretraining; the paper files add their downstream tasks
    out: str = ""  # output folder; default runs/<model>-<preset>
    seed: int = 0  # seeds the world, the initialisation and dropout
    device: str = "auto"  # auto = cuda if available, else cpu
    resume: bool = False  # continue from <out>/latest.pt exactly where it stopped
    init: str = ""  # start from the weights of this checkpoint (fine-tuning)
    vocab: str = ""  # a BERT vocab.txt; default: WordPiece trained on the world's captions
    init_bert: str = ""  # Oscar, UNITER: start the encoder from this BERT checkpoint folder
    data: str = ""  # a corpus on disk: coco:JSON[,IMAGE_DIR] or jsonl:FILE (VirTex, CoCa),
    #                 regions:JSON[,REGION_DIR] (Oscar, UNITER); default: the world
    stop_at: int = 0  # stop (with a checkpoint) after this step; 0 = run to max_steps
    eval_every: int = 0  # evaluate on the val split every this many steps; 0 = only at the end
    eval_n: int = 200  # val examples per periodic evaluation
    final_n: int = 1000  # test examples for the final evaluation
    log_every_s: float = 5.0  # seconds between progress lines
    ckpt_every_s: float = 120.0  # seconds between latest.pt checkpoints
    num_workers: int = 1  # DataLoader worker processes making world examples
    compile: bool = False  # torch.compile the training forward (the first steps compile)
    tokenizer_texts: int = 2000  # world examples whose captions train the tokenizer


def import_paper(name: str):
    """The paper file for `--model`; a plain if-chain, so find-definition works."""
    try:
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
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise SystemExit(f"error: {name}.py is not in this checkout yet; "
                         f"models available: {', '.join(available_models())}") from None
    if not hasattr(paper, "build_model"):  # a paper file that has its objectives but no model yet
        raise SystemExit(f"error: {name}.py has no model yet (its losses are there, the model "
                         f"is to come); models available: {', '.join(available_models())}")
    return paper


def available_models() -> list[str]:
    """Paper files that define a model (a file with only its objectives so far is left out)."""
    here = Path(__file__).resolve().parent
    return [m for m in MODELS if (here / f"{m}.py").exists()
            and "\ndef build_model(" in (here / f"{m}.py").read_text()]


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if text.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, defaults, title: str,
                        skip: frozenset = frozenset()) -> None:
    """One flag per dataclass field: --name VALUE, typed from the default, shown in --help.

    Defaults are SUPPRESSed so that the parsed namespace holds only what the user typed. Fields
    named in `skip` get no flag (a paper Config's `task` is set from the run's --task).
    """
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name)
        kind = type(value)
        if kind not in (int, float, str, bool) or field.name in skip:
            continue  # nested or tuple fields are not flags
        choices = None
        if field.name == "model":
            choices = MODELS
        elif field.name == "preset":
            choices = ("tiny", "small", "paper")
        group.add_argument(f"--{field.name}", type=_parse_bool if kind is bool else kind,
                           default=argparse.SUPPRESS, choices=choices, metavar=None if choices
                           else kind.__name__.upper(), help=f"(default: {value})")


def parse_args(argv: list[str] | None = None):
    """Two passes: --model/--preset pick the Config class and preset, then every field of both
    dataclasses becomes a flag. Returns (RunConfig, paper module, paper Config overrides dict)."""
    argv = sys.argv[1:] if argv is None else argv
    first = argparse.ArgumentParser(add_help=False)
    add_dataclass_flags(first, RunConfig, RunConfig(), "run")
    known, _ = first.parse_known_args(argv)
    run = dataclasses.replace(RunConfig(), **vars(known))
    if run.model in MODELS and run.model not in available_models():
        import_paper(run.model)  # exits with "not in this checkout yet" or "no model yet"

    parser = argparse.ArgumentParser(
        description="Train Oscar, UNITER, VirTex or CoCa on the synthetic world.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_flags(parser, RunConfig, RunConfig(), "run options")
    paper = None
    if run.model in available_models():
        paper = import_paper(run.model)
        preset = getattr(paper.Config, run.preset)()
        add_dataclass_flags(parser, paper.Config, preset,
                            f"{run.model}.Config fields ({run.preset} preset defaults)",
                            skip=frozenset(f.name for f in dataclasses.fields(RunConfig)))
    args = vars(parser.parse_args(argv))
    if paper is None:
        import_paper(run.model)  # raises the clear "not in this checkout" message
    run_names = {f.name for f in dataclasses.fields(RunConfig)}
    run = dataclasses.replace(RunConfig(), **{k: v for k, v in args.items() if k in run_names})
    overrides = {k: v for k, v in args.items() if k not in run_names}
    if not run.out:  # a fine-tuning task gets its own folder: it must not overwrite its --init
        run.out = f"runs/{run.model}-{run.preset}" + ("" if run.task == "pretrain"
                                                      else f"-{run.task}")
    tasks = getattr(paper, "TASKS", ("pretrain",))
    if run.task not in tasks:
        parser.error(f"argument --task: invalid choice {run.task!r} for {run.model} "
                     f"(choose from {', '.join(tasks)})")
    return run, paper, overrides


def make_config(paper, preset: str, overrides: dict, base=None):
    """The preset (or `base`, e.g. a resumed run's config) with the command-line overrides.

    An invalid combination is reported in one line (Config.__post_init__ raises ValueError)."""
    base = getattr(paper.Config, preset)() if base is None else base
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: invalid config: {e}") from None


def bert_sizes(run: RunConfig, config):
    """The Config with the encoder sizes of the BERT checkpoint folder run.init_bert."""
    if run.model not in ("oscar", "uniter"):
        raise SystemExit(f"error: --init_bert is for Oscar and UNITER (BERT encoders), "
                         f"not {run.model}")
    if run.init:
        raise SystemExit("error: give --init (our checkpoint) or --init_bert (BERT), not both")
    try:
        bert = read_config(Path(run.init_bert))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --init_bert: {e}") from None
    if not (Path(run.init_bert) / "vocab.txt").exists():
        raise SystemExit(f"error: --init_bert: {run.init_bert} has no vocab.txt")
    try:
        return dataclasses.replace(config, hidden_size=bert["hidden_size"],
                                   layers=bert["num_hidden_layers"],
                                   heads=bert["num_attention_heads"],
                                   intermediate_size=bert["intermediate_size"])
    except ValueError as e:
        raise SystemExit(f"error: invalid config: {e}") from None


def open_corpus(run: RunConfig, config) -> CaptionFolder | RegionFolder:
    """--data: a corpus on disk (shared/folders.py). CoCa and VirTex read images and captions
    (coco:, jsonl:); Oscar and UNITER read captions and region files (regions:)."""
    if run.eval_every:
        raise SystemExit("error: --eval_every evaluates on the world; with --data there is no "
                         "evaluation yet, so leave it at 0")
    kind = run.data.partition(":")[0]
    try:
        if run.model in ("oscar", "uniter"):
            if kind != "regions":
                raise ValueError(f"{run.model} reads region features: give "
                                 f"regions:ANNOTATION_JSON[,REGION_DIR], not {run.data!r}")
            if run.task == "vqa":
                raise ValueError("a region folder has captions, not VQA questions")
            annotation, _, region_dir = run.data.partition(":")[2].partition(",")
            return RegionFolder.coco(annotation, region_dir or None)
        return CaptionFolder.from_spec(run.data, config.image_size)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --data: {e}") from None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but CUDA is not available here")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- 2. Data: the world, the tokenizer, the loader --------------------------------------------

def make_world_config(config, seed: int) -> WorldConfig:
    """The world the paper config asks for: its image size and training mix."""
    fields = {f.name for f in dataclasses.fields(WorldConfig)}
    extra = {k: getattr(config, k) for k in ("n_regions", "feature_dim") if hasattr(config, k)}
    return WorldConfig(seed=seed, image_size=config.image_size,
                       single_object_prob=config.train_single_object_prob,
                       **{k: v for k, v in extra.items() if k in fields})


def make_tokenizer(run: RunConfig, config, world_config: WorldConfig,
                   corpus: CaptionFolder | RegionFolder | None = None) -> Tokenizer:
    """A BERT vocab.txt when --vocab is given, else WordPiece trained on the captions of the
    first tokenizer_texts images of the corpus (--data) or of the world."""
    if run.vocab:
        if not Path(run.vocab).exists():
            raise SystemExit(f"error: --vocab {run.vocab}: no such file")
        return Tokenizer.from_vocab_file(run.vocab)
    if corpus is not None:
        texts = [c for _, captions in corpus.records[:run.tokenizer_texts] for c in captions]
        return Tokenizer.train(texts, vocab_size=config.vocab_size)
    world = World(world_config, "train")
    texts = [c for i in range(run.tokenizer_texts) for c in world.example(i, regions=False)["captions"]]
    return Tokenizer.train(texts, vocab_size=config.vocab_size)


# --- 3. Optimizer and schedule ---------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (Linear, Embedding, conv kernels), none on biases, LayerNorm
    gains and scalars such as CoCa's logit_scale."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(paper, model, config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over param_groups, or the paper's own make_optimizer (VirTex: SGD).

    fused: one kernel updates every tensor, on CUDA and (torch >= 2.4) on the CPU as well. On
    the 2-core CPU the AdamW update of a tiny model takes 0.30-0.33x the time of torch's default
    single-tensor loop (`python -m shared.bench --adamw`, reference/benchmarks.md); the result
    is the same up to float rounding (tested)."""
    fused = device.type in ("cuda", "cpu")
    if hasattr(paper, "make_optimizer"):  # a paper that names its own optimizer (VirTex: SGD)
        return paper.make_optimizer(model, config, fused=fused)
    groups = (paper.param_groups(model, config) if hasattr(paper, "param_groups")
              else param_groups(model, config.weight_decay))
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=fused)


def get_lr(step: int, config) -> float:
    """Linear warmup to config.lr over warmup_steps, then cosine (or linear) decay to 0 at
    max_steps. `step` counts optimizer updates from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    progress = min(progress, 1.0)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - progress)
    raise ValueError(f"unknown lr_schedule {config.lr_schedule!r}; use cosine or linear")


# --- 4. Checkpoints: atomic, with everything needed to continue exactly -----------------------

def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, **state) -> None:
    """torch.save to a temp file in the same folder, then an atomic rename: a run killed while
    saving leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.exists():
        raise SystemExit(f"error: no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which file, not a pickle trace
        raise SystemExit(f"error: could not read checkpoint {path}: {e}") from None


# --- 5. Evaluation ----------------------------------------------------------------------------

def evaluate(paper, model, tokenizer, config, world_config, split: str, n: int) -> dict:
    """The paper's downstream metrics on `n` examples of a world split (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = paper.evaluate(model, tokenizer, config, world_config, split, n)
    model.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


# --- 6. The loop ------------------------------------------------------------------------------

# Dense bf16 peak of the GPUs this project is measured on (NVIDIA's data sheets, SXM parts, no
# sparsity), for the model FLOPs utilisation in the progress line; another GPU shows no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a CUDA device by its name, or None (CPU, or a GPU not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def step_flops(model: torch.nn.Module, batch: dict) -> int:
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

class NonFiniteLoss(RuntimeError):
    """Raised when a loss term becomes NaN or inf; the message names the step and the term."""


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def train(run: RunConfig, paper, overrides: dict, log=print) -> dict:
    """Set up (or resume) a run and train it to max_steps (or run.stop_at). Returns the final
    metrics when the run reaches max_steps, else {"stopped_at": step}."""
    out = Path(run.out)
    device = pick_device(run.device)
    ckpt = load_checkpoint(out / "latest.pt") if run.resume else None
    out.mkdir(parents=True, exist_ok=True)

    # config: the preset (or the checkpoint's) with the command-line overrides
    base = None
    if ckpt is not None:
        base = dataclasses.replace(getattr(paper.Config, run.preset)(), **ckpt["config"])
    config = make_config(paper, run.preset, overrides, base)
    if hasattr(config, "task"):  # a paper with downstream tasks: --task picks the heads and data
        if ckpt is not None and ckpt["config"].get("task", run.task) != run.task:
            raise SystemExit(f"error: {out / 'latest.pt'} is a --task {ckpt['config']['task']} "
                             f"run; resume it with that --task, not {run.task}")
        config = dataclasses.replace(config, task=run.task)
    main_metric = (paper.MAIN_METRIC if isinstance(paper.MAIN_METRIC, str)
                   else paper.MAIN_METRIC[run.task])
    seed_everything(run.seed)

    # --init_bert: the encoder's sizes from the checkpoint's config.json (vocab: its vocab.txt)
    if run.init_bert and ckpt is None:
        config = bert_sizes(run, config)
        run = dataclasses.replace(run, vocab=str(Path(run.init_bert) / "vocab.txt"))

    # data: a fine-tuning run (--init) keeps the tokenizer its weights were trained with
    init = load_checkpoint(Path(run.init)) if run.init and ckpt is None else None
    world_config = make_world_config(config, run.seed)
    corpus = open_corpus(run, config) if run.data else None
    if corpus is not None:
        corpus.unreadable_log = out / "unreadable.txt"  # every worker appends what it skips
        log(f"--data {run.data}: {len(corpus)} images; dropped {corpus.dropped_images} images "
            f"(no caption or no file) and {corpus.dropped_captions} empty captions")
    if ckpt is not None:
        tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    elif init is not None and "tokenizer" in init:
        tokenizer = Tokenizer.from_str(init["tokenizer"])
    else:
        tokenizer = make_tokenizer(run, config, world_config, corpus)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    tokenizer.save(out / "tokenizer.json")
    write_json_atomic(out / "config.json", {"run": dataclasses.asdict(run),
                                            "config": dataclasses.asdict(config)})

    # model and optimizer
    model = paper.build_model(config).to(device)
    if init is not None:
        try:
            missing, unexpected = model.load_state_dict(init["model"], strict=False)
        except RuntimeError as e:  # a tensor of another shape: a different preset or vocab
            raise SystemExit(f"error: --init {run.init} does not fit this model (same --model "
                             f"and --preset?): {str(e).splitlines()[-1].strip()}") from None
        log(f"init from {run.init}: {len(missing)} missing, {len(unexpected)} unexpected keys "
            f"(missing = new heads, unexpected = heads of the checkpoint's task)")
    if run.init_bert and ckpt is None:
        try:
            n = load_bert_encoder(model, run.init_bert)
        except (ValueError, KeyError, ImportError) as e:
            raise SystemExit(f"error: --init_bert: {e}") from None
        log(f"init from BERT {run.init_bert}: {n} tensors (embeddings, encoder, pooler)")
    optimizer = make_optimizer(paper, model, config, device)
    step, best = 0, -math.inf
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best = ckpt["step"], ckpt["best"]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{run.model} {run.preset}: {n_params / 1e6:.2f}M parameters on {device}, "
        f"{config.max_steps} steps of {config.batch_size} examples -> {out}")

    # the loader draws a worker seed from torch's RNG when it starts, so it is made before the
    # RNG states are restored: a resumed run then continues the very same random stream
    if config.batch_size % config.grad_accum_steps:
        raise SystemExit(f"error: batch_size {config.batch_size} is not divisible by "
                         f"grad_accum_steps {config.grad_accum_steps}")
    micro = config.batch_size // config.grad_accum_steps
    source = corpus if corpus is not None else World(world_config, "train")
    dataset = paper.train_dataset(source, tokenizer, config)
    batches = iter(train_loader(dataset, micro, step * config.grad_accum_steps, paper.collate_fn,
                                num_workers=run.num_workers, pin_memory=device.type == "cuda"))
    if ckpt is not None:
        set_rng_states(ckpt["rng"])

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        step=step, best=best, rng=rng_states(), config=dataclasses.asdict(config),
                        run=dataclasses.asdict(run), tokenizer=tokenizer.to_str())

    def check_finite() -> None:
        """One host-device sync: stop if any loss term was NaN/inf since the last check."""
        if not first_bad:
            return
        bad_steps = torch.stack(list(first_bad.values())).tolist()
        bad = [(s, name) for s, name in zip(bad_steps, first_bad) if s >= 0]
        if bad:
            s, _, name = min((s, name == "loss", name) for s, name in bad)  # name a term first
            raise NonFiniteLoss(f"non-finite loss at step {s + 1}: term '{name}' became "
                                f"NaN/inf; stopped, the last good checkpoint "
                                f"({out / 'latest.pt'}) is kept")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    # --compile: the training forward runs through torch.compile (the same module, so the same
    # weights; checkpoints and evaluation use `model` itself and carry no "_orig_mod." prefix).
    # dynamic=True: text lengths change from batch to batch, and UNITER's four tasks each have
    # their own graph; marking the sizes dynamic from the start compiles each graph once.
    forward = torch.compile(model, dynamic=True) if run.compile else model
    stop = min(run.stop_at or config.max_steps, config.max_steps)
    # per loss term, on the device (no sync): its sum and count since the last log line, and
    # the first step where it was NaN/inf (-1 = never). A paper that trains one task per step
    # (UNITER) returns different terms on different steps, so each term keeps its own count.
    term_sums, term_counts, first_bad = {}, {}, {}
    window_steps, window_tokens = 0, 0  # since the last progress line; tokens: non-[PAD] text
    peak = peak_flops(device)  # MFU only where the peak is known (H100, H200, A100)
    flops_per_step = None
    t_log, t_ckpt, t_start, start_step = time.time(), time.time(), time.time(), step
    model.train()
    while step < stop:
        lr = get_lr(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        for _ in range(config.grad_accum_steps):
            batch = next(batches)  # on the CPU: counting its text tokens costs no device sync
            window_tokens += int((batch["tokens"] != 0).sum()) if "tokens" in batch else 0
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in batch.items()}
            if peak is not None and flops_per_step is None:
                with autocast:
                    flops_per_step = step_flops(model, batch) * config.grad_accum_steps
            with autocast:
                losses = forward(batch)
            (losses["loss"] / config.grad_accum_steps).backward()
            for name, value in losses.items():
                value = value.detach().float()  # (), stays on the device
                if name not in term_sums:
                    term_sums[name] = torch.zeros((), device=device)
                    term_counts[name] = 0
                    first_bad[name] = torch.full((), -1, dtype=torch.long, device=device)
                term_sums[name] += value
                term_counts[name] += 1
                newly_bad = ~torch.isfinite(value) & (first_bad[name] < 0)
                first_bad[name] = torch.where(newly_bad, step, first_bad[name])
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(model, "after_optimizer_step"):
            model.after_optimizer_step()
        step += 1
        window_steps += 1

        now = time.time()
        if now - t_log >= run.log_every_s or step == stop:
            check_finite()
            names = [n for n in term_sums if term_counts[n]]  # the terms seen in this window
            means = torch.stack([term_sums[n] / term_counts[n] for n in names]).tolist()
            rate = window_steps / (now - t_log)
            eta = (stop - step) / max(rate, 1e-9)
            parts = " ".join(f"{n} {v:.4f}" for n, v in zip(names, means))
            log(f"step {step}/{config.max_steps} | {parts} | lr {lr:.2e} | {rate:.2f} steps/s "
                f"{rate * config.batch_size:.0f} ex/s {window_tokens / (now - t_log):.0f} tok/s "
                + (f"MFU {flops_per_step * rate / peak:.1%} " if flops_per_step else "")
                + f"| eta {format_duration(eta)}")
            for n in term_sums:
                term_sums[n].zero_()
                term_counts[n] = 0
            window_steps, window_tokens, t_log = 0, 0, now
        if run.eval_every and step % run.eval_every == 0 and step < config.max_steps:
            check_finite()
            metrics = evaluate(paper, model, tokenizer, config, world_config, "val", run.eval_n)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "split": "val", **metrics}) + "\n")
            log(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if metrics[main_metric] > best:
                best = metrics[main_metric]
                checkpoint(out / "best.pt")
        if now - t_ckpt >= run.ckpt_every_s or step == stop:
            check_finite()
            checkpoint(out / "latest.pt")
            t_ckpt = now

    if step < config.max_steps:
        log(f"stopped at step {step} (--stop_at); continue with --resume --out {out}")
        return {"stopped_at": step}

    elapsed = time.time() - t_start
    if corpus is not None:  # no labels to evaluate against yet: report the run and the corpus
        final = {"step": step, "train_seconds": round(elapsed, 1), "data": run.data,
                 "images": len(corpus), "dropped_images": corpus.dropped_images,
                 "dropped_captions": corpus.dropped_captions,
                 "unreadable_files": unreadable_files(out / "unreadable.txt")}
        write_json_atomic(out / "final.json", final)
        checkpoint(out / "best.pt")
        log(f"trained {step - start_step} steps in {format_duration(elapsed)}; no evaluation "
            f"with --data (the world's metrics do not apply); final.json has the corpus counts")
        return final
    log(f"trained {step - start_step} steps in {format_duration(elapsed)}; final evaluation on "
        f"{run.final_n} test examples")
    metrics = evaluate(paper, model, tokenizer, config, world_config, "test", run.final_n)
    final = {"step": step, "split": "test", "train_seconds": round(elapsed, 1), **metrics}
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(final) + "\n")
    write_json_atomic(out / "final.json", final)
    if best == -math.inf:  # no periodic evaluation picked a best model: the final one is it
        checkpoint(out / "best.pt")
    log("final (test): " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    if hasattr(paper, "sample_captions"):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            samples = paper.sample_captions(model, tokenizer, config, world_config, "test", 5)
        model.train(was_training)
        for generated, truth in samples:
            log(f"  generated: {generated!r:60}  truth: {truth!r}")
    return final


def main(argv: list[str] | None = None) -> None:
    run, paper, overrides = parse_args(argv)
    try:
        train(run, paper, overrides)
    except NonFiniteLoss as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
