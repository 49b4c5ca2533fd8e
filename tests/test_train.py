"""train.py: the CLI, the schedule, atomic checkpoints, exact resume, and bad input.

The exact-resume test is the contract users rely on when a long run is killed: k steps, stop,
resume, k more steps must give the same losses and bit-identical weights as 2k steps straight.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from shared.checkpoint import CheckpointError, save_checkpoint
from shared.distributed import autocast_for
from shared.monitor import peak_flops, step_flops
from shared.optim import decay_groups, learning_rate

ROOT = Path(__file__).resolve().parents[1]

# A very small CoCa so the loop tests take seconds; every name is a coca.Config field.
SMALL = ["--model", "coca", "--preset", "tiny", "--batch_size", "4", "--vision_width", "32",
         "--vision_heads", "2", "--vision_layers", "1", "--text_width", "32", "--text_heads", "2",
         "--unimodal_layers", "1", "--multimodal_layers", "1", "--n_caption_queries", "4",
         "--embed_dim", "16", "--max_text_len", "12", "--warmup_steps", "2", "--vocab_size", "200",
         "--image_size", "32", "--tokenizer_texts", "50", "--num_workers", "0",
         "--log_every_s", "0", "--final_n", "20"]


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def train_in_process(tmp_path, *extra):
    run, paper, overrides = train.parse_args([*SMALL, "--out", str(tmp_path), *extra])
    lines = []
    result = train.train(run, paper, overrides, log=lines.append)
    return result, lines


def step_losses(lines):
    """{step: 'loss ... terms' text} from the progress lines (one per step with log_every_s 0)."""
    out = {}
    for line in lines:
        if line.startswith("step "):
            head, terms = line.split(" | ")[:2]
            out[int(head.split()[1].split("/")[0])] = terms
    return out


# --- schedule --------------------------------------------------------------------------------

def test_get_lr_warms_up_linearly_then_decays_to_zero():
    class C:
        lr, warmup_steps, max_steps, lr_schedule = 1.0, 4, 14, "cosine"
    assert [learning_rate(s, C) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(9, C) == pytest.approx(0.5)  # half-way through the cosine
    assert learning_rate(14, C) == pytest.approx(0.0, abs=1e-12)
    C.lr_schedule = "linear"
    assert learning_rate(9, C) == pytest.approx(0.5)
    assert learning_rate(11, C) == pytest.approx(0.3)


def test_param_groups_put_no_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = decay_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [(4, 3)]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["coca", "virtex", "oscar", "uniter"])
def test_optimizer_is_fused_on_the_cpu_and_steps_as_the_single_tensor_loop(name):
    """Every paper's make_optimizer asks for the fused kernel on the CPU too (VirTex's own
    optimizer as well); one fused step must move every parameter as torch's single-tensor loop
    does."""
    run, paper, _ = train.parse_args(["--model", name])
    config = train.make_config(paper, "tiny", {})
    torch.manual_seed(0)
    model = paper.build_model(config)
    twin = paper.build_model(config)
    twin.load_state_dict(model.state_dict())
    fused = paper.make_optimizer(model, config)
    assert all(g["fused"] for g in fused.param_groups), name
    start = [p.detach().clone() for p in model.parameters()]
    loop = paper.make_optimizer(twin, config)
    for group in loop.param_groups:  # the same groups, stepped by torch's single-tensor loop
        group["fused"], group["foreach"] = False, False
    for step in range(3):
        torch.manual_seed(step)
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step()
        loop.step()
    for (key, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)
    assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))  # it moved


# --- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, step=1)

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"could not write .*latest.pt: No space left on "
                                              r"device \(.* MiB free there\)"):
        save_checkpoint(path, step=2)
    assert torch.load(path)["step"] == 1  # the previous checkpoint survived
    assert not (tmp_path / "latest.pt.tmp").exists()  # and no half-written file is left


def test_resume_continues_exactly(tmp_path):
    """3 steps + resume + 3 steps == 6 steps straight: same losses, bit-identical weights."""
    straight, straight_lines = train_in_process(tmp_path / "a", "--max_steps", "6")
    stopped, first_lines = train_in_process(tmp_path / "b", "--max_steps", "6", "--stop_at", "3")
    assert stopped == {"stopped_at": 3}
    resumed, resumed_lines = train_in_process(tmp_path / "b", "--max_steps", "6", "--resume")

    losses_a = step_losses(straight_lines)
    losses_b = {**step_losses(first_lines), **step_losses(resumed_lines)}
    assert sorted(losses_a) == list(range(1, 7))
    assert losses_a == losses_b
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert straight == {**resumed, "train_seconds": straight["train_seconds"]}
    final = json.loads((tmp_path / "a" / "final.json").read_text())
    assert final["step"] == 6 and "zero_shot_acc" in final
    assert (tmp_path / "a" / "best.pt").exists() and (tmp_path / "a" / "tokenizer.json").exists()


def test_non_finite_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    train_in_process(tmp_path, "--max_steps", "6", "--stop_at", "2")
    import coca

    build = coca.build_model

    def build_poisoned(config):
        model = build(config)
        forward = model.forward

        def poisoned(batch):
            losses = forward(batch)
            losses["captioning"] = losses["captioning"] * float("nan")
            losses["loss"] = losses["loss"] + losses["captioning"]
            return losses

        model.forward = poisoned
        return model

    monkeypatch.setattr(coca, "build_model", build_poisoned)
    with pytest.raises(train.NonFiniteLoss, match="step 3: term 'captioning'"):
        train_in_process(tmp_path, "--max_steps", "6", "--resume", "true")
    assert torch.load(tmp_path / "latest.pt", weights_only=False)["step"] == 2


# --- the command line ------------------------------------------------------------------------

def test_help_lists_run_options_and_every_config_field():
    result = run_cli("--help")
    assert result.returncode == 0
    import coca
    for flag in ["--model", "--preset", "--task", "--max_steps", "--out", "--seed", "--device",
                 "--resume", "--init"] + [f"--{name}" for name, field
                                           in coca.Config.__dataclass_fields__.items()
                                           if not isinstance(field.default, tuple)]:
        assert flag in result.stdout, flag  # tuples (image_mean, ...) are no flags


@pytest.mark.parametrize("name", train.MODELS)
def test_help_describes_every_flag_of_every_model(name):
    parser = train.build_parser(train.RunConfig(model=name), train.import_paper(name))
    flags = [action for action in parser._actions if "--help" not in action.option_strings]
    assert len(flags) > 30
    for action in flags:
        assert action.help.split("(default:")[0].strip(), action.option_strings[0]
    assert "--min_answer_count" in parser.format_help()  # formats: a "%" in a comment is escaped


def test_a_flag_s_help_is_its_field_s_comment():
    import argparse
    import dataclasses

    from shared.cli import add_dataclass_flags, field_comments

    @dataclasses.dataclass
    class Options:
        # the comment above
        # spans two lines
        above: int = 1
        trailing: str = "#no"  # on its line
        longer: float = 0.5  # begins here
        #                      and goes on here
        bare: bool = False

    assert field_comments(Options) == {"above": "the comment above spans two lines",
                                       "trailing": "on its line",
                                       "longer": "begins here and goes on here"}
    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, Options, Options(), "options")
    helps = {action.dest: action.help for action in parser._actions}
    assert helps["longer"] == "begins here and goes on here (default: 0.5)"
    assert helps["bare"] == "(default: False)"


def test_counts_in_the_evaluation_line_print_as_integers(tmp_path, monkeypatch):
    from types import SimpleNamespace

    metrics = {"images": 6, "questions": 190, "vqa_acc": 0.8125, "pairs_scored": 2500}
    monkeypatch.setattr(train, "evaluate_corpus", lambda *args, **kwargs: dict(metrics))
    s = SimpleNamespace(run=SimpleNamespace(val_data="vqa:q.json", model="oscar", seed=0),
                        paper=SimpleNamespace(CROSS_ENCODER=True), model=None, tokenizer=None,
                        config=SimpleNamespace(eval_pairs=8), out=tmp_path, step=3,
                        world_config=None, runlog=train.RunLog(tmp_path))
    lines = []
    train.evaluate(s, "val", 0, lines.append)
    assert lines == ["eval step 3: questions 190 vqa_acc 0.8125 pairs_scored 2500"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["questions"] == 190
    assert train.metrics_text({"top1": 1.0, "images": 40}) == "top1 1.0000 images 40"


@pytest.mark.parametrize("args,message", [
    (["--model", "gpt"], "invalid choice: 'gpt'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--no_such_field", "3"], "unrecognized arguments: --no_such_field"),
    (["--text_width", "30", "--text_heads", "4"], "error: invalid config:"),
    (["--vocab", "/no/such/vocab.txt", "--max_steps", "1"], "/no/such/vocab.txt"),
    (["--model", "coca", "--task", "vqa"], "invalid choice 'vqa' for coca"),
    (["--lr", "nan"], "invalid config: lr must be a finite number, not nan"),
    (["--dropout", "1.5"], "invalid config: dropout must be in [0, 1), not 1.5"),
    (["--weight_decay", "-1"], "invalid config: weight_decay must be >= 0, not -1.0"),
    (["--image_size", "30"], "image_size 30 is not divisible by patch_size"),
    (["--eval_n", "0"], "argument --eval_n: must be >= 1, not 0"),
    (["--min_answer_count", "0"], "argument --min_answer_count: must be >= 1, not 0"),
    (["--eval_only"], "--eval_only evaluates a checkpoint: give it with --init"),
    (["--ckpt_every_s", "nan"], "argument --ckpt_every_s: must be a finite number >= 0, not nan"),
])
def test_bad_input_gives_one_clear_line_not_a_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


UNITER_SMALL = ["--model", "uniter", "--hidden_size", "32", "--layers", "1", "--heads", "2",
                "--intermediate_size", "64", "--batch_size", "8", "--max_steps", "3",
                "--warmup_steps", "1", "--final_n", "8", "--eval_pairs", "8", "--num_workers", "0",
                "--tokenizer_texts", "50", "--ipot_iters", "5", "--log_every_s", "0"]


def test_uniter_pretrains_then_fine_tunes_vqa_from_its_checkpoint(tmp_path):
    """--task vqa --init: its own output folder, the checkpoint's tokenizer, the new head
    reported missing, and the task's own metrics (MAIN_METRIC is a dict per task)."""
    lines = []
    run, paper, overrides = train.parse_args([*UNITER_SMALL, "--out", str(tmp_path / "pre")])
    final = train.train(run, paper, overrides, log=lines.append)
    assert {"i2t_r1", "t2i_r1", "r1_mean"} <= set(final)
    assert any(" mlm " in line or " itm " in line for line in lines)  # per-task loss terms
    init = tmp_path / "pre" / "best.pt"
    run, paper, overrides = train.parse_args([*UNITER_SMALL, "--task", "vqa", "--init", str(init)])
    assert run.out == "runs/uniter-tiny-vqa"  # never the pretraining run's folder
    run.out = str(tmp_path / "vqa")
    final = train.train(run, paper, overrides, log=lines.append)
    assert {"vqa_acc", "vqa_acc_regions_zeroed"} <= set(final) and "i2t_r1" not in final
    assert any(line.startswith(f"init from {init}") and line.endswith("fresh: vqa")
               for line in lines)
    pre = torch.load(init, weights_only=False)
    vqa = torch.load(tmp_path / "vqa" / "best.pt", weights_only=False)
    assert vqa["config"]["task"] == "vqa" and vqa["tokenizer"] == pre["tokenizer"]
    assert any(k.startswith("heads.vqa.") for k in vqa["model"])
    assert not any(k.startswith("heads.mlm.") for k in vqa["model"])
    encoder = {k for k in pre["model"] if not k.startswith("heads.")}
    assert encoder == {k for k in vqa["model"] if not k.startswith("heads.")}




