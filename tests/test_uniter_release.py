"""UNITER's released weights (ChenRocks/UNITER's state dicts) load into uniter.py.

No network: official-layout state dicts are written here as data (the key names and shapes of
UniterForPretraining / ...ForVisualQuestionAnswering / ...ForImageTextRetrieval for a small
config), with random values. The reference forward is written out here from the official
formulas of [code]'s embedders and heads (the official code: ChenRocks/UNITER) and runs BERT's
layers in transformers.BertModel.
[code: ChenRocks/UNITER model/model.py, layer.py, pretrain.py, vqa.py, itm.py]"""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import convert
import infer
import train
import uniter
from shared.tokenizer import Tokenizer
from shared.world import World, WorldConfig, export_split


D, LAYERS, HEADS, INTER, POSITIONS, FEAT, CLASSES, ANSWERS = 32, 2, 4, 64, 40, 16, 7, 5
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["The", "the", "A", "a", "dog", "Dog", "cat", "man", "woman", "on", "in", "of", "is",
         "red", "Red", "ball", "New", "York", "Paris", "café", "Café", "naïve", "über", "un",
         "##s", "##ing", "##ed", "##er", "##aff", "##able", "##é", "12", "##3", "##45", "中",
         "文", "日", "本", "東", "京"]
CHARS = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
         + list(".,!?;:'\"()-/&%$#@*+=<>[]{}") + list("éèàüöñçÉÜ"))


def write_vocab(path) -> int:
    """A small cased WordPiece vocabulary: specials, words, every char and its ## form."""
    pieces = SPECIALS + WORDS + CHARS + [f"##{c}" for c in CHARS]
    pieces = list(dict.fromkeys(pieces))
    path.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return len(pieces)


