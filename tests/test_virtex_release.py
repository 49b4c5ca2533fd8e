"""VirTex's released checkpoints load into virtex.py: virtex.from_virtex, convert.py virtex, and
the SentencePiece tokenizer (Tokenizer.from_sentencepiece).

The official model is rebuilt here from torch modules, as its code builds it [code:
kdexd/virtex models/captioning.py, modules/textual_heads.py, modules/embedding.py,
modules/visual_backbones.py]: a torchvision ResNet-50 under visual.cnn (fc = Identity), a post-LN
torch TransformerDecoder textual head, and a backward head that shares the visual projection,
embedding and output layer. The ResNet is the release's; the textual head is a small one (H 64),
with random values everywhere. No network, no download.
"""

import copy
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import virtex
from shared.tokenizer import Tokenizer, virtex_normalize

ROOT = Path(__file__).resolve().parents[1]
HEAD = "transdec_postnorm::L2_H64_A4_F128"  # a small release-style head (the best: L1_H2048_A32)
V, MAX_LEN, ATOL = 300, 30, 1e-5


# --- the official model, written as its code builds it ---

class OfficialEmbedding(nn.Module):
    def __init__(self, vocab_size, hidden):
        super().__init__()
        self.words = nn.Embedding(vocab_size, hidden, padding_idx=0)
        self.positions = nn.Embedding(MAX_LEN, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=1e-8)
        self.dropout = nn.Dropout(0.1)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        x = self.dropout(self.layer_norm(self.words(tokens) + self.positions(positions)))
        return x * (tokens != 0).unsqueeze(-1).to(x.dtype)


class OfficialTextualHead(nn.Module):
    def __init__(self, vocab_size=V, hidden=64, heads=4, feedforward=128, layers=2):
        super().__init__()
        self.visual_projection = nn.Linear(2048, hidden)
        self.embedding = OfficialEmbedding(vocab_size, hidden)
        self.transformer = nn.TransformerDecoder(nn.TransformerDecoderLayer(
            hidden, heads, dim_feedforward=feedforward, dropout=0.1, activation="gelu",
            batch_first=True, norm_first=False), num_layers=layers)
        self.output = nn.Linear(hidden, vocab_size)
        self.output.weight = self.embedding.words.weight

    def forward(self, grid, tokens, lengths):
        visual = self.visual_projection(grid.flatten(2).transpose(1, 2))
        T = tokens.shape[1]
        pads = lengths.unsqueeze(1) < torch.ones_like(tokens).cumsum(dim=1)
        future = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        x = self.transformer(self.embedding(tokens), visual, tgt_mask=future,
                             tgt_key_padding_mask=pads.float().masked_fill(pads, float("-inf")))
        return self.output(x)


class OfficialBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.cnn = torchvision.models.resnet50(weights=None, zero_init_residual=True)
        self.cnn.fc = nn.Identity()

    def forward(self, image):
        c = self.cnn
        x = c.maxpool(c.relu(c.bn1(c.conv1(image))))
        return c.layer4(c.layer3(c.layer2(c.layer1(x))))


class OfficialBicaptioning(nn.Module):
    def __init__(self, vocab_size=V):
        super().__init__()
        self.visual = OfficialBackbone()
        self.textual = OfficialTextualHead(vocab_size)
        self.backward_textual = copy.deepcopy(self.textual)
        self.backward_textual.visual_projection = self.textual.visual_projection
        self.backward_textual.embedding = self.textual.embedding
        self.backward_textual.output = self.textual.output


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values in every tensor, ties kept, eval mode: the CNN's convolutions keep
    torchvision's He initialisation and every BatchNorm gets random affine parameters and
    statistics (so no residual branch is zero); the textual head gets N(0, 0.1²) weights and
    biases and LayerNorm γ around 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("visual.") and p.dim() == 4:
                continue  # torchvision's He-normal convolutions
            if name.startswith("visual.") and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.2)  # BatchNorm γ
            elif name.endswith("weight") and p.dim() == 1:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)  # LayerNorm γ
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return randomised(OfficialBicaptioning())


@pytest.fixture(scope="module")
def converted(official):
    config, state = virtex.from_virtex(official.state_dict(), {"textual_head": HEAD})
    return config, state


