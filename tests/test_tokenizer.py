"""The WordPiece tokenizer (shared/tokenizer.py); CLIP's BPE is in tests/test_clip_tokenizer.py.

Kinds: (a) hand-computed expectations: BERT's greedy longest-match-first split of a word over a
vocab.txt we write ourselves, and the truncation rule; (b) equivalence: batch vs single encodes,
to_str/from_str and save/load round trips, the same texts trained in separate processes;
(c) shapes and special tokens: ids, padding, [UNK], lowercasing.
"""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parents[1]

# Captions in the style of the synthetic world, enough for a small WordPiece vocabulary.
CORPUS = [
    "a large red circle to the left of a small blue star",
    "a small green square above a large yellow triangle",
    "there is a blue circle below the red square",
    "a yellow star to the right of a green circle",
    "two small triangles and a large blue square",
    "the red star is above the small green triangle",
    "a large circle left of a small square",
    "three blue stars below a yellow circle",
] * 5
SENTENCE = "a large red circle to the left of a small blue star"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # vocab_size 70 is below the ~85 it takes to make every word whole: some words stay split.
    return Tokenizer.train(CORPUS, vocab_size=70)


# --- special tokens --------------------------------------------------------------------------

def test_trained_special_ids_are_0_to_4_in_order(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert list(SPECIAL_TOKENS) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab_size == 70


def test_encode_wraps_in_cls_and_sep(tok):
    ids = tok.encode(SENTENCE)
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
    assert ids[1:-1] == [tok.token_to_id(p) for p in tok.tokens(SENTENCE)]
    assert tok.encode(SENTENCE, add_special=False) == ids[1:-1]
    assert tok.encode("") == [tok.cls_id, tok.sep_id]


def test_literal_mask_token_in_text_is_the_mask_id(tok):
    assert tok.encode("a [MASK] circle") == [tok.cls_id, *tok.encode("a", add_special=False),
                                             tok.mask_id, *tok.encode("circle", add_special=False),
                                             tok.sep_id]


def test_decode_drops_pad_cls_mask_and_stops_at_first_sep(tok):
    a, circle = tok.encode("a circle", add_special=False)
    ids = [tok.cls_id, a, tok.mask_id, circle, tok.sep_id, a, tok.sep_id, tok.pad_id, tok.pad_id]
    assert tok.decode(ids) == "a circle"
    assert tok.decode(ids, stop_at_sep=False) == "a circle a"  # every [SEP] dropped, reads on
    assert tok.decode(torch.tensor(ids)) == "a circle"  # a (T,) tensor works too


# --- training --------------------------------------------------------------------------------

def test_training_is_deterministic_in_process(tok):
    again = Tokenizer.train(CORPUS, vocab_size=70)
    assert again.to_str() == tok.to_str()


def test_training_is_deterministic_across_processes():
    # The library's own trainer is not (tokenizers issue #1794: ids in hash-map order, which
    # differs per process); the module works around it. Two fresh interpreters must agree.
    script = ("import json, sys; from shared.tokenizer import Tokenizer; "
              "texts = json.loads(sys.stdin.read()); "
              "print(Tokenizer.train(texts, vocab_size=60).to_str())")
    texts = json.dumps(CORPUS + ["unbelievable quadrilaterals"] * 3)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(texts, timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    here = Tokenizer.train(json.loads(texts), vocab_size=60).to_str()
    assert outs[0][0].strip() == outs[1][0].strip() == here


def test_vocab_size_argument_is_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=3)


# --- round trips and normalization -----------------------------------------------------------

def test_round_trip_on_lowercase_sentences_including_split_words(tok):
    split_seen = False
    for sentence in [SENTENCE, *CORPUS[:8]]:
        pieces = tok.tokens(sentence)
        split_seen |= any(p.startswith("##") for p in pieces)
        assert tok.decode(tok.encode(sentence)) == sentence
    assert split_seen, "the small vocabulary should split at least one word into ## pieces"


def test_uppercase_input_is_lowercased(tok):
    assert tok.encode("A LARGE Red CIRCLE") == tok.encode("a large red circle")
    assert tok.decode(tok.encode("A LARGE Red CIRCLE")) == "a large red circle"


def test_unknown_characters_map_to_unk(tok):
    a, circle = tok.encode("a circle", add_special=False)
    # A word of unknown characters is one [UNK]; so is a word with one unknown character in it.
    assert tok.encode("a \u2603 circle") == [tok.cls_id, a, tok.unk_id, circle, tok.sep_id]
    assert tok.encode("a circ\u2603le") == [tok.cls_id, a, tok.unk_id, tok.sep_id]
    assert tok.decode(tok.encode("a \u2603 circle")) == "a [UNK] circle"


# --- truncation and batches ------------------------------------------------------------------

def test_truncation_keeps_the_final_sep(tok):
    full = tok.encode(SENTENCE)
    assert len(full) > 6
    cut = tok.encode(SENTENCE, max_len=6)
    assert len(cut) == 6
    assert cut == [tok.cls_id, *full[1:5], tok.sep_id]  # pieces dropped, [SEP] kept
    assert tok.encode(SENTENCE, max_len=2) == [tok.cls_id, tok.sep_id]
    assert tok.encode(SENTENCE, max_len=len(full)) == full  # exactly fits: unchanged
    assert tok.encode(SENTENCE, max_len=100) == full
    assert tok.encode(SENTENCE, max_len=3, add_special=False) == full[1:4]
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(SENTENCE, max_len=1)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode_batch([SENTENCE], max_len=1)


def test_batch_is_right_padded_with_zero_and_matches_single_encodes(tok):
    texts = [SENTENCE, "a star", "", "THREE blue stars below a yellow circle"]
    for max_len in [None, 8, 40]:
        batch = tok.encode_batch(texts, max_len=max_len)
        singles = [tok.encode(t, max_len=max_len) for t in texts]
        T = max(len(s) for s in singles)
        assert batch.dtype == torch.long and batch.shape == (len(texts), T)
        assert max_len is None or T <= max_len
        for b, single in enumerate(singles):
            assert batch[b, : len(single)].tolist() == single
            assert (batch[b, len(single):] == 0).all()  # right-padded with [PAD] = 0
    assert tok.decode_batch(tok.encode_batch(texts, max_len=40)) == [
        SENTENCE, "a star", "", "three blue stars below a yellow circle"]
    assert tok.encode_batch([], max_len=8).shape == (0, 0)


def test_pad_to_max_len_gives_every_batch_max_len_columns(tok):
    single = tok.encode("a star")
    batch = tok.encode_batch(["a star", ""], max_len=9, pad_to_max_len=True)
    assert batch.shape == (2, 9)
    assert batch[0].tolist() == single + [0] * (9 - len(single))
    assert batch[1].tolist() == [tok.cls_id, tok.sep_id] + [0] * 7
    with pytest.raises(ValueError, match="pad_to_max_len"):
        tok.encode_batch(["a star"], pad_to_max_len=True)  # no max_len to pad to
    assert tok.kind == "bert"


# --- BERT vocab.txt --------------------------------------------------------------------------

# Line 0 [PAD]; lines 1..99 filler; 100..103 the other specials, as in BERT-base-uncased.
BERT_LIKE = (["[PAD]"] + [f"[unused{k}]" for k in range(1, 100)]
             + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
             + ["a", "red", "circle", "un", "unbe", "##believable", "##lie", "##liev", "##able",
                "##a", "."])


def write_vocab(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def test_vocab_file_ids_are_line_numbers(tmp_path):
    tok = Tokenizer.from_vocab_file(write_vocab(tmp_path / "vocab.txt", BERT_LIKE))
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.vocab_size == len(BERT_LIKE)
    for line_number, token in enumerate(BERT_LIKE):
        assert tok.token_to_id(token) == line_number
        assert tok.id_to_token(line_number) == token
    line = BERT_LIKE.index
    assert tok.encode("A red circle.") == [101, line("a"), line("red"), line("circle"), line("."), 102]


def test_vocab_file_splits_words_greedily_longest_match_first(tmp_path):
    tok = Tokenizer.from_vocab_file(write_vocab(tmp_path / "vocab.txt", BERT_LIKE))
    # By hand, "unbelievable": the longest vocabulary prefix is "unbe" (not "un"); the rest,
    # "lievable", starts with "##liev" (longer than "##lie"); then "able" is "##able".
    # Greedy misses the two-piece "un ##believable": BERT's WordPiece never backtracks.
    assert tok.tokens("unbelievable") == ["unbe", "##liev", "##able"]
    assert tok.encode("Unbelievable", add_special=False) == [
        BERT_LIKE.index("unbe"), BERT_LIKE.index("##liev"), BERT_LIKE.index("##able")]
    # "unbelievablx": unbe, ##liev, then "ablx" -> "##a", then "blx" has no piece at all, so the
    # whole word becomes one [UNK] (BERT does not keep the partial split).
    assert tok.tokens("unbelievablx") == ["[UNK]"]
    assert tok.decode(tok.encode("a red unbelievable circle")) == "a red unbelievable circle"


def test_vocab_file_missing_special_token_is_an_error(tmp_path):
    no_mask = [t for t in BERT_LIKE if t != "[MASK]"]
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        Tokenizer.from_vocab_file(write_vocab(tmp_path / "no_mask.txt", no_mask))
    pad_not_first = ["[unused0]"] + BERT_LIKE
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        Tokenizer.from_vocab_file(write_vocab(tmp_path / "pad_second.txt", pad_not_first))
    duplicate = BERT_LIKE + ["red"]
    with pytest.raises(ValueError, match="line numbers"):
        Tokenizer.from_vocab_file(write_vocab(tmp_path / "duplicate.txt", duplicate))


def test_vocab_file_that_does_not_exist_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "vocab.txt"
    with pytest.raises(ValueError, match="nowhere"):
        Tokenizer.from_vocab_file(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.load(missing)


@pytest.mark.parametrize("config, lowercase", [
    ({"do_lower_case": False, "model_max_length": 512}, False),  # bert-base-cased's
    ({"do_lower_case": True}, True),  # bert-base-uncased's
    ({"model_max_length": 512}, True),  # no do_lower_case: BertTokenizer's default
    (None, True)])  # no tokenizer_config.json: a bare vocab.txt
def test_vocab_file_reads_do_lower_case_from_the_tokenizer_config_beside_it(tmp_path, config,
                                                                            lowercase):
    """A Hugging Face BERT folder (train.py --init_bert, or --vocab FOLDER/vocab.txt) says in
    tokenizer_config.json whether its vocabulary is cased: UNITER's bert-base-cased says false.
    An explicit lowercase= wins over the file."""
    tokens = BERT_LIKE + ["Red", "Circle"]
    vocab = write_vocab(tmp_path / "vocab.txt", tokens)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    cased = [tokens.index(t) for t in ("a", "Red", "Circle")]
    uncased = [tokens.index(t) for t in ("a", "red", "circle")]
    tok = Tokenizer.from_vocab_file(vocab)
    assert tok.encode("a Red Circle", add_special=False) == (uncased if lowercase else cased)
    assert Tokenizer.from_str(tok.to_str()).encode("a Red Circle", add_special=False) \
        == (uncased if lowercase else cased)  # the case rule travels in a checkpoint's JSON
    explicit = Tokenizer.from_vocab_file(vocab, lowercase=not lowercase)
    assert explicit.encode("a Red Circle", add_special=False) == (cased if lowercase else uncased)


@pytest.mark.parametrize("text", ['{"do_lower_case": "false"}', "[]", "{not json"])
def test_a_tokenizer_config_that_does_not_say_true_or_false_is_an_error_naming_it(tmp_path, text):
    vocab = write_vocab(tmp_path / "vocab.txt", BERT_LIKE)
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_vocab_file(vocab)
    assert Tokenizer.from_vocab_file(vocab, lowercase=False).vocab_size == len(BERT_LIKE)


# --- serialization ---------------------------------------------------------------------------

TEXTS = [SENTENCE, "UNBELIEVABLE red circles!", "a \u2603 star", ""]


@pytest.mark.parametrize("source", ["trained", "vocab_file"])
def test_to_str_from_str_and_save_load_round_trips(tok, tmp_path, source):
    if source == "vocab_file":
        tok = Tokenizer.from_vocab_file(write_vocab(tmp_path / "vocab.txt", BERT_LIKE))
    s = tok.to_str()
    json.loads(s)  # plain JSON: fits in a torch checkpoint dict as a str
    tok.save(tmp_path / "tokenizer.json")
    for copy in [Tokenizer.from_str(s), Tokenizer.load(tmp_path / "tokenizer.json"),
                 pickle.loads(pickle.dumps(tok))]:  # pickle: DataLoader workers
        assert (copy.pad_id, copy.unk_id, copy.cls_id, copy.sep_id, copy.mask_id, copy.vocab_size) \
            == (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.vocab_size)
        assert [copy.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
        assert torch.equal(copy.encode_batch(TEXTS, max_len=7), tok.encode_batch(TEXTS, max_len=7))
        assert copy.to_str() == s
