"""Released weights of another codebase -> a checkpoint of this project (train.py's format).

    python convert.py open_clip open_clip_pytorch_model.bin --config open_clip_config.json \\
        --bpe bpe_simple_vocab_16e6.txt.gz --out coca-b32.pt
    python convert.py virtex bicaptioning_R_50_L1_H2048.pth --spm coco_10k.model --out v.pt
    python convert.py uniter uniter-base.pt --vocab bert-base-cased/vocab.txt --cased --out u.pt
    python convert.py oscar oscar-base-vqa/ --out o.pt   # a folder: weights, config.json, vocab.txt
    python infer.py caption coca-b32.pt photo.jpg              # then it is a checkpoint like any
    python train.py --model coca --init coca-b32.pt --data jsonl:captions.jsonl   # fine-tune it

SOURCE is a name a paper file declares in its CONVERTERS (coca.py: open_clip; virtex.py,
uniter.py, oscar.py: their official releases); the paper is found by that declaration, never by
its name. Its converter maps every source tensor onto the paper's model (or says, in one line,
which tensor is left over), and reads the sizes from the tensors and the config.

    WEIGHTS   the source's weights: a torch file (read weights-only: no code runs) or a
              .safetensors file; a {"state_dict": ...} or {"model": ...} wrapper and DDP's
              "module." prefixes are taken off. A folder (a BERT-format release: Oscar's) is
              read as its pytorch_model.bin or model.safetensors, with its config.json and
              vocab.txt as --config and --vocab when those are not given
    --config  the source's config JSON (optional where the tensors tell the sizes):
              open_clip_config.json of a released model ({"model_cfg": ..., "preprocess_cfg":
              ...}) or a bare model config; a BERT-format config.json
    --bpe     the tokenizer: CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz, inside the
              open_clip package); --vocab, a BERT vocab.txt (--cased: a cased one, as
              bert-base-cased's); --spm, a SentencePiece model (VirTex's coco_10k.model)
    --answers a VQA head's classes, a JSON list (class i = item i), where the release keeps
              them beside the weights (Oscar's trainval_label2ans); a pickle is not read (it
              could run code): json.dump(pickle.load(f), out) it once, where you trust it
    --out     the checkpoint to write

The checkpoint (shared/checkpoint.py) holds the converted model, an empty optimizer state, step
0, the config, the run (train.py's run options: the model, preset "paper" whose fields the
config replaces, the task, seed 0; and converted_from) and the tokenizer: infer.py reads it,
train.py --init fine-tunes it. Bad input ends in one line, "error: ...".
"""

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

import train
from shared.checkpoint import rng_states, save_checkpoint
from shared.cli import one_line
from shared.tokenizer import Tokenizer


def converters() -> dict:
    """{source: (model name, paper module)} over the papers of train.MODELS that declare
    CONVERTERS; a source two papers declare is refused (it would be ambiguous)."""
    found = {}
    for name in train.MODELS:
        paper = train.import_paper(name)
        for source in getattr(paper, "CONVERTERS", {}):
            if source in found:
                raise SystemExit(f"error: both {found[source][0]} and {name} declare a "
                                 f"converter {source!r}")
            found[source] = (name, paper)
    return found


def read_weights(path: Path) -> dict:
    """{name: tensor} of a torch or safetensors file, unwrapped (module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # the library's own error types: a header it cannot parse
            raise ValueError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:80]})"
                             ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickled objects (refused unrun), a truncated or foreign file
            raise ValueError(f"{path}: not a weights-only torch file "
                             f"({(str(e).splitlines() or [type(e).__name__])[0][:80]})") from None
    for wrapper in ("state_dict", "model"):  # a training checkpoint's weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict (names -> tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_json(path: Path, what: str):
    """The JSON document of a file the user named; one line when it is missing or not JSON."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None