OSCAR_SMALL = ["--model", "oscar", "--hidden_size", "32", "--layers", "1", "--heads", "2",
               "--intermediate_size", "64", "--batch_size", "8", "--max_steps", "3",
               "--warmup_steps", "1", "--final_n", "8", "--eval_pairs", "8", "--num_workers", "0",
               "--tokenizer_texts", "50", "--log_every_s", "0", "--max_gen_len", "6",
               "--beam_size", "2"]


def test_oscar_pretrains_then_fine_tunes_captioning_from_its_checkpoint(tmp_path):
    """Pre-training reports zero-shot retrieval and both loss terms; --task caption --init
    keeps the MLM head (nothing of it missing), drops the contrastive head, and reports the
    caption metrics and sample captions."""
    lines = []
    run, paper, overrides = train.parse_args([*OSCAR_SMALL, "--out", str(tmp_path / "pre")])
    final = train.train(run, paper, overrides, log=lines.append)
    assert {"i2t_r1", "t2i_r1", "r1_mean"} <= set(final)
    assert any(" mtl " in line and " contrastive " in line for line in lines)
    init = tmp_path / "pre" / "best.pt"
    run, paper, overrides = train.parse_args([*OSCAR_SMALL, "--task", "caption",
                                              "--init", str(init)])
    assert run.out == "runs/oscar-tiny-caption"
    run.out = str(tmp_path / "caption")
    lines.clear()
    final = train.train(run, paper, overrides, log=lines.append)
    assert {"caption_truth", "caption_truth_baseline", "cider", "bleu4", "rouge_l"} <= set(final)
    assert any(line.startswith(f"init from {init}") and line.endswith("fresh: none")
               for line in lines), lines
    assert any("generated:" in line for line in lines)
    model = torch.load(tmp_path / "caption" / "best.pt", weights_only=False)["model"]
    assert "heads.mlm.bias" in model and not any(k.startswith("heads.contrastive") for k in model)