def official_state(vocab_size: int, task: str = "pretrain", seed: int = 0) -> dict:
    """[code]'s state dict of one task's model: names and shapes as its modules give them."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def lin(name, out, inp):
        return {f"{name}.weight": r(out, inp), f"{name}.bias": r(out, scale=0.05)}

    def ln(name, n):
        return {f"{name}.weight": 1 + r(n, scale=0.1), f"{name}.bias": r(n, scale=0.1)}

    s = {"uniter.embeddings.word_embeddings.weight": r(vocab_size, D),
         "uniter.embeddings.position_embeddings.weight": r(POSITIONS, D),
         "uniter.embeddings.token_type_embeddings.weight": r(2, D),
         **ln("uniter.embeddings.LayerNorm", D),
         **lin("uniter.img_embeddings.img_linear", D, FEAT),
         **ln("uniter.img_embeddings.img_layer_norm", D),
         **ln("uniter.img_embeddings.pos_layer_norm", D),
         **lin("uniter.img_embeddings.pos_linear", D, 7),
         "uniter.img_embeddings.mask_embedding.weight": r(2, FEAT),
         **ln("uniter.img_embeddings.LayerNorm", D), **lin("uniter.pooler.dense", D, D)}
    for i in range(LAYERS):
        p = f"uniter.encoder.layer.{i}."
        s.update({**lin(p + "attention.self.query", D, D), **lin(p + "attention.self.key", D, D),
                  **lin(p + "attention.self.value", D, D),
                  **lin(p + "attention.output.dense", D, D),
                  **ln(p + "attention.output.LayerNorm", D),
                  **lin(p + "intermediate.dense", INTER, D), **lin(p + "output.dense", D, INTER),
                  **ln(p + "output.LayerNorm", D)})
    if task == "pretrain":
        s.update({**lin("cls.predictions.transform.dense", D, D),
                  **ln("cls.predictions.transform.LayerNorm", D),
                  "cls.predictions.bias": r(vocab_size),
                  "cls.predictions.decoder.weight": s["uniter.embeddings.word_embeddings.weight"],
                  **lin("feat_regress.net.0", D, D), **ln("feat_regress.net.2", D),
                  "feat_regress.weight": s["uniter.img_embeddings.img_linear.weight"],
                  "feat_regress.bias": r(FEAT),
                  **lin("region_classifier.net.0", D, D), **ln("region_classifier.net.2", D),
                  **lin("region_classifier.net.3", CLASSES, D), **lin("itm_output", 2, D)})
    if task == "vqa":
        s.update({**lin("vqa_output.0", 2 * D, D), **ln("vqa_output.2", 2 * D),
                  **lin("vqa_output.3", ANSWERS, 2 * D)})
    if task == "retrieval":
        s.update({**lin("itm_output", 2, D), **lin("rank_output", 1, D)})
    return s


OFFICIAL_CONFIG = {"attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                   "hidden_dropout_prob": 0.1, "hidden_size": D, "initializer_range": 0.02,
                   "intermediate_size": INTER, "max_position_embeddings": POSITIONS,
                   "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
                   "type_vocab_size": 2}


# --- the reference: [code]'s formulas, BERT's layers from transformers --------------------------

class GivenEmbeddings(nn.Module):
    """Stands in for BertModel's embeddings: inputs_embeds are already [code]'s embeddings."""

    def forward(self, inputs_embeds=None, **_):
        return inputs_embeds


def reference_bert(s: dict, heads: int = HEADS) -> nn.Module:
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(s["uniter.embeddings.word_embeddings.weight"]), hidden_size=D,
        num_hidden_layers=LAYERS, num_attention_heads=heads, intermediate_size=INTER,
        max_position_embeddings=POSITIONS, type_vocab_size=2, hidden_act="gelu",
        layer_norm_eps=1e-12, attn_implementation="eager"))
    weights = {k.removeprefix("uniter."): v for k, v in s.items()
               if k.startswith(("uniter.encoder.", "uniter.pooler."))}
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.startswith("embeddings.") for k in missing)
    bert.embeddings = GivenEmbeddings()
    return bert.eval()


def ln(x, s, name):
    return F.layer_norm(x, x.shape[-1:], s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-12)


def lin(x, s, name):
    return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])


def official_embeddings(s, ids, feats, boxes, img_masks=None):
    """UniterTextEmbeddings and UniterImageEmbeddings of one example, [text ; regions]."""
    e = "uniter.embeddings."
    text = (s[e + "word_embeddings.weight"][ids] + s[e + "position_embeddings.weight"][
        torch.arange(len(ids))] + s[e + "token_type_embeddings.weight"][0])
    text = ln(text, s, e + "LayerNorm")
    i = "uniter.img_embeddings."
    if img_masks is not None:  # [code]'s data zeroes a masked feature, its model adds the
        table = s[i + "mask_embedding.weight"].clone()  # row of img_masks, row 0 set to 0
        table[0] = 0
        feats = feats.masked_fill(img_masks[:, None], 0) + table[img_masks.long()]
    image = (ln(lin(feats, s, i + "img_linear"), s, i + "img_layer_norm")
             + ln(lin(boxes, s, i + "pos_linear"), s, i + "pos_layer_norm")
             + s[e + "token_type_embeddings.weight"][1])
    return torch.cat([text, ln(image, s, i + "LayerNorm")])


def inputs(vocab_size, seed=1):
    """Three examples of different text lengths and region counts, padded as ours pads."""
    g = torch.Generator().manual_seed(seed)
    lengths, counts, T, N = [5, 9, 7], [4, 6, 3], 9, 6
    tokens = torch.zeros(3, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(5, vocab_size, (n,), generator=g)
        tokens[b, 0], tokens[b, n - 1] = 2, 3  # [CLS], [SEP]
    features = torch.randn(3, N, FEAT, generator=g).relu()
    corners = torch.rand(3, N, 2, 2, generator=g).sort(dim=2).values  # x1 <= x2, y1 <= y2
    locations = uniter.region_locations(corners.transpose(2, 3).reshape(3, N, 4), 1.0, 1.0)
    region_mask = torch.arange(N)[None] < torch.tensor(counts)[:, None]
    return tokens, features, locations, region_mask, lengths, counts


def reference_outputs(s, tokens, features, locations, lengths, counts, masked=None,
                      heads=HEADS):
    """[code]'s final hidden states of each example (compact: text then regions) and pooled."""
    bert, hidden, pooled = reference_bert(s, heads), [], []
    with torch.no_grad():
        for b, (n, k) in enumerate(zip(lengths, counts)):
            x = official_embeddings(s, tokens[b, :n], features[b, :k], locations[b, :k],
                                    None if masked is None else masked[b, :k])
            out = bert(inputs_embeds=x[None], attention_mask=torch.ones(1, n + k))
            hidden.append(out.last_hidden_state[0])
            pooled.append(out.pooler_output[0])
    return hidden, torch.stack(pooled)


