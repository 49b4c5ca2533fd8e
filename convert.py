"""Released weights of another codebase -> a checkpoint of this project (train.py's format).

    python convert.py open_clip open_clip_pytorch_model.bin --config open_clip_config.json \\
        --bpe bpe_simple_vocab_16e6.txt.gz --out coca-b32.pt
    python infer.py caption coca-b32.pt photo.jpg              # then it is a checkpoint like any
    python train.py --model coca --init coca-b32.pt --data jsonl:captions.jsonl   # fine-tune it

SOURCE is a name a paper file declares in its CONVERTERS (coca.py: open_clip, its released
CoCa weights); the paper is found by that declaration, never by its name. Its converter maps
every source tensor onto the paper's model (or says, in one line, which tensor is left over).

    WEIGHTS   the source's weights: a torch file (read weights-only: no code runs) or a
              .safetensors file; a {"state_dict": ...} wrapper and DDP's "module." prefixes are
              taken off, as open_clip's loader does
    --config  the source's config JSON: open_clip_config.json of a released model
              ({"model_cfg": ..., "preprocess_cfg": ...}), or a bare model config
              (open_clip's model_configs/coca_ViT-B-32.json; the pixel statistics are then CLIP's)
    --bpe     the tokenizer: CLIP's BPE merges (bpe_simple_vocab_16e6.txt.gz, inside the
              open_clip package), or --vocab, a BERT vocab.txt
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
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a state dict (names -> tensors)")
    if all(k.startswith("module.") for k in state):  # saved from a DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def convert(source: str, weights: Path, config_path: Path, out: Path, bpe: Path | None = None,
            vocab: Path | None = None) -> dict:
    """Write the checkpoint `out`; returns {"model", "parameters", "out"} for the summary line."""
    found = converters()
    if source not in found:
        raise SystemExit(f"error: no paper declares a converter {source!r}; known: "
                         f"{', '.join(sorted(found)) or 'none'}")
    name, paper = found[source]
    with one_line(f"{source} weights: "):
        state, source_config = read_weights(weights), read_config(config_path)
        config, model_state = paper.CONVERTERS[source](state, source_config)
    with one_line("tokenizer: "):
        tokenizer = (Tokenizer.from_clip_bpe(bpe) if bpe is not None
                     else Tokenizer.from_vocab_file(vocab))
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
    parser.add_argument("source", help="whose weights: a paper's CONVERTERS name (open_clip)")
    parser.add_argument("weights", type=Path, help="the weights: .bin / .pt / .safetensors")
    parser.add_argument("--config", type=Path, required=True, help="the source's config JSON")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--bpe", type=Path, help="CLIP's BPE merges (.txt or .txt.gz)")
    tokenizer.add_argument("--vocab", type=Path, help="a BERT vocab.txt")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint to write")
    args = parser.parse_args(argv)
    done = convert(args.source, args.weights, args.config, args.out, args.bpe, args.vocab)
    print(f"{args.source} -> {done['model']}: {done['parameters'] / 1e6:.2f}M parameters "
          f"written to {done['out']}")


if __name__ == "__main__":
    main()