def test_the_progress_line_reports_text_tokens_per_second(tmp_path):
    """tok/s over ex/s is the mean number of non-[PAD] tokens per example of the window's
    batches; with a line every step, the first line's window is the first batch."""
    import re

    from shared.data import train_loader
    from shared.world import World

    lines = []
    run, paper, overrides = train.parse_args([*SMALL, "--max_steps", "2", "--out",
                                              str(tmp_path)])
    train.train(run, paper, overrides, log=lines.append)
    first = next(line for line in lines if line.startswith("step 1/"))
    ex, tok = (float(x) for x in re.search(r"([\d.]+) ex/s ([\d.]+) tok/s", first).groups())
    config = train.make_config(paper, run.preset, overrides)
    tokenizer = train.Tokenizer.load(tmp_path / "tokenizer.json")
    dataset = paper.train_dataset(World(train.make_world_config(paper, config, run.seed), "train"),
                                  tokenizer, config)
    batch = next(iter(train_loader(dataset, config.batch_size, 0, paper.collate_fn)))
    per_example = float((batch["tokens"] != 0).sum()) / config.batch_size
    # both rates are printed rounded to units: allow for that (a slow machine prints small ones)
    assert (tok - 0.5) / (ex + 0.5) * 0.99 <= per_example <= (tok + 0.5) / (ex - 0.5) * 1.01