def our_model(config, state):
    model = uniter.build_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def max_gap(model, s, vocab_size, masked=None):
    """The largest |ours - [code]| over every real position's final hidden state and pooled."""
    tokens, features, locations, region_mask, lengths, counts = inputs(vocab_size)
    ref, ref_pooled = reference_outputs(s, tokens, features, locations, lengths, counts, masked,
                                        model.config.heads)
    T = tokens.shape[1]
    with torch.no_grad():
        h = model.encoder(tokens, features, locations, region_mask, masked)
        pooled = model.encoder.pooler(h)
    gaps = [(pooled - ref_pooled).abs().max()]
    for b, (n, k) in enumerate(zip(lengths, counts)):
        ours = torch.cat([h[b, :n], h[b, T:T + k]])
        gaps.append((ours - ref[b]).abs().max())
    return float(max(gaps))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    return path, write_vocab(path)


# --- conversion and parity ------------------------------------------------------------------------

@pytest.mark.parametrize("config_dict", [{}, OFFICIAL_CONFIG])
def test_pretrained_weights_reproduce_the_official_encoder(vocab, config_dict):
    _, V = vocab
    s = official_state(V)
    config, state = uniter.from_uniter(s, config_dict)
    assert (config.task, config.hidden_size, config.layers, config.vocab_size,
            config.feature_dim, config.n_region_classes, config.max_text_len) == (
        "pretrain", D, LAYERS, V, FEAT, CLASSES, POSITIONS)
    assert config.heads == (HEADS if config_dict else 1)  # no config: BERT's 64-wide heads
    assert config.region_branch_norms and config.itm_score == "match_logit"
    model = our_model(config, state)
    assert max_gap(model, s, V) < 1e-5
    masked = torch.zeros(3, 6, dtype=torch.bool)
    masked[:, 1] = masked[0, 2] = True
    assert max_gap(model, s, V, masked) < 1e-5  # MRM's input: [code]'s mask_embedding row 1


def test_pretraining_heads_equal_the_official_formulas(vocab):
    _, V = vocab
    s = official_state(V)
    model = our_model(*uniter.from_uniter(s, {}))
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, D, generator=g)
    with torch.no_grad():
        # ITM [code: pretrain.py itm_output]; MLM [code: layer.py BertLMPredictionHead]
        assert torch.allclose(model.heads["itm"](h), lin(h, s, "itm_output"), atol=1e-6)
        t = ln(F.gelu(lin(h, s, "cls.predictions.transform.dense")), s,
               "cls.predictions.transform.LayerNorm")
        mlm = t @ s["cls.predictions.decoder.weight"].T + s["cls.predictions.bias"]
        ours = model.heads["mlm"](h, model.encoder.text_embeddings.word.weight)
        assert torch.allclose(ours, mlm, atol=1e-5)
        # MRFR, MRC [code: pretrain.py RegionFeatureRegression, RegionClassification]
        t = ln(F.gelu(lin(h, s, "feat_regress.net.0")), s, "feat_regress.net.2")
        mrfr = F.linear(t, s["feat_regress.weight"].T, s["feat_regress.bias"])
        ours = model.heads["mrfr"](h, model.encoder.image_embeddings.feature.weight.t())
        assert torch.allclose(ours, mrfr, atol=1e-5)
        t = ln(F.gelu(lin(h, s, "region_classifier.net.0")), s, "region_classifier.net.2")
        assert torch.allclose(model.heads["mrc"](h), lin(t, s, "region_classifier.net.3"),
                              atol=1e-5)


def test_vqa_weights_give_the_official_answer_logits(vocab):
    _, V = vocab
    s = official_state(V, "vqa")
    answers = [f"ans{i}" for i in range(ANSWERS)]
    config, state = uniter.from_uniter(s, {**OFFICIAL_CONFIG,
                                           "ans2label": {a: i for i, a in enumerate(answers)}})
    assert config.task == "vqa" and config.answers == tuple(answers)
    model = our_model(config, state)
    tokens, features, locations, region_mask, lengths, counts = inputs(V)
    _, pooled = reference_outputs(s, tokens, features, locations, lengths, counts)
    expected = lin(ln(F.gelu(lin(pooled, s, "vqa_output.0")), s, "vqa_output.2"), s,
                   "vqa_output.3")  # [code: vqa.py vqa_output]
    with torch.no_grad():
        ours = model.answer_logits(tokens, features, locations, region_mask)
    assert (ours - expected).abs().max() < 1e-5
    assert uniter.from_uniter(s, {})[0].answers == tuple(f"answer_{i}" for i in range(ANSWERS))


