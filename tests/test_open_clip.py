"""coca.py as open_clip's released CoCa: the converter (coca.from_open_clip) against open_clip's
own model, number for number; convert.py's checkpoint in infer.py and train.py.

Kind (README, house style): (b) equivalence with an independent implementation. open_clip's
CoCa class is built directly with small sizes of the released layout (a ViT with a class token,
one 256-query pooler, two blocks a multimodal layer), every parameter randomised (LayerNorm
gains and biases, class and positional embeddings, pooler queries, logit_scale too: no
mapping error can hide behind an initialisation of ones or zeros), converted, and compared in
fp32, eval mode. One test runs the real coca_ViT-B-32 size with random weights.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.coca_model import CoCa as OpenClipCoCa

import coca

ROOT = Path(__file__).resolve().parents[1]
BPE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"  # shipped with open_clip
ATOL = 1e-5  # fp32


def small_cfg(vision_width: int = 64, vocab_size: int = 64, context_length: int = 12) -> dict:
    """An open_clip CoCa model config of the released layout (model_configs/coca_ViT-B-32.json)
    at CPU-test sizes. vision_width 64 != embed_dim 48: the pooler's keys come from another
    width, so torch keeps separate q/k/v_proj_weight there; 48 gives a fused in_proj_weight.
    Pooler heads (2) differ from the text heads (4), as in coca_ViT-L-14."""
    E = 48
    return {"embed_dim": E,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": vision_width, "head_width": 16,
                           "patch_size": 8, "attentional_pool": True, "attn_pooler_queries": 6,
                           "attn_pooler_heads": 2, "output_tokens": True},
            "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": E,
                         "heads": 4, "layers": 2, "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": context_length, "vocab_size": vocab_size,
                               "width": E, "heads": 4, "layers": 2},
            "custom_text": True}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn anew: LayerNorm gains 1 + N(0, 0.3²), biases N(0, 0.1²), vectors
    (class token, [CLS]) N(0, 0.5²), matrices N(0, 1/fan_in), logit_scale log(1/τ) with τ
    about 0.1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name == "logit_scale":
            p.copy_(math.log(10.0) + 0.2 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif p.ndim == 1 and name.endswith("weight"):  # a LayerNorm gain
            p.copy_(1 + 0.3 * noise)
        elif p.ndim == 1:
            p.copy_(0.5 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
    return model


def open_clip_model(cfg: dict, seed: int = 0) -> OpenClipCoCa:
    model = OpenClipCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"],
                         cfg["vision_cfg"])
    return randomise(model, seed).eval()


def converted(theirs: OpenClipCoCa, cfg: dict, **overrides) -> coca.CoCa:
    config, state = coca.from_open_clip(theirs.state_dict(), cfg)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    model = coca.CoCa(config)
    model.load_state_dict(state)
    return model.eval()


def texts(cfg: dict, B: int = 4, seed: int = 1) -> torch.Tensor:
    """(B, context_length) open_clip-style texts: start, words, end, then 0 to the end; row 0
    fills every position (no pad: open_clip's shifted [CLS] mask then hides nothing)."""
    V, L = cfg["text_cfg"]["vocab_size"], cfg["text_cfg"]["context_length"]
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(B, L, dtype=torch.long)
    for b, length in enumerate([L, 3, L - 4, 6][:B]):
        out[b, 0], out[b, length - 1] = V - 2, V - 1
        out[b, 1:length - 1] = torch.randint(1, V - 2, (length - 2,), generator=gen)
    return out


def images(cfg: dict, B: int = 4, seed: int = 2) -> torch.Tensor:
    size = cfg["vision_cfg"]["image_size"]
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def differences(theirs: OpenClipCoCa, ours: coca.CoCa, image: torch.Tensor,
                text: torch.Tensor) -> dict:
    """Max |open_clip - ours| of the image and text embeddings, the contrastive logits and the
    captioning logits (open_clip's forward: the decoder reads text[:, :-1])."""
    out = theirs(image, text)
    image_emb, caption_queries = ours.encode_image(image)  # (B, E), (B, Q-1, D)
    text_emb, text_states = ours.encode_text(text)  # (B, E), (B, T, D)
    logits = ours.text_decoder.multimodal(text_states, caption_queries)[:, :-1]  # (B, T-1, V)
    scale = ours.logit_scale.exp()
    pairs = {"image_embedding": (out["image_features"], image_emb),
             "text_embedding": (out["text_features"], text_emb),
             "contrastive_logits": (out["logit_scale"] * out["image_features"]
                                    @ out["text_features"].T, scale * image_emb @ text_emb.T),
             "caption_logits": (out["logits"], logits)}
    return {k: float((a - b).abs().max()) for k, (a, b) in pairs.items()}


# --- the configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["coca_ViT-B-32", "coca_ViT-L-14"])
def test_the_presets_are_open_clip_s_configs_and_parameter_counts(name):
    assert coca.OPEN_CLIP_MODELS[name] == open_clip.get_model_config(name)
    cfg = open_clip.get_model_config(name)
    with torch.device("meta"):
        theirs = OpenClipCoCa(cfg["embed_dim"], cfg["multimodal_cfg"], cfg["text_cfg"],
                              cfg["vision_cfg"])
        ours = coca.CoCa(coca.Config.open_clip(name))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    config = coca.Config.open_clip(name)
    assert (config.pooler_layout, config.n_caption_queries, config.max_text_len,
            config.vocab_size) == ("single", 256, 76, 49408)
    assert config.image_mean == coca.CLIP_MEAN and config.legacy_cls_mask


def test_the_default_config_is_the_paper_s_layout():
    c = coca.Config()
    assert (c.vision_cls_token, c.ln_pre, c.cross_kv_norm, c.separate_cross_block,
            c.legacy_cls_mask, c.patch_bias, c.output_bias, c.pooler_heads, c.ln_eps) == \
        (False, False, False, False, False, True, True, 0, 1e-6)
    with pytest.raises(ValueError, match="no open_clip CoCa"):
        coca.Config.open_clip("coca_ViT-H-14")


@pytest.mark.parametrize("change,message", [
    (lambda c: c["vision_cfg"].update(attentional_pool="cascade"), "attentional_pool"),
    (lambda c: c["text_cfg"].update(ls_init_value=1e-5), "ls_init_value"),
    (lambda c: c.update(quick_gelu=True), "quick_gelu"),
    (lambda c: c["multimodal_cfg"].update(width=32), "must be equal"),
])
def test_an_open_clip_setting_without_equivalent_is_one_line(change, message):
    cfg = small_cfg()
    change(cfg)
    with pytest.raises(ValueError, match=message) as e:
        coca.open_clip_config(cfg)
    assert "\n" not in str(e.value)


# --- parity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("vision_width", [64, 48], ids=["separate_qkv", "fused_qkv"])
def test_embeddings_and_logits_equal_open_clip_s(vision_width):
    cfg = small_cfg(vision_width)
    theirs = open_clip_model(cfg)
    ours = converted(theirs, cfg)
    diffs = differences(theirs, ours, images(cfg), texts(cfg))
    assert max(diffs.values()) < ATOL, diffs


def test_open_clip_s_shifted_cls_mask_is_reproduced_and_the_correct_one_too():
    """open_clip builds the released layout with its shifted [CLS] mask (legacy_cls_mask);
    with its correct_cls_mask switched on, ours with the flag off matches it. The two masks give
    different text embeddings for padded texts (so the flag matters), the same for the full one
    and the same token states at the real tokens (pad rows see other keys)."""
    cfg = small_cfg()
    theirs, text, image = open_clip_model(cfg), texts(cfg), images(cfg)
    legacy = converted(theirs, cfg)
    correct = converted(theirs, cfg, legacy_cls_mask=False)
    assert not theirs.text.correct_cls_mask  # what open_clip builds
    theirs.text.correct_cls_mask = True
    assert max(differences(theirs, correct, image, text).values()) < ATOL
    assert max(differences(theirs, legacy, image, text).values()) > 1e-3
    with torch.no_grad():
        (a, states_a), (b, states_b) = legacy.encode_text(text), correct.encode_text(text)
    assert torch.allclose(a[0], b[0], atol=ATOL) and (a[1:] - b[1:]).abs().max() > 1e-3
    real = text != 0  # (B, T)
    assert torch.allclose(states_a[real], states_b[real], atol=ATOL)


def test_the_legacy_mask_does_not_depend_on_how_far_the_batch_is_padded():
    """open_clip pads every text to context_length; ours pads the legacy mask's texts there
    itself, so a batch padded only to its longest text gives open_clip's embeddings."""
    cfg = small_cfg()
    theirs = open_clip_model(cfg)
    ours = converted(theirs, cfg)
    text = texts(cfg)[1:]  # the longest is 8 of 12
    short = text[:, :8]
    with torch.no_grad():
        assert torch.allclose(ours.embed_texts(short), theirs.encode_text(text), atol=ATOL)


@torch.no_grad()
def open_clip_greedy(theirs: OpenClipCoCa, image: torch.Tensor, start: int, end: int,
                     max_len: int) -> torch.Tensor:
    """Plain greedy decoding over open_clip's forward: the argmax of its last logits (never
    the pad id 0), until every row has emitted `end` or max_len tokens are written."""
    out = torch.full((image.shape[0], 1), start)
    done = torch.zeros(image.shape[0], dtype=torch.bool)
    while out.shape[1] < max_len and not done.all():
        logits = theirs(image, out, output_labels=False)["logits"][:, -1]  # (B, V)
        logits[:, 0] = -math.inf
        token = torch.where(done, 0, logits.argmax(dim=-1))
        out = torch.cat([out, token[:, None]], dim=1)
        done |= token == end
    return out


def an_end_token(theirs: OpenClipCoCa, image: torch.Tensor, start: int) -> int:
    """A random model need not emit a given end token: the end token is one its greedy
    captions reach in some rows (at the third token or later) but not in all."""
    free = open_clip_greedy(theirs, image, start, -1, max_len=12)[:, 2:]  # never ends
    reached = [t for t in range(1, start) if 2 <= (free == t).any(dim=1).sum() < len(free)]
    assert reached, free
    return reached[0]


def test_greedy_captions_are_open_clip_s_tokens_cached_or_not():
    cfg = small_cfg(vocab_size=24)
    theirs = open_clip_model(cfg)
    ours = converted(theirs, cfg)
    image, start = images(cfg, B=6), 22
    end = an_end_token(theirs, image, start)
    expected = open_clip_greedy(theirs, image, start, end, max_len=12)
    assert (expected == end).any(dim=1).sum() >= 2 and expected.shape[1] > 4  # some rows end
    for cached in (True, False):
        tokens = ours.generate(image, start, end, max_len=12, cached=cached)
        assert torch.equal(tokens, expected), cached


def test_greedy_captions_are_those_of_open_clip_s_generate(monkeypatch):
    """open_clip's own generate with top-k sampling at k = 1 (an argmax), min_seq_len 1 and
    repetition penalty 1 (both inactive): our greedy tokens, except the end token open_clip
    forces into the last position of a row that has not ended (seq_len). Its generate imports
    transformers' logit processors; those it needs here are put back where the import of its
    beam search scorer (gone from transformers 5) made it give up on all of them."""
    import open_clip.coca_model as coca_model
    import transformers

    for name in ("LogitsProcessorList", "TopKLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                 "MinLengthLogitsProcessor", "MaxLengthCriteria", "StoppingCriteriaList"):
        monkeypatch.setattr(coca_model, name, getattr(transformers, name), raising=False)
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    cfg = small_cfg(vocab_size=24)
    theirs = open_clip_model(cfg)
    ours = converted(theirs, cfg)
    image, start, seq_len = images(cfg, B=6), 22, 12
    end = an_end_token(theirs, image, start)
    expected = theirs.generate(image, seq_len=seq_len, generation_type="top_k", top_k=1,
                               min_seq_len=1, repetition_penalty=1.0, sot_token_id=start,
                               eos_token_id=end, pad_token_id=0)
    tokens = ours.generate(image, start, end, max_len=seq_len)
    assert (expected == end).any(dim=1).sum() >= 2  # some rows end before seq_len
    for row, theirs_row in zip(tokens.tolist(), expected.tolist()):
        if len(row) < len(theirs_row):  # (our batch stops at its longest row)
            row += [0] * (len(theirs_row) - len(row))
        if end not in theirs_row[:-1]:  # ran to seq_len: open_clip ends it by force
            row[-1] = end
        assert row == theirs_row


def test_the_b32_size_with_random_weights_gives_open_clip_s_embeddings():
    """coca_ViT-B-32 itself (253.6M parameters, random weights): image embeddings of 2 images
    and text embeddings of 2 texts of 76 tokens."""
    cfg = open_clip.get_model_config("coca_ViT-B-32")
    torch.manual_seed(0)
    theirs = open_clip_model(cfg)
    config, state = coca.from_open_clip(theirs.state_dict(), cfg)
    with torch.device("meta"):
        ours = coca.CoCa(config)
    ours.load_state_dict(state, assign=True)
    ours.eval()
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    text = torch.zeros(2, 76, dtype=torch.long)
    text[:, 0], text[0, 1:9], text[0, 9], text[1, 1:75], text[1, 75] = \
        49406, torch.arange(300, 308), 49407, torch.arange(1000, 1074), 49407
    with torch.no_grad():
        image_diff = (theirs.encode_image(image) - ours.embed_images(image)).abs().max()
        text_diff = (theirs.encode_text(text) - ours.embed_texts(text)).abs().max()
    assert image_diff < ATOL and text_diff < ATOL, (image_diff, text_diff)


# --- every tensor, every step -----------------------------------------------------------------

def test_every_open_clip_tensor_is_used_and_every_one_of_ours_is_set():
    cfg = small_cfg()
    state = open_clip_model(cfg).state_dict()
    config, ours = coca.from_open_clip(state, cfg)
    assert set(ours) == set(coca.CoCa(config).state_dict())
    extra = {**state, "visual.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"no place for: visual\.extra\.weight$"):
        coca.from_open_clip(extra, cfg)
    for name in ("text_decoder.cross_attn.1.ln_1_kv.bias", "visual.attn_pool.attn.k_proj_weight",
                 "visual.ln_pre.weight", "logit_scale"):
        missing = {k: v for k, v in state.items() if k != name}
        with pytest.raises(ValueError, match=f"lack {name}"):
            coca.from_open_clip(missing, cfg)
        renamed = {**missing, f"old_{name}": state[name]}
        with pytest.raises(ValueError, match=f"lack {name}"):
            coca.from_open_clip(renamed, cfg)
    wrong = {**state, "visual.proj": state["visual.proj"][:, :40]}
    with pytest.raises(ValueError, match=r"visual\.proj gives image_projection\.weight"):
        coca.from_open_clip(wrong, cfg)


def _swap_q_k(state):  # the in_proj rows split in the wrong order
    a, b = "text_decoder.multimodal_layers.0.self_attn.q_proj", \
        "text_decoder.multimodal_layers.0.self_attn.k_proj"
    for part in ("weight", "bias"):
        state[f"{a}.{part}"], state[f"{b}.{part}"] = state[f"{b}.{part}"], state[f"{a}.{part}"]


def _unsplit_pooler_values(state):  # the pooler's v_proj_weight left at the key's
    state["caption_pooler.attn.v_proj.weight"] = state["caption_pooler.attn.k_proj.weight"]


def _no_ln_1_kv(state):  # the cross-attention's key/value LayerNorm not mapped (init)
    state["text_decoder.multimodal_layers.1.context_norm.weight"].fill_(1)
    state["text_decoder.multimodal_layers.1.context_norm.bias"].zero_()


def _no_ln_k(state):  # the pooler's key LayerNorm not mapped onto ImageEncoder.norm
    state["image_encoder.norm.weight"].fill_(1)
    state["image_encoder.norm.bias"].zero_()


def _no_ln_q(state):
    state["caption_pooler.query_norm.weight"].fill_(1)


def _proj_untransposed(state):  # visual.proj (E, E) is square: only the numbers tell
    state["image_projection.weight"] = state["image_projection.weight"].T.clone()


def _conv_flattened_channels_last(state):  # conv1 flattened as (row, column, channel)
    w = state["image_encoder.patch_embedding.proj.weight"]  # (Dv, 3·p·p)
    p = int(math.isqrt(w.shape[1] // 3))
    state["image_encoder.patch_embedding.proj.weight"] = \
        w.reshape(-1, 3, p, p).permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def _cls_position_first(state):  # the [CLS] position taken from row 0 instead of the last row
    rows = state["text_decoder.positions"]
    state["text_decoder.positions"] = torch.cat([rows[-1:], rows[1:-1], rows[:1]])


@pytest.mark.parametrize("undo", [_swap_q_k, _unsplit_pooler_values, _no_ln_1_kv, _no_ln_k,
                                  _no_ln_q, _proj_untransposed, _conv_flattened_channels_last,
                                  _cls_position_first])
def test_the_parity_fails_when_one_conversion_step_is_undone(undo):
    """The parity assertion is no tautology: the converter's output with one step undone (as
    if that step were removed) is caught."""
    cfg = small_cfg()
    theirs = open_clip_model(cfg)
    config, state = coca.from_open_clip(theirs.state_dict(), cfg)
    undo(state)
    ours = coca.CoCa(config)
    ours.load_state_dict(state)
    diffs = differences(theirs, ours.eval(), images(cfg), texts(cfg))
    assert max(diffs.values()) > 1e-3, diffs


def test_the_parity_fails_without_the_legacy_mask_or_the_layer_norm_epsilon():
    cfg = small_cfg()
    theirs = open_clip_model(cfg)
    for change in ({"legacy_cls_mask": False}, {"ln_eps": 1e-6}):
        diffs = differences(theirs, converted(theirs, cfg, **change), images(cfg), texts(cfg))
        assert max(diffs.values()) > ATOL, change


# --- convert.py: a checkpoint like any other --------------------------------------------------

def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A small open_clip CoCa with CLIP's 49,408-id vocabulary, as released models are shipped:
    open_clip_pytorch_model.bin (a state dict saved with torch.save) and open_clip_config.json."""
    folder = tmp_path_factory.mktemp("released")
    cfg = small_cfg(vocab_size=49408, context_length=16)
    theirs = open_clip_model(cfg)
    torch.save(theirs.state_dict(), folder / "open_clip_pytorch_model.bin")
    preprocess = {"mean": list(coca.CLIP_MEAN), "std": list(coca.CLIP_STD)}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg,
                                                              "preprocess_cfg": preprocess}))
    return folder, cfg, theirs


def test_convert_py_writes_a_checkpoint_infer_py_captions_with(released, tmp_path):
    import infer
    from PIL import Image

    folder, cfg, theirs = released
    ckpt = tmp_path / "coca.pt"
    done = run_script("convert.py", "open_clip", folder / "open_clip_pytorch_model.bin",
                      "--config", folder / "open_clip_config.json", "--bpe", BPE, "--out", ckpt)
    assert done.returncode == 0, done.stderr
    assert "open_clip -> coca" in done.stdout
    paper, model, tokenizer, config, run = infer.load(ckpt)
    assert (run["model"], config.pooler_layout, config.image_mean) == \
        ("coca", "single", coca.CLIP_MEAN)
    assert run["converted_from"].startswith("open_clip ")
    assert (tokenizer.cls_id, tokenizer.sep_id, tokenizer.vocab_size) == (49406, 49407, 49408)
    diffs = differences(theirs, model, images(cfg), texts(cfg))
    assert max(diffs.values()) < ATOL, diffs
    photo = tmp_path / "photo.png"
    Image.new("RGB", (48, 40), (200, 120, 30)).save(photo)
    captioned = run_script("infer.py", "caption", ckpt, photo, "--json")
    assert captioned.returncode == 0, captioned.stderr
    (result,) = json.loads(captioned.stdout)["caption"]
    assert result["file"] == str(photo) and isinstance(result["caption"], str)


def test_convert_py_reads_safetensors_and_bare_model_configs(released, tmp_path):
    from safetensors.torch import save_file

    folder, cfg, theirs = released
    save_file(theirs.state_dict(), tmp_path / "open_clip_model.safetensors")
    (tmp_path / "coca_small.json").write_text(json.dumps(cfg))
    done = run_script("convert.py", "open_clip", tmp_path / "open_clip_model.safetensors",
                      "--config", tmp_path / "coca_small.json", "--bpe", BPE,
                      "--out", tmp_path / "out" / "coca.pt")
    assert done.returncode == 0, done.stderr
    state = torch.load(tmp_path / "out" / "coca.pt", weights_only=True)
    _, expected = coca.from_open_clip(theirs.state_dict(), cfg)
    assert state["model"].keys() == expected.keys()
    assert all(torch.equal(state["model"][k], v) for k, v in expected.items())
    assert tuple(state["config"]["image_std"]) == coca.CLIP_STD  # CLIP's, a bare config's default


def test_convert_py_refuses_bad_input_in_one_line(released, tmp_path):
    folder, cfg, theirs = released
    weights, config = folder / "open_clip_pytorch_model.bin", folder / "open_clip_config.json"
    state = theirs.state_dict()
    state.pop("text.cls_emb")
    torch.save(state, tmp_path / "partial.bin")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "objects.bin").write_bytes(b"not a torch file")
    cases = [(["open_clip", weights, "--config", config, "--bpe", tmp_path / "none.gz"],
              "tokenizer: "),
             (["timm", weights, "--config", config, "--bpe", BPE], "no paper declares"),
             (["open_clip", tmp_path / "none.bin", "--config", config, "--bpe", BPE],
              "no weights file"),
             (["open_clip", tmp_path / "objects.bin", "--config", config, "--bpe", BPE],
              "not a weights-only torch file"),
             (["open_clip", weights, "--config", tmp_path / "bad.json", "--bpe", BPE],
              "not JSON"),
             (["open_clip", tmp_path / "partial.bin", "--config", config, "--bpe", BPE],
              "lack text.cls_emb")]
    for args, message in cases:
        done = run_script("convert.py", *args, "--out", tmp_path / "x.pt")
        assert done.returncode != 0 and message in done.stderr, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error: ")
    assert not (tmp_path / "x.pt").exists()


def test_a_converted_checkpoint_fine_tunes_and_resumes(released, tmp_path):
    """train.py --init on a converted checkpoint, on a JSON-lines corpus of the converted
    config's image size (32 px), then --resume from its latest.pt."""
    from PIL import Image

    folder, cfg, _ = released
    ckpt = tmp_path / "coca.pt"
    assert run_script("convert.py", "open_clip", folder / "open_clip_pytorch_model.bin",
                      "--config", folder / "open_clip_config.json", "--bpe", BPE,
                      "--out", ckpt).returncode == 0
    lines = []
    for i, colour in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "captions": [f"a photo of colour {i}."]}))
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    common = ["--model", "coca", "--data", f"jsonl:{tmp_path / 'corpus.jsonl'}", "--out", out,
              "--batch_size", "2", "--max_steps", "4", "--warmup_steps", "1", "--num_workers",
              "0", "--log_every_s", "0"]
    first = run_script("train.py", *common, "--init", ckpt, "--stop_at", "2")
    assert first.returncode == 0, first.stderr
    assert f"init from {ckpt}" in first.stdout and "stopped at step 2" in first.stdout
    state = torch.load(out / "latest.pt", weights_only=True)
    assert state["config"]["pooler_layout"] == "single" and state["step"] == 2
    assert tuple(state["config"]["image_mean"]) == coca.CLIP_MEAN
    second = run_script("train.py", *common, "--resume")
    assert second.returncode == 0, second.stderr
    assert "step 4/4" in second.stdout


def test_every_infer_protocol_and_torchrun_run_on_a_converted_checkpoint(released, tmp_path):
    """The converted checkpoint through infer.py's classify, rank, zeroshot and karpathy (in
    process, each on files it reads with CLIP's pixel statistics), and train.py --init under
    torchrun with 2 processes: a checkpoint like any other."""
    import os

    import infer
    from PIL import Image

    folder, cfg, _ = released
    ckpt = tmp_path / "coca.pt"
    assert run_script("convert.py", "open_clip", folder / "open_clip_pytorch_model.bin",
                      "--config", folder / "open_clip_config.json", "--bpe", BPE,
                      "--out", ckpt).returncode == 0
    colours = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}
    records = []
    for name, rgb in colours.items():
        (tmp_path / "classes" / name).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40 + 8 * k, 36), rgb).save(tmp_path / "classes" / name / f"{k}.png")
            records.append({"filepath": f"classes/{name}", "filename": f"{k}.png",
                            "split": "test", "sentences": [{"raw": f"a {name} square."}] * 5})
    (tmp_path / "dataset.json").write_text(json.dumps({"images": records}))
    photo = tmp_path / "classes" / "red" / "0.png"
    scores = infer.classify(ckpt, photo, ["red", "green", "blue"])
    assert sorted(r["class"] for r in scores) == ["blue", "green", "red"]
    assert sum(r["probability"] for r in scores) == pytest.approx(1.0, abs=1e-5)
    ranked = infer.rank(ckpt, "a red square", tmp_path / "classes" / "red", top=2)
    assert len(ranked) == 2
    top = infer.zeroshot(ckpt, tmp_path / "classes")
    assert top["images"] == 6 and top["classes"] == 3 and 0 <= top["top1"] <= top["top5"] <= 1
    metrics = infer.karpathy(ckpt, f"karpathy:{tmp_path / 'dataset.json'},{tmp_path}")
    assert metrics["images"] == 6 and {"cider", "r1_mean", "i2t_r1_all"} <= set(metrics)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    lines = [json.dumps({"image": f"classes/{r['filepath'].split('/')[1]}/{r['filename']}",
                         "captions": ["a square."]}) for r in records]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "train.py", "--model", "coca", "--init", str(ckpt), "--data",
         f"jsonl:{tmp_path / 'corpus.jsonl'}", "--batch_size", "2", "--max_steps", "2",
         "--warmup_steps", "1", "--num_workers", "0", "--log_every_s", "0",
         "--out", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "x 2 processes" in done.stdout and "step 2/2" in done.stdout
    assert torch.load(tmp_path / "ddp" / "latest.pt", weights_only=True)["step"] == 2