def test_step_flops_counts_forward_and_backward_matmuls():
    """A Linear layer on B x n inputs: 2·B·n·m FLOPs forward, twice that backward (the input's
    and the weight's gradients), so 6·B·n·m a step; the gradients are left zeroed."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 8)

        def forward(self, batch):
            return {"loss": self.linear(batch["x"]).pow(2).mean()}

    model = Tiny()
    x = torch.randn(4, 16, requires_grad=True)
    assert step_flops(model, {"x": x}) == 6 * 4 * 16 * 8
    assert model.linear.weight.grad is None
    assert peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("name", ["coca", "virtex", "oscar", "uniter"])
def test_compile_traces_each_model_once_per_task_whatever_the_text_length(name):
    """--compile on all four models: dynamo traces the training forward, the compiled loss is
    the eager one, and batches whose text lengths differ reuse the graph (UNITER: one graph per
    pre-training task). CompileCounter is dynamo's counting backend (no code generation, so
    this takes seconds); before the fix, CoCa read its [CLS] state at x[:, T], which fixed T
    and compiled again for every new text length."""
    from torch._dynamo.testing import CompileCounter

    from shared.data import train_loader
    from shared.world import World

    run, paper, overrides = train.parse_args(["--model", name, "--tokenizer_texts", "100"])
    config = train.make_config(paper, run.preset, {**overrides, "batch_size": 8})
    world_config = train.make_world_config(paper, config, run.seed)
    tokenizer = train.make_tokenizer(run, config, world_config)
    config = train.make_config(paper, run.preset, {"batch_size": 8,
                                                   "vocab_size": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = paper.build_model(config)
    dataset = paper.train_dataset(World(world_config, "train"), tokenizer, config)
    batches = iter(train_loader(dataset, 8, 0, paper.collate_fn))

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    lengths, tasks = set(), set()
    for i in range(12):
        batch = next(batches)
        lengths.add(batch["tokens"].shape[1])
        tasks.add(batch.get("task"))
        torch.manual_seed(i)
        loss = compiled(batch)["loss"]
        loss.backward()
        if i == 0:
            torch.manual_seed(i)
            assert loss.item() == pytest.approx(model(batch)["loss"].item(), rel=1e-5)
    assert len(lengths) >= 3  # the batches did change length
    if name != "uniter":
        assert counter.frame_count == 1
    else:  # one graph a task, and at most one more when a size happens to equal another
        # (dynamo's "duck sizing": here an MLM batch with exactly B masked words)
        assert counter.frame_count <= 2 * len(tasks)


# --- the contract: train.py asks the paper file nothing it does not define -------------------

# The contract's functions: the parameters every paper file that defines one takes, in order
# (README's table). Further parameters of a paper's own must have defaults.
SIGNATURES = {
    "build_model": ["config"], "make_optimizer": ["model", "config"],
    "after_optimizer_step": ["model"], "train_dataset": ["source", "tokenizer", "config", "seed"],
    "collate_fn": ["items"],
    "evaluate": ["model", "tokenizer", "config", "world_config", "split", "n"],
    "sample_captions": ["model", "tokenizer", "config", "world_config", "split", "n"],
    "caption": ["model", "tokenizer", "config", "examples", "world_config", "prompt"],
    "retrieval_scores": ["model", "tokenizer", "config", "examples", "world_config", "texts"],
    "answer_questions": ["model", "tokenizer", "config", "examples", "world_config"],
    "embed_image_arrays": ["model", "images"],
    "embed_text_strings": ["model", "tokenizer", "config", "texts"],
    "image_features": ["model", "images"]}


def signature_problems(paper) -> list[str]:
    """Where a paper module's contract functions differ from SIGNATURES."""
    import inspect

    problems = []
    for name, expected in SIGNATURES.items():
        if name not in vars(paper):
            continue
        params = list(inspect.signature(vars(paper)[name]).parameters.values())
        if [p.name for p in params[:len(expected)]] != expected:
            problems.append(f"{name}{tuple(p.name for p in params)}, want {tuple(expected)}")
        problems += [f"{name}: {p.name} has no default" for p in params[len(expected):]
                     if p.default is inspect.Parameter.empty]
    return problems