def test_retrieval_weights_give_the_official_rank_scores(vocab):
    _, V = vocab
    s = official_state(V, "retrieval")
    config, state = uniter.from_uniter(s, OFFICIAL_CONFIG)
    assert config.task == "retrieval"
    model = our_model(config, state)
    tokens, features, locations, region_mask, lengths, counts = inputs(V)
    _, pooled = reference_outputs(s, tokens, features, locations, lengths, counts)
    expected = lin(pooled, s, "rank_output")[:, 0]  # [code: itm.py rank_output]
    with torch.no_grad():
        ours = model.match_score(tokens, features, locations, region_mask)
    assert (ours - expected).abs().max() < 1e-5
    # a pre-trained ITM head alone is a retrieval model too: its "match" logit
    s2 = {k: v for k, v in official_state(V).items()
          if k.startswith(("uniter.", "itm_output."))}
    config2, state2 = uniter.from_uniter(s2, OFFICIAL_CONFIG)
    assert config2.task == "retrieval"
    with torch.no_grad():
        ours = our_model(config2, state2).match_score(tokens, features, locations, region_mask)
    _, pooled2 = reference_outputs(s2, tokens, features, locations, lengths, counts)
    assert (ours - lin(pooled2, s2, "itm_output")[:, 1]).abs().max() < 1e-5


def test_old_gamma_beta_names_load_as_weight_and_bias(vocab):
    _, V = vocab
    s = official_state(V)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
           "LayerNorm.beta"): v for k, v in s.items()}
    assert old.keys() != s.keys()
    config, state = uniter.from_uniter(old, {})
    assert max_gap(our_model(config, state), s, V) < 1e-5


# --- each mapping step matters: without it, parity breaks -----------------------------------------

def fresh(config):
    torch.manual_seed(5)
    return uniter.build_model(config).state_dict()


def breaks(model_or_error, s, V) -> bool:
    if isinstance(model_or_error, Exception):
        return True
    masked = torch.zeros(3, 6, dtype=torch.bool)
    masked[:, 0] = True
    return max(max_gap(model_or_error, s, V), max_gap(model_or_error, s, V, masked)) > 1e-3


NAME_STEPS = ["text_embeddings.word", "text_embeddings.position", "text_embeddings.token_type",
              "text_embeddings.norm", "image_embeddings.feature.",
              "image_embeddings.feature_norm", "image_embeddings.location.",
              "image_embeddings.location_norm", "image_embeddings.norm", "attn.q_proj",
              "attn.k_proj", "attn.v_proj", "attn.out_proj", "attn_norm", "mlp.fc1", "mlp.fc2",
              "mlp_norm", "pooler.dense"]


@pytest.mark.parametrize("step", NAME_STEPS)
def test_dropping_a_name_mapping_breaks_parity_and_is_named(vocab, monkeypatch, step):
    """Without one row of the name table the tensors keep their fresh values: parity breaks;
    the converter itself refuses, naming the tensor it could not set."""
    _, V = vocab
    s = official_state(V)
    table = uniter._uniter_names

    def without(layers):
        return {k: v for k, v in table(layers).items() if f".{step}" not in k}
    config, state = uniter.from_uniter(s, {})
    dropped = [k for k in state if f".{step}" in k]
    assert dropped
    init = fresh(config)
    assert breaks(our_model(config, {**state, **{k: init[k] for k in dropped}}), s, V)
    monkeypatch.setattr(uniter, "_uniter_names", without)
    with pytest.raises(ValueError, match="no place for: uniter\\.|no UNITER tensor sets") as e:
        uniter.from_uniter(s, {})
    assert "\n" not in str(e.value)


def test_dropping_the_branch_norms_breaks_parity(vocab, monkeypatch):
    """[code]'s Image Embedder normalises each branch: with the paper's (one LN) the branch
    norms are left over, and the model without them is not [code]'s."""
    _, V = vocab
    s = official_state(V)
    config, state = uniter.from_uniter(s, {})
    plain = dict(state)
    for k in [k for k in plain if "_norm." in k and "image_embeddings" in k]:
        del plain[k]
    import dataclasses
    paper_config = dataclasses.replace(config, region_branch_norms=False)
    assert breaks(our_model(paper_config, plain), s, V)
    real = uniter.uniter_config
    monkeypatch.setattr(uniter, "uniter_config", lambda *a: dataclasses.replace(
        real(*a), region_branch_norms=False))
    with pytest.raises(ValueError, match="no place for: uniter.img_embeddings.img_layer_norm"):
        uniter.from_uniter(s, {})