def our_model(config, state):
    model = virtex.VirTex(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 64, 64, generator=g)
    lengths = torch.tensor([9, 6])
    tokens = torch.randint(4, V, (2, 9), generator=g)
    tokens[1, 6:] = 0  # right-padded with <unk> = 0, as the official collate does
    return images, tokens, lengths


def differences(official, model) -> dict:
    """max |ours - official| of the CNN grid and of both directions' logits (fp32, eval)."""
    images, tokens, lengths = inputs()
    backward_tokens = virtex.reverse_captions(tokens)
    with torch.no_grad():
        grid = official.visual(images)
        theirs_f = official.textual(grid, tokens, lengths)
        theirs_b = official.backward_textual(grid, backward_tokens, lengths)
        ours_grid = model.visual(images)
        textual = model.heads["textual"]
        visual = textual.project(ours_grid)
        ours_f = textual.logits(tokens, visual)
        ours_b = textual.logits(backward_tokens, visual, transformer=model.heads["backward"])
    return {"cnn": (ours_grid - grid).abs().max().item(),
            "forward": (ours_f - theirs_f).abs().max().item(),
            "backward": (ours_b - theirs_b).abs().max().item()}


# --- parity ---

def test_cnn_features_and_both_directions_match_the_official_model(official, converted):
    config, state = converted
    assert (config.pretext, config.hidden_size, config.heads, config.layers,
            config.feedforward_size, config.vocab_size, config.max_text_len,
            config.resnet_blocks) == ("bicaptioning", 64, 4, 2, 128, V, MAX_LEN, (3, 4, 6, 3))
    diffs = differences(official, our_model(config, state))
    assert max(diffs.values()) < ATOL, diffs
    tv = official.visual.cnn  # the CNN is torchvision's ResNet-50, features and all
    images = inputs()[0]
    with torch.no_grad():
        pooled = our_model(config, state).pooled_features(images)
        expected = torch.nn.functional.normalize(tv(images), dim=-1)  # avgpool, fc = Identity
    assert (pooled - expected).abs().max().item() < ATOL


def test_every_official_tensor_is_used_and_every_one_of_ours_is_set(official, converted):
    config, state = converted
    with torch.device("meta"):
        wanted = virtex.VirTex(config).state_dict()
    assert state.keys() == wanted.keys()
    assert all(state[k].shape == wanted[k].shape for k in wanted)
    assert torch.equal(state["heads.textual.output.weight"],
                       state["heads.textual.embedding.words.weight"])  # tied, as the release


# each step of the mapping, undone (its tensors left at our initialisation): parity must fail
STEPS = {"resnet": "visual.", "visual projection": "heads.textual.visual_projection.",
         "word embedding": "heads.textual.embedding.words.",
         "position embedding": "heads.textual.embedding.positions.",
         "embedding LayerNorm": "heads.textual.embedding.norm.",
         "self-attention q/k/v split": "heads.textual.transformer.layers.0.self_attn.q_proj.",
         "cross-attention q/k/v split": "heads.textual.transformer.layers.1.cross_attn.k_proj.",
         "attention out_proj": "heads.textual.transformer.layers.0.self_attn.out_proj.",
         "norm1": "heads.textual.transformer.layers.0.self_attn_norm.",
         "norm2": "heads.textual.transformer.layers.1.cross_attn_norm.",
         "norm3": "heads.textual.transformer.layers.0.mlp_norm.",
         "linear1": "heads.textual.transformer.layers.1.mlp.fc1.",
         "linear2": "heads.textual.transformer.layers.0.mlp.fc2.",
         "output bias": "heads.textual.output.bias",
         "backward transformer": "heads.backward.layers.0.self_attn.v_proj."}


@pytest.mark.parametrize("step", STEPS)
def test_the_parity_fails_when_one_mapping_step_is_dropped(official, converted, step):
    config, state = converted
    torch.manual_seed(5)
    fresh = virtex.VirTex(config).state_dict()
    undone = {k: (fresh[k] if k.startswith(STEPS[step]) else v) for k, v in state.items()}
    if step == "word embedding":  # the output weight is the same tensor
        undone["heads.textual.output.weight"] = undone["heads.textual.embedding.words.weight"]
    diffs = differences(official, our_model(config, undone))
    assert max(diffs.values()) > 1e-3, (step, diffs)