@pytest.mark.parametrize("name", [*train.MODELS, "toy"])
def test_every_contract_function_has_one_signature_across_the_papers(name):
    from tests import toy_paper

    assert signature_problems(toy_paper if name == "toy" else train.import_paper(name)) == []


def test_the_signature_check_fails_where_it_should():
    from types import SimpleNamespace

    def caption(model, tokenizer, config, examples, beam_size, world_config=None, prompt=""):
        return []

    def answer_questions(model, tokenizer, config, examples, world_config=None, chunk=64):
        return []
    problems = signature_problems(SimpleNamespace(caption=caption,
                                                  answer_questions=answer_questions))
    assert problems == ["caption('model', 'tokenizer', 'config', 'examples', 'beam_size', "
                        "'world_config', 'prompt'), want ('model', 'tokenizer', 'config', "
                        "'examples', 'world_config', 'prompt')"]


def test_train_py_uses_only_the_contract_and_never_probes_the_paper():
    """No hasattr/getattr anywhere in train.py, no comparison with a model's name outside
    import_paper, and every paper file defines every contract name."""
    import ast

    tree = ast.parse((ROOT / "train.py").read_text())
    calls = {n.func.id for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not {"hasattr", "getattr"} & calls
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name != "import_paper":
            names = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant)
                     and isinstance(c.value, str)}
            compared = {c.value for cmp in ast.walk(node) if isinstance(cmp, ast.Compare)
                        for c in ast.walk(cmp) if isinstance(c, ast.Constant)}
            assert not set(train.MODELS) & compared, (node.name, names)
        if isinstance(node, ast.FunctionDef):  # small functions: about 60 lines of code at most
            assert node.end_lineno - node.lineno <= 70, node.name
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "paper"}
    contract = {"Config", "TASKS", "MAIN_METRIC", "INPUTS", "BERT_INIT", "UNUSED_PARAMETERS",
                "PROTOCOLS", "CROSS_ENCODER", "build_model",
                "make_optimizer", "after_optimizer_step", "train_dataset", "collate_fn",
                "evaluate", "sample_captions"}
    assert used <= contract, used - contract
    for name in train.MODELS:
        paper = train.import_paper(name)
        missing = {c for c in contract if c not in vars(paper)}
        assert not missing, (name, missing)
        assert set(paper.MAIN_METRIC) == set(paper.TASKS) and paper.TASKS[0] == "pretrain"
        assert paper.INPUTS in ("pixels", "regions")
        assert paper.BERT_INIT is None or isinstance(paper.BERT_INIT, dict)
        assert isinstance(paper.UNUSED_PARAMETERS, bool)
        for preset in ("paper", "small", "tiny"):
            assert train.preset_config(paper, preset).task == "pretrain"