def test_the_mask_vector_is_row_1_of_mask_embedding(vocab):
    _, V = vocab
    s = official_state(V)
    config, state = uniter.from_uniter(s, {})
    row0 = {**state, "encoder.image_embeddings.mask_vector":
            s["uniter.img_embeddings.mask_embedding.weight"][0]}
    assert breaks(our_model(config, row0), s, V)


def test_the_rank_head_and_match_logit_score_are_needed(vocab, monkeypatch):
    _, V = vocab
    s = official_state(V, "retrieval")
    config, state = uniter.from_uniter(s, OFFICIAL_CONFIG)
    tokens, features, locations, region_mask, lengths, counts = inputs(V)
    _, pooled = reference_outputs(s, tokens, features, locations, lengths, counts)
    expected = lin(pooled, s, "rank_output")[:, 0]

    def gap(config, state):
        with torch.no_grad():
            return float((our_model(config, state).match_score(
                tokens, features, locations, region_mask) - expected).abs().max())
    assert gap(config, state) < 1e-5
    import dataclasses
    assert gap(dataclasses.replace(config, itm_score="log_odds"), state) > 1e-3
    itm_only = {**state, "heads.itm.weight": s["itm_output.weight"],
                "heads.itm.bias": s["itm_output.bias"]}
    assert gap(config, itm_only) > 1e-3


def test_heads_and_tied_copies_are_checked(vocab, monkeypatch):
    _, V = vocab
    s = official_state(V)
    config, state = uniter.from_uniter(s, {})
    init = fresh(config)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(4, D, generator=g)
    for head in ("itm", "mrc"):
        model = our_model(config, {**state, **{k: init[k] for k in state
                                               if k.startswith(f"heads.{head}.")}})
        with torch.no_grad():
            assert not torch.allclose(model.heads[head](h), our_model(config, state).heads[head](h))
    heads = {t: dict(v) for t, v in uniter.UNITER_HEADS.items()}
    del heads["pretrain"]["heads.mlm.bias."]
    monkeypatch.setattr(uniter, "UNITER_HEADS", heads)
    with pytest.raises(ValueError, match="no place for: cls.predictions.bias$"):
        uniter.from_uniter(s, {})
    monkeypatch.undo()
    untied = {**s, "feat_regress.weight": s["feat_regress.weight"] + 1}
    with pytest.raises(ValueError, match="feat_regress.weight differs from uniter.img_embeddings"):
        uniter.from_uniter(untied, {})


# --- leftovers, missing tensors, mismatched configs: one line each --------------------------------

def test_leftover_missing_and_wrong_tensors_are_named_in_one_line(vocab):
    _, V = vocab
    s = official_state(V, "vqa")
    cases = [({**s, "nlvr2_output.weight": torch.zeros(2, D)},
              "no place for: nlvr2_output.weight"),
             ({k: v for k, v in s.items() if k != "uniter.encoder.layer.1.output.dense.bias"},
              "lack uniter.encoder.layer.1.output.dense.bias"),
             ({**s, "uniter.pooler.dense.bias": torch.zeros(D + 1)},
              "wrong shape: encoder.pooler.dense.bias"),
             ({k: v for k, v in s.items() if not k.startswith("vqa_output.")},
              "need one task's heads"),
             ({**s, **official_state(V, "retrieval")}, "found vqa, retrieval")]
    for state, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            uniter.from_uniter(state, {})
        assert "\n" not in str(e.value)
    for config_dict, message in [({"hidden_size": 768}, "hidden_size 768 .the tensors say 32"),
                                 ({"type_vocab_size": 4}, "type_vocab_size 4"),
                                 ({"answers": ["yes"]}, "1 answers given, the VQA head has 5")]:
        with pytest.raises(ValueError, match=message):
            uniter.from_uniter(s, config_dict)


# --- the tokenizer: bert-base-cased's word pieces -------------------------------------------------

def varied_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = (WORDS + CHARS + ["Hello", "WORLD", "naïve", "Ça", "ÉCOLE", "Zoë", "São", "co-op",
                             "don't", "U.S.A.", "3.14", "1,000", "2020", "東京", "中文字",
                             "日本語", "한국어", "Ωmega", "straße", "e\u0301", "\u00a0",
                             "\t", "\n", "  ", "...", "!!", "@user", "#tag", "$5", "50%",
                             "x" * 120, "Ünïcödé", "\u200b", "ﬁ", "½", "™", "🙂", "ʼ"])
    out = []
    for _ in range(n):
        parts = [rng.choice(pool) for _ in range(rng.randint(1, 8))]
        joins = [rng.choice([" ", "", " ", "  ", "\t"]) for _ in parts]
        out.append("".join(j + p for j, p in zip(joins, parts)).strip(" ") or "a")
    return out


