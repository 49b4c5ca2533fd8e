"""BERT from a Hugging Face checkpoint folder, on our own blocks: the text encoder Oscar and
UNITER start from [Devlin et al. 2019, "BERT", arXiv 1810.04805].

    model = BertModel.from_pretrained("path/to/bert-base-uncased")   # no network
    hidden, pooled = model(input_ids, token_type_ids, attention_mask)  # (B, T, D), (B, D)

The folder is what `transformers` saves: `config.json`, the weights as `model.safetensors` (read
with the `safetensors` package) or `pytorch_model.bin` (read with torch.load, weights only), and
`vocab.txt` (read by shared.tokenizer.Tokenizer.from_vocab_file, cased or not as the folder's
`tokenizer_config.json` says: bert-base-cased, UNITER's, is cased).

The model is shared.transformer's BertEmbeddings, PostLNEncoderBlock and BertPooler, so the
weights Oscar and UNITER use are the same modules under the same names. The one place that
knows the checkpoint's names is `hf_to_ours`, one explicit line per tensor.

Supported: the plain BERT architecture ("bert" models: absolute positions, exact GELU, post-LN).
A checkpoint of another kind is refused with a message naming what differs.
"""

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from shared.transformer import BertEmbeddings, BertPooler, PostLNEncoderBlock


def hf_to_ours(hf: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """A Hugging Face BertModel state dict -> ours (BertModel below). The checkpoint's names may
    carry a "bert." prefix (BertForPreTraining) or none (BertModel); heads (cls.*) are dropped.
    Raises KeyError naming the first tensor the checkpoint lacks."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    names = {
        "embeddings.word.weight": "embeddings.word_embeddings.weight",
        "embeddings.position.weight": "embeddings.position_embeddings.weight",
        "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
        "embeddings.norm.weight": "embeddings.LayerNorm.weight",
        "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        "pooler.dense.weight": "pooler.dense.weight",
        "pooler.dense.bias": "pooler.dense.bias",
    }
    for i in range(n_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            names[ours + f"attn.q_proj.{p}"] = theirs + f"attention.self.query.{p}"
            names[ours + f"attn.k_proj.{p}"] = theirs + f"attention.self.key.{p}"
            names[ours + f"attn.v_proj.{p}"] = theirs + f"attention.self.value.{p}"
            names[ours + f"attn.out_proj.{p}"] = theirs + f"attention.output.dense.{p}"
            names[ours + f"attn_norm.{p}"] = theirs + f"attention.output.LayerNorm.{p}"
            names[ours + f"mlp.fc1.{p}"] = theirs + f"intermediate.dense.{p}"
            names[ours + f"mlp.fc2.{p}"] = theirs + f"output.dense.{p}"
            names[ours + f"mlp_norm.{p}"] = theirs + f"output.LayerNorm.{p}"
    # very old checkpoints name LayerNorm parameters gamma / beta
    hf.update({k.replace("LayerNorm.gamma", "LayerNorm.weight"): v
               for k, v in hf.items() if "LayerNorm.gamma" in k})
    hf.update({k.replace("LayerNorm.beta", "LayerNorm.bias"): v
               for k, v in hf.items() if "LayerNorm.beta" in k})
    missing = [theirs for theirs in names.values() if theirs not in hf]
    if missing:
        raise KeyError(f"the checkpoint has no tensor {missing[0]!r} "
                       f"({len(missing)} expected tensors missing)")
    return {ours: hf[theirs] for ours, theirs in names.items()}


def read_config(folder: Path) -> dict:
    """config.json of a BERT checkpoint folder, checked for what BertModel supports."""
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: is it a BERT checkpoint folder?")
    config = json.loads(path.read_text())
    problems = []
    if config.get("model_type", "bert") != "bert":
        problems.append(f"model_type is {config['model_type']!r}, not 'bert'")
    if config.get("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act is {config['hidden_act']!r}; only exact 'gelu' is built")
    if config.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type is {config['position_embedding_type']!r}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return config


def encoder_sizes(folder: str | Path) -> dict:
    """The encoder sizes of a BERT checkpoint folder as Config fields: hidden_size, layers, heads,
    intermediate_size. Raises FileNotFoundError (no config.json or no vocab.txt) or ValueError."""
    c = read_config(Path(folder))
    if not (Path(folder) / "vocab.txt").exists():
        raise FileNotFoundError(f"{folder} has no vocab.txt")
    return dict(hidden_size=c["hidden_size"], layers=c["num_hidden_layers"],
                heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"])


def read_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of model.safetensors (preferred) or pytorch_model.bin."""
    if (folder / "model.safetensors").exists():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{folder / 'model.safetensors'} needs the `safetensors` package "
                              f"(pip install safetensors)") from None
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