def test_the_stop_message_is_a_command_that_continues_the_run(tmp_path):
    """--stop_at prints `python train.py ... --resume`; running exactly those arguments
    finishes the run (the resumed config comes from the checkpoint, not the command line)."""
    import shlex

    _, lines = train_in_process(tmp_path, "--max_steps", "3", "--stop_at", "2")
    line = next(line for line in lines if "continue with:" in line)
    command = shlex.split(line.split("continue with:")[1])
    assert command[:2] == ["python", "train.py"] and command[-1] == "--resume"
    run, paper, overrides = train.parse_args([*command[2:], "--num_workers", "0",
                                              "--log_every_s", "0", "--final_n", "20"])
    assert run.resume is True
    final = train.train(run, paper, overrides, log=lambda line: None)
    assert final["step"] == 3


def test_a_checkpoint_of_the_earlier_layout_is_refused_in_one_line(tmp_path):
    (tmp_path / "old").mkdir()
    torch.save({"model": {"pooler.weight": torch.zeros(2)}, "step": 1, "config": {}},
               tmp_path / "old" / "latest.pt")
    result = run_cli("--out", str(tmp_path / "old"), "--resume")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "earlier layout" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("--init", str(tmp_path / "old" / "latest.pt"), "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and "earlier layout" in result.stderr


# --- faults: other models' checkpoints, bad copies, full disks, signals ----------------------

def test_a_checkpoint_of_another_model_is_refused_for_init_and_resume_in_one_line(tmp_path):
    train_in_process(tmp_path / "coca", "--max_steps", "2", "--stop_at", "1")
    for args in (["--init", str(tmp_path / "coca" / "latest.pt"), "--out", str(tmp_path / "v")],
                 ["--out", str(tmp_path / "coca"), "--resume"]):
        result = run_cli("--model", "virtex", *args)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "is a coca checkpoint (task pretrain); --model virtex needs one of its own" in \
            result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_falls_back_to_the_previous_checkpoint_when_latest_is_cut_short(tmp_path):
    """latest.pt at step 2 is truncated; latest.prev.pt (step 1) carries the run on, exactly."""
    straight, _ = train_in_process(tmp_path / "a", "--max_steps", "4")
    train_in_process(tmp_path / "b", "--max_steps", "4", "--stop_at", "2", "--ckpt_every_s", "0")
    latest = tmp_path / "b" / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:5000])
    resumed, lines = train_in_process(tmp_path / "b", "--max_steps", "4", "--resume")
    assert any(line.startswith("warning: could not read checkpoint") and
               "resuming from the checkpoint before it" in line and "(step 1)" in line
               for line in lines)
    assert sorted(step_losses(lines)) == [2, 3, 4]
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    b = torch.load(latest, weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_full_disk_warns_at_a_periodic_checkpoint_and_ends_in_one_line_at_the_last(
        tmp_path, monkeypatch):
    save, calls = torch.save, []

    def second_write_fails(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_write_fails)
    result, lines = train_in_process(tmp_path / "a", "--max_steps", "3", "--ckpt_every_s", "0")
    warnings = [line for line in lines if line.startswith("warning: could not write")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert "the next checkpoint tries again" in warnings[0]
    assert result["step"] == 3 and torch.load(tmp_path / "a" / "latest.pt")["step"] == 3
    assert not list((tmp_path / "a").glob("*.tmp"))

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="error: could not write .*latest.pt: No space left"):
        train_in_process(tmp_path / "b", "--max_steps", "2", "--stop_at", "1")


@pytest.mark.parametrize("sig, workers", [(signal.SIGTERM, "0"), (signal.SIGINT, "1")])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_resume_is_exact(
        tmp_path, sig, workers):
    """The signal goes to the whole process group, as Ctrl-C in a terminal or a scheduler's
    preemption does (DataLoader workers included); the run writes latest.pt at the step it
    reached, and resuming it gives the uninterrupted run's weights bit for bit."""
    steps = ["--max_steps", "200", "--num_workers", workers]
    proc = subprocess.Popen([sys.executable, "train.py", *SMALL, *steps, "--ckpt_every_s", "1e9",
                             "--out", str(tmp_path / "b")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 3/"):
            break
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert f"{sig.name}: stopped at step" in out and out.rstrip().endswith("--resume")
    stopped = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["step"]
    assert 3 <= stopped < 200

    train_in_process(tmp_path / "a", *steps)
    _, lines = train_in_process(tmp_path / "b", *steps, "--resume")
    assert min(step_losses(lines)) == stopped + 1
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- mixed precision on the CPU ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["coca", "virtex", "uniter", "oscar"])
def test_one_step_of_every_model_runs_under_bf16_autocast_on_the_cpu(name):
    """--dtype bf16 is torch.autocast on whatever device runs: on the CPU the linear layers
    compute in bf16 (checked on their outputs) while every loss term comes out fp32, within 1 %
    of the fp32 step (bf16 keeps 8 bits of mantissa), and the step's gradients are finite."""
    import dataclasses

    from shared.data import train_loader
    from shared.world import World

    run, paper, _ = train.parse_args(["--model", name, "--tokenizer_texts", "50",
                                      "--dtype", "bf16"])
    config = train.make_config(paper, "tiny", {"batch_size": 8})
    world_config = train.make_world_config(paper, config, 0)
    tokenizer = train.make_tokenizer(run, config, world_config)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = paper.build_model(config)
    dataset = paper.train_dataset(World(world_config, "train"), tokenizer, config)
    batch = next(iter(train_loader(dataset, 8, 0, paper.collate_fn)))
    linear_dtypes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, o: linear_dtypes.add(o.dtype))
    losses = {}
    for dtype in ("fp32", "bf16"):
        autocast = autocast_for(dtype, torch.device("cpu"))
        torch.manual_seed(1)
        with autocast:
            losses[dtype] = model(batch)
    assert linear_dtypes == {torch.float32, torch.bfloat16}  # fp32 step, then bf16 step
    for term, value in losses["bf16"].items():
        assert value.dtype == torch.float32 and torch.isfinite(value), term
        assert abs(value.item() - losses["fp32"][term].item()) <= 0.01 * max(
            1.0, abs(losses["fp32"][term].item())), term
    losses["bf16"]["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["coca", "virtex", "uniter", "oscar"])
def test_grad_checkpointing_gives_the_plain_gradients_and_batchnorm_statistics(name):
    """--grad_checkpointing recomputes each transformer layer (and ResNet stage) in the
    backward: same loss, same gradients (dropout replayed), BatchNorm's running statistics
    moved once, not twice."""
    import dataclasses

    from shared.data import train_loader
    from shared.world import World

    run, paper, _ = train.parse_args(["--model", name, "--tokenizer_texts", "50"])
    config = train.make_config(paper, "tiny", {"batch_size": 8})
    world_config = train.make_world_config(paper, config, 0)
    tokenizer = train.make_tokenizer(run, config, world_config)
    config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    dataset = paper.train_dataset(World(world_config, "train"), tokenizer, config)
    batch = next(iter(train_loader(dataset, 8, 0, paper.collate_fn)))
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = paper.build_model(dataclasses.replace(config, grad_checkpointing=checkpointed))
        model.train()
        torch.manual_seed(1)
        loss = model(batch)["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                         if p.grad is not None},
                        {n: b.clone() for n, b in model.named_buffers()}))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], atol=1e-5, rtol=1e-4), n
    for n in buffers_a:
        assert torch.equal(buffers_a[n], buffers_b[n]), n