def test_the_parity_fails_with_a_wrong_layer_name_map_or_head_count(official, monkeypatch):
    swapped = dict(virtex.RELEASE_LAYER_NAMES, norm1="mlp_norm", norm3="self_attn_norm")
    monkeypatch.setattr(virtex, "RELEASE_LAYER_NAMES", swapped)
    diffs = differences(official, our_model(*virtex.from_virtex(
        official.state_dict(), {"textual_head": HEAD})))
    assert max(diffs.values()) > 1e-3
    monkeypatch.undo()
    wrong_heads = virtex.from_virtex(official.state_dict(), {})  # A = H / 64 = 1, not 4
    assert wrong_heads[0].heads == 1
    assert differences(official, our_model(*wrong_heads))["forward"] > 1e-3


def test_leftover_missing_and_untied_tensors_are_named_in_one_line(official):
    state = dict(official.state_dict())
    extra = dict(state, **{"textual.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="no place for: textual.extra.weight") as e:
        virtex.from_virtex(extra, {"textual_head": HEAD})
    assert "\n" not in str(e.value)
    partial = {k: v for k, v in state.items() if k != "textual.transformer.layers.1.norm2.bias"}
    with pytest.raises(ValueError, match="lack textual.transformer.layers.1.norm2.bias"):
        virtex.from_virtex(partial, {"textual_head": HEAD})
    untied = dict(state, **{"backward_textual.visual_projection.bias":
                            state["textual.visual_projection.bias"] + 1})
    with pytest.raises(ValueError, match="backward_textual.visual_projection.bias is not"):
        virtex.from_virtex(untied, {"textual_head": HEAD})
    with pytest.raises(ValueError, match="tensors give L2_H64_F128"):
        virtex.from_virtex(state, {"textual_head": "transdec_postnorm::L1_H64_A4_F128"})
    with pytest.raises(ValueError, match="post-LN"):
        virtex.from_virtex(state, {"textual_head": "transdec_prenorm::L2_H64_A4_F128"})


def test_the_official_yaml_form_and_the_other_pretexts():
    """The official config as a dict; a captioning (forward only) and a token-classification
    release."""
    torch.manual_seed(0)
    forward_only = randomised(OfficialBicaptioning())
    state = {k: v for k, v in forward_only.state_dict().items()
             if not k.startswith("backward_textual.")}
    yaml_form = {"MODEL": {"NAME": "captioning", "TEXTUAL": {"NAME": HEAD, "DROPOUT": 0.1}}}
    config, ours = virtex.from_virtex(state, yaml_form)
    assert config.pretext == "captioning" and "heads.backward.layers.0.mlp.fc1.weight" not in ours
    masked = virtex.from_virtex(state, {"model": "masked_lm", "textual_head": HEAD})[0]
    assert masked.pretext == "masked_lm"
    cnn = {k: v for k, v in state.items() if k.startswith("visual.")}
    token = dict(cnn, **{"textual.output.weight": torch.randn(V, 2048),
                         "textual.output.bias": torch.randn(V)})
    config, ours = virtex.from_virtex(token, {"model": "token_classification"})
    assert config.pretext == "token_classification" and config.vocab_size == V
    assert torch.equal(ours["heads.token_classification.bias"], token["textual.output.bias"])
    with pytest.raises(ValueError, match="multilabel"):
        virtex.from_virtex(token, {"model": "multilabel_classification"})


# --- the tokenizer: VirTex's SentencePiece BPE ---

WORDS = ("a an the dog cat man woman sitting standing on in of with next to table red blue green "
         "large small two three bus train giraffe elephant pizza left right street skateboard "
         "café naïve über 123 4567 kite surfing, riding; playing. jumps! what? don't it's").split()


def caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 18)))


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A SentencePiece model trained as VirTex's build_vocabulary script trains coco_10k
    [code: kdexd/virtex scripts/build_vocabulary.py], on generated captions, V = 300."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    corpus = [virtex_normalize(caption(rng).capitalize()) for _ in range(20_000)]
    (folder / "captions.txt").write_text("\n".join(corpus) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "captions.txt"), vocab_size=V, model_prefix=str(folder / "coco_small"),
        model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1,
        control_symbols="[SOS],[EOS],[MASK]", minloglevel=2)
    return folder / "coco_small.model"