class BertModel(nn.Module):
    """BERT's encoder: embeddings, L post-LN layers, the tanh pooler on [CLS]. Dropout as the
    checkpoint's config (hidden_dropout_prob; attention dropout the same); eval() turns it off."""

    def __init__(self, vocab_size: int, hidden_size: int, layers: int, heads: int,
                 intermediate_size: int, max_positions: int = 512, type_vocab_size: int = 2,
                 dropout: float = 0.1, eps: float = 1e-12, pad_id: int = 0):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_positions,
                                         type_vocab_size, dropout, eps, pad_id)
        self.layers = nn.ModuleList(PostLNEncoderBlock(hidden_size, heads, intermediate_size,
                                                       dropout, eps) for _ in range(layers))
        self.pooler = BertPooler(hidden_size)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "BertModel":
        """Build from config.json and load the weights; every tensor of ours must be filled."""
        folder = Path(folder)
        c = read_config(folder)
        model = cls(c["vocab_size"], c["hidden_size"], c["num_hidden_layers"],
                    c["num_attention_heads"], c["intermediate_size"],
                    c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2),
                    c.get("hidden_dropout_prob", 0.1), c.get("layer_norm_eps", 1e-12),
                    c.get("pad_token_id", 0) or 0)
        state = hf_to_ours(read_weights(folder), c["num_hidden_layers"])
        model.load_state_dict(state, strict=True)
        return model

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """input_ids, token_type_ids (B, T); attention_mask (B, T), 1 / True = a real token.
        Returns (last_hidden_state (B, T, D), pooled (B, D))."""
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, D)
        allowed = None if attention_mask is None else attention_mask.bool()[:, None, :]
        for layer in self.layers:
            x = layer(x, allowed)  # (B, T, D)
        return x, self.pooler(x)


def load_bert_encoder(model: nn.Module, folder: str | Path) -> int:
    """Copy a BERT checkpoint into an encoder that holds `text_embeddings` (BertEmbeddings),
    `layers` (PostLNEncoderBlocks) and `pooler` (BertPooler), as the `encoder` of Oscar's and
    UNITER's models does: both papers initialise from BERT [Oscar §3 "Implementation Details";
    UNITER §4.2]. The model's
    sizes must be the checkpoint's (train.py --init_bert sets them from config.json); it may
    use fewer positions than BERT's 512 (the first rows are copied). The heads and the region
    embedding keep their own initialisation. Returns the number of tensors copied."""
    folder = Path(folder)
    c = read_config(folder)
    state = hf_to_ours(read_weights(folder), c["num_hidden_layers"])
    positions = model.text_embeddings.position.num_embeddings
    if positions > state["embeddings.position.weight"].shape[0]:
        raise ValueError(f"the model uses {positions} positions but {folder} has only "
                         f"{state['embeddings.position.weight'].shape[0]}")
    ours = {}
    for name, tensor in state.items():
        if name.startswith("embeddings."):
            name = "text_" + name
        if name == "text_embeddings.position.weight":
            tensor = tensor[:positions]
        ours[name] = tensor
    try:
        _, unexpected = model.load_state_dict(ours, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{folder} does not fit the model: "
                         f"{str(e).splitlines()[-1].strip()}") from None
    if unexpected:
        raise ValueError(f"the model has no {unexpected[0]!r}: it must hold text_embeddings, "
                         f"layers and pooler like Oscar's and UNITER's encoders")
    return len(ours)


def load_bert_heads(heads: nn.ModuleDict, folder: str | Path, sources: dict[str, str]) -> list[str]:
    """Start task heads from a BERT checkpoint's pre-training heads, as the official Oscar and
    UNITER codes do when they start from BERT. `sources` maps a head's name to the BERT head it
    starts from:

        "cls.predictions"       the MLM head: `transform` (a HeadTransform) and the output `bias`;
                                its output weight is tied to the word embeddings, so not copied
        "cls.seq_relationship"  the next-sentence head: a Linear(D, 2), label 0 = "is next"

    Heads the model has not got (another task) and BERT heads the checkpoint has not got (a plain
    BertModel save has no cls.*) are skipped. Returns the names of the heads filled; raises
    ValueError when a head's shapes do not fit."""
    hf = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                   "LayerNorm.bias"): v
          for k, v in read_weights(Path(folder)).items()}
    filled = []
    for name, source in sources.items():
        if name not in heads or f"{source}.bias" not in hf:
            continue
        if source == "cls.predictions":
            t = "cls.predictions.transform."
            state = {"transform.dense.weight": hf[t + "dense.weight"],
                     "transform.dense.bias": hf[t + "dense.bias"],
                     "transform.norm.weight": hf[t + "LayerNorm.weight"],
                     "transform.norm.bias": hf[t + "LayerNorm.bias"],
                     "bias": hf["cls.predictions.bias"]}
        elif source == "cls.seq_relationship":
            state = {"weight": hf[source + ".weight"], "bias": hf[source + ".bias"]}
        else:
            raise ValueError(f"unknown BERT head {source!r}: cls.predictions or "
                             f"cls.seq_relationship")
        try:
            heads[name].load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{folder}'s {source} does not fit the head {name!r}: "
                             f"{str(e).splitlines()[-1].strip()}") from None
        filled.append(name)
    return filled


def init_from_bert(model: nn.Module, folder: str | Path, sources: dict[str, str]) -> str:
    """train.py's --init_bert: model.encoder from the BERT checkpoint `folder`
    (load_bert_encoder), model.heads from its pre-training heads (load_bert_heads). Returns the
    line the run logs; any problem (a missing file or tensor, sizes that differ, safetensors
    not installed) is a ValueError of one line."""
    try:
        n = load_bert_encoder(model.encoder, folder)
        heads = load_bert_heads(model.heads, folder, sources)
    except (KeyError, ImportError, OSError) as e:
        raise ValueError(str(e).strip("'\"")) from None
    return (f"init from BERT {folder}: {n} tensors (embeddings, encoder, pooler); heads from its "
            f"pre-training heads: {', '.join(heads) or 'none'}")