def test_eval_only_evaluates_a_checkpoint_as_the_run_that_wrote_it(tmp_path):
    """--eval_only --init best.pt: the test-split metrics the training run reported for that
    model, written to <checkpoint folder>/eval/final.json; nothing trained, no checkpoint."""
    trained, _ = train_in_process(tmp_path, "--max_steps", "2")
    run, paper, overrides = train.parse_args([*SMALL, "--eval_only", "--init",
                                              str(tmp_path / "best.pt")])
    assert run.out == str(tmp_path / "eval")
    lines = []
    final = train.train(run, paper, overrides, log=lines.append)
    assert not any(line.startswith("step ") for line in lines)
    metrics = {k: v for k, v in trained.items() if k not in ("step", "train_seconds")}
    assert {k: final[k] for k in metrics} == metrics
    assert json.loads((tmp_path / "eval" / "final.json").read_text())["init"] == \
        str(tmp_path / "best.pt")
    assert not list((tmp_path / "eval").glob("*.pt"))


def test_resume_without_a_checkpoint_yet_starts_fresh_as_a_requeued_job_expects(tmp_path):
    """A scheduler that always passes --resume: the first start finds no checkpoint and trains
    from step 0, saying so; the requeued start continues from the checkpoint it left."""
    args = ["--max_steps", "4", "--resume"]
    first, first_lines = train_in_process(tmp_path / "run", *args, "--stop_at", "2")
    assert f"--resume: no checkpoint in {tmp_path / 'run'} yet: starting the run from step 0" \
        in first_lines and first == {"stopped_at": 2}
    second, second_lines = train_in_process(tmp_path / "run", *args)
    assert second["step"] == 4 and not any("no checkpoint" in line for line in second_lines)


@pytest.mark.parametrize("spec, message", [
    ("karpathy:/no/such/dataset.json", "--val_data: .*dataset.json"),
    ("coco:/no/such/captions.json", "--val_data: .*captions.json"),
    ("vqa:/no/such/q.json,/no/such/a.json", "--val_data: VQA data needs a model whose task "
                                             "answers questions"),
])
def test_a_bad_val_data_stops_the_run_at_its_start_not_after_training(tmp_path, spec, message):
    """--val_data is read (its files, its index, what the task can be judged on) before the
    first step, as --data is: a typo must not cost a training run."""
    lines = []
    run, paper, overrides = train.parse_args([*SMALL, "--max_steps", "1000", "--val_data", spec,
                                              "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=message):
        train.train(run, paper, overrides, log=lines.append)
    assert not any(line.startswith("step ") for line in lines)  # not one step trained