def test_sentencepiece_ids_equal_sentencepiece_on_varied_text(spm_model):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    tokenizer = Tokenizer.from_sentencepiece(spm_model)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.unk_id,
            tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) == \
        ("sentencepiece", V, 0, 0, 1, 2, 3)
    rng = random.Random(1)
    odd = ["", " ", "  a   dog  ", "\tcat\n", "ＡＢＣ ｆｕｌｌ", "x ☃ y 漢字 z", "[SOS] [MASK] <unk>",
           "Ωmega ℌ ﬁne", "a" * 50, "ǅ ß İ", "e\u0301", "\u200b zero", "🙂🙂 dog 🙂"]
    texts = odd + [caption(rng) for _ in range(2000)] + [
        "".join(rng.choice("abcdefg XYZ.,!é漢ü\u00a0\u3000") for _ in range(rng.randint(0, 30)))
        for _ in range(2000)]
    for text in texts:
        assert tokenizer.encode(text) == [1, *processor.encode(virtex_normalize(text)), 2], text
    again = Tokenizer.from_str(tokenizer.to_str())
    assert again.kind == "sentencepiece" and again.encode(texts[20]) == tokenizer.encode(texts[20])
    ids = tokenizer.encode("A dog on a Table.")
    assert tokenizer.decode(ids) == processor.decode(ids[1:-1]) == "a dog on a table."
    assert virtex_normalize("Café") == "cafe" == unicodedata.normalize("NFC", "cafe")


def test_a_file_that_is_not_a_sentencepiece_model_is_refused(tmp_path):
    (tmp_path / "x.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_sentencepiece(tmp_path / "x.model")
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_sentencepiece(tmp_path / "none.model")


# --- convert.py, infer.py and train.py on a converted checkpoint ---

def run_script(*args, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_a_converted_release_captions_probes_and_fine_tunes(official, spm_model, tmp_path):
    from PIL import Image

    import infer

    weights = tmp_path / "bicaptioning_small.pth"
    torch.save({"model": official.state_dict()}, weights)  # as CheckpointManager saves it
    (tmp_path / "config.json").write_text(json.dumps({"textual_head": HEAD}))
    ckpt = tmp_path / "v.pt"
    done = run_script("convert.py", "virtex", weights, "--config", tmp_path / "config.json",
                      "--spm", spm_model, "--out", ckpt)
    assert done.returncode == 0, done.stderr
    assert "virtex -> virtex" in done.stdout
    paper, model, tokenizer, config, run = infer.load(ckpt)
    assert (config.heads, tokenizer.kind, tokenizer.cls_id) == (4, "sentencepiece", 1)
    assert max(differences(official, model.eval()).values()) < ATOL
    colours = {"red": (230, 20, 20), "green": (20, 230, 20)}
    for split in ("train", "val"):
        for name, rgb in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (48 + 8 * k, 40), rgb).save(tmp_path / split / name / f"{k}.png")
    photo = tmp_path / "train" / "red" / "0.png"
    captioned = run_script("infer.py", "caption", ckpt, photo, "--json")
    assert captioned.returncode == 0, captioned.stderr
    (result,) = json.loads(captioned.stdout)["caption"]
    assert isinstance(result["caption"], str)
    probed = infer.probe(ckpt, tmp_path / "train", tmp_path / "val")
    assert probed["classes"] == 2 and 0 <= probed["top1"] <= 1
    lines = [json.dumps({"image": f"train/{name}/{k}.png", "captions": [f"a {name} square."]})
             for name in colours for k in range(2)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    tuned = run_script("train.py", "--model", "virtex", "--init", ckpt, "--data",
                       f"jsonl:{tmp_path / 'corpus.jsonl'}", "--out", tmp_path / "run",
                       "--batch_size", "2", "--max_steps", "2", "--warmup_steps", "1",
                       "--num_workers", "0", "--log_every_s", "0")
    assert tuned.returncode == 0, tuned.stderr
    assert f"init from {ckpt}" in tuned.stdout and "step 2/2" in tuned.stdout