def test_cased_word_pieces_equal_transformers(vocab):
    path, _ = vocab
    ours = Tokenizer.from_vocab_file(path, lowercase=False)
    slow = transformers.BertTokenizer(str(path), do_lower_case=False)
    fast = transformers.BertTokenizerFast(str(path), do_lower_case=False)
    texts = varied_strings(3000)
    expected = [slow.encode(t, add_special_tokens=False) for t in texts]
    assert [fast.encode(t, add_special_tokens=False) for t in texts] == expected
    got = [ours.encode(t, add_special=False) for t in texts]
    wrong = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, e.g. {wrong[:3]}"
    assert ours.encode("The Dog", add_special=False) != ours.encode("the dog", add_special=False)


# --- a converted checkpoint: convert.py, infer.py, train.py --init ---------------------------------

@pytest.fixture(scope="module")
def converted(vocab, tmp_path_factory):
    """convert.py on official-layout files: pretrained (retrieval, with its ITM head) and VQA."""
    path, V = vocab
    root = tmp_path_factory.mktemp("release")
    (root / "uniter-small.json").write_text(json.dumps(OFFICIAL_CONFIG))
    out = {}
    for task in ("pretrain", "vqa"):
        weights = root / f"uniter-{task}.pt"
        torch.save(official_state(V, task), weights)
        out[task] = root / f"u-{task}.pt"
        convert.main(["uniter", str(weights), "--config", str(root / "uniter-small.json"),
                      "--vocab", str(path), "--cased", "--out", str(out[task])])
    convert.main(["uniter", str(root / "uniter-pretrain.pt"), "--vocab", str(path), "--cased",
                  "--out", str(root / "u-noconfig.pt")])  # no --config: sizes from the tensors
    out["noconfig"] = root / "u-noconfig.pt"
    return out


def world_files(tmp_path, n=8):
    """The world's test split as Karpathy / VQA v2 files with region files of FEAT-d features."""
    world_config = WorldConfig(image_size=32, n_test=n, feature_dim=FEAT, n_regions=6)
    export_split(World(world_config, "test"), tmp_path, n=n)
    return (str(tmp_path / "dataset_test.json"),
            f"{tmp_path / 'vqa_questions_test.json'},{tmp_path / 'vqa_annotations_test.json'}")


def test_converted_checkpoint_loads_and_is_cased(converted):
    for name in ("pretrain", "noconfig"):
        paper, model, tokenizer, config, run = infer.load(converted[name])
        assert paper is uniter and config.task == "pretrain" and config.feature_dim == FEAT
        assert run["converted_from"].startswith("uniter ")
        assert tokenizer.encode("Dog") != tokenizer.encode("dog")
    assert infer.load(converted["vqa"])[3].task == "vqa"


def test_infer_retrieval_and_vqa_on_region_files(converted, tmp_path):
    split, vqa_spec = world_files(tmp_path)
    metrics = infer.karpathy(converted["pretrain"], split, n=8)
    assert 0 <= metrics["r1_mean"] <= 100
    metrics = infer.vqa(converted["vqa"], vqa_spec, n=4)
    assert metrics["images"] == 4 and 0 <= metrics["vqa_acc"] <= 1


@pytest.mark.parametrize("data", ["regions", "vqa"])
def test_train_fine_tunes_the_converted_checkpoint(converted, tmp_path, data):
    split, vqa_spec = world_files(tmp_path, n=40)  # >= 9 questions an answer (the vocabulary)
    captions = tmp_path / "captions_test.json"  # the world's captions with its region files
    spec = f"vqa:{vqa_spec}" if data == "vqa" else f"regions:{captions}"
    args = ["--model", "uniter", "--task", "vqa", "--init", str(converted["pretrain"]),
            "--data", spec, "--max_steps", "2", "--warmup_steps", "1", "--batch_size", "4",
            "--num_workers", "0", "--log_every_s", "0", "--final_n", "4",
            "--out", str(tmp_path / "run")]
    if data == "regions":
        args[args.index("vqa")] = "retrieval"
    run, paper, overrides = train.parse_args(args)
    lines = []
    train.train(run, paper, overrides, log=lines.append)
    _, model, _, config, _ = infer.load(tmp_path / "run" / "best.pt")
    assert config.feature_dim == FEAT and config.hidden_size == D
    assert np.isfinite([p.detach().sum().item() for p in model.parameters()]).all()