def read_config(path: Path) -> dict:
    config = read_json(path, "config")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def weights_file(folder: Path) -> Path:
    """The weights of a BERT-format release folder."""
    for name in ("pytorch_model.bin", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds neither pytorch_model.bin nor model.safetensors")


def make_tokenizer(bpe: Path | None, vocab: Path | None, spm: Path | None,
                   cased: bool) -> Tokenizer:
    if bpe is not None:
        return Tokenizer.from_clip_bpe(bpe)
    if spm is not None:
        return Tokenizer.from_sentencepiece(spm)
    if vocab is None:
        raise ValueError("name the tokenizer: --bpe, --vocab or --spm")
    return Tokenizer.from_vocab_file(vocab, lowercase=not cased)


def read_answers(path: Path) -> list[str]:
    """--answers: a JSON list of the VQA head's classes, class i = item i."""
    answers = read_json(path, "answers")
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: not a JSON list of answer strings")
    return answers


def convert(source: str, weights: Path, config_path: Path | None, out: Path,
            bpe: Path | None = None, vocab: Path | None = None, spm: Path | None = None,
            cased: bool = False, answers: Path | None = None) -> dict:
    """Write the checkpoint `out`; returns {"model", "parameters", "out"} for the summary line."""
    found = converters()
    if source not in found:
        raise SystemExit(f"error: no paper declares a converter {source!r}; known: "
                         f"{', '.join(sorted(found)) or 'none'}")
    name, paper = found[source]
    with one_line(f"{source} weights: "):
        if weights.is_dir():  # a BERT-format folder: its own config and vocabulary
            config_path = config_path or (weights / "config.json")
            if bpe is None and spm is None and vocab is None and (weights / "vocab.txt").is_file():
                vocab = weights / "vocab.txt"
            weights = weights_file(weights)
        state = read_weights(weights)
        source_config = read_config(config_path) if config_path is not None else {}
        if answers is not None:
            source_config["answers"] = read_answers(answers)
        config, model_state = paper.CONVERTERS[source](state, source_config)
    with one_line("tokenizer: "):
        tokenizer = make_tokenizer(bpe, vocab, spm, cased)
    if tokenizer.vocab_size != config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {tokenizer.vocab_size} ids, the weights "
                         f"{config.vocab_size}: not the tokenizer they were trained with")
    with torch.device("meta"):  # the model the checkpoint is for: every tensor fits it
        model = paper.build_model(config)
    model.load_state_dict(model_state, strict=True, assign=True)
    run = dataclasses.asdict(train.RunConfig(model=name, preset="paper", task=config.task,
                                             out=str(out.parent)))
    run["converted_from"] = f"{source} {weights}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with one_line(""):
        save_checkpoint(out, model=model_state, optimizer={}, step=0, best=-math.inf,
                        rng=rng_states(), config=dataclasses.asdict(config), run=run,
                        tokenizer=tokenizer.to_str())
    return {"model": name, "parameters": sum(t.numel() for t in model_state.values()),
            "out": str(out)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="whose weights: a paper's CONVERTERS name (open_clip, "
                        "virtex, uniter, oscar)")
    parser.add_argument("weights", type=Path,
                        help="the weights: .bin / .pt / .pth / .safetensors, or a release folder")
    parser.add_argument("--config", type=Path, help="the source's config JSON")
    tokenizer = parser.add_mutually_exclusive_group()
    tokenizer.add_argument("--bpe", type=Path, help="CLIP's BPE merges (.txt or .txt.gz)")
    tokenizer.add_argument("--vocab", type=Path, help="a BERT vocab.txt")
    tokenizer.add_argument("--spm", type=Path, help="a SentencePiece model (VirTex's)")
    parser.add_argument("--cased", action="store_true",
                        help="--vocab is cased (bert-base-cased): no lower-casing")
    parser.add_argument("--answers", type=Path, help="a VQA head's classes, a JSON list")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    args = parser.parse_args(argv)
    done = convert(args.source, args.weights, args.config, args.out, args.bpe, args.vocab,
                   args.spm, args.cased, args.answers)
    print(f"{args.source} -> {done['model']}: {done['parameters'] / 1e6:.2f}M parameters "
          f"written to {done['out']}")


if __name__ == "__main__":
    main()
