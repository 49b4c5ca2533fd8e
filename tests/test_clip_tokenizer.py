"""CLIP's byte-level BPE tokenizer (shared/tokenizer.py, `Tokenizer.from_clip_bpe`) against
open_clip itself, the code that tokenizes for the released CoCa weights.

Kinds: (a) equivalence with open_clip: ids of open_clip.tokenize (77 a row) and of the CoCa
models' tokenizer (76 a row) on a few thousand seeded random texts, decoding, the cleaning
against ftfy; (b) hand-worked ids; (c) the documented differences, each on a named example;
(d) the class's contract: round trips, special ids, padding, errors.

The random texts mix ASCII words, punctuation runs, contractions, digits, mixed case, odd
whitespace, accented Latin, CJK, emoji, Arabic / Cyrillic / Greek, HTML entities and tags,
what ftfy fixes (curly quotes, ligatures, fullwidth forms, controls, terminal escapes), the
special tokens' names, very long texts and empty ones. They avoid only the documented
differences, and `test_random_texts_avoid_only_the_documented_differences` checks that they do.
"""

import gzip
import os
import pickle
import random
import string
import unicodedata

import ftfy
import open_clip
import pytest
import regex
import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from tokenizers import Regex, models, normalizers
from tokenizers import Tokenizer as BackendTokenizer

from shared.tokenizer import (CLIP_CONTEXT_LENGTH, CLIP_NUM_MERGES, COCA_CONTEXT_LENGTH,
                              PYTHON_WHITESPACE_RUN, Tokenizer, clip_byte_alphabet,
                              clip_clean_text, ftfy_fixes, read_clip_merges)

MERGES_FILE = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
START, END = 49406, 49407


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_clip_bpe(MERGES_FILE)


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer(MERGES_FILE)


# --- the random texts ------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "the", "cat", "dog", "sitting", "on", "red", "couch", "man",
         "riding", "horse", "beach", "two", "people", "playing", "frisbee", "in", "park",
         "kitchen", "with", "white", "cabinets", "street", "sign", "next", "to", "pizza",
         "giraffe", "surfboard", "umbrella", "antidisestablishmentarianism", "xqzv", "ok"]
CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "n't", "'S", "'RE", "'Ll", "'x", "'",
                "'ſ"]
PUNCTUATION = [*string.punctuation, "...", "?!", "!?", "--", "!!!", "...!?", "</w>", "«»", "¿",
               "¡", "—", "•", "©", "°", "±"]
NUMBERS = ["0", "7", "42", "2024", "3.14", "1,000", "25%", "$9.99", "1st", "2nd", "١٢٣", "½",
           "²", "Ⅻ", "٣", "१२"]
SPACES = [" ", " ", " ", " ", "  ", "\t", "\n", "\r\n", "\r", " \n\n ", "\u00a0", "\u3000",
          "\u2028", "\u2029", "\x0c", "\x0b", "\u2003", "\u202f", "\x1c", "\x1f", "\x85", ""]
ACCENTED = ["café", "naïve", "Ångström", "über", "façade", "São", "Œuvre", "crème", "brûlée",
            "Zürich", "niño", "Ærø", "łódź", "ça", "déjà", "cafe\u0301", "a\u0308", "ß", "İstanbul",
            "ﬁancé", "Ǆemal", "Ĳssel"]
CJK = ["你好", "世界", "東京タワー", "日本語", "한국어", "카페", "ｶﾀｶﾅ", "ｶﾞ", "ＡＢＣ", "１２３",
       "。", "、", "「引用」", "㈱"]
EMOJI = ["😀", "👍🏽", "🇫🇷", "👨\u200d👩\u200d👧", "❤️", "🐱", "🍕", "✨", "🏳️\u200d🌈"]
SCRIPTS = ["مرحبا", "بالعالم", "Привет", "мир", "Ёлка", "ΟΔΟΣ", "Σοφία", "ΣΑΣ", "שלום", "สวัสดี",
           "नमस्ते", "Ελληνικά", "ǅ", "\u0345", "ᾼ\u0345ι"]
HTML = ["&amp;", "&#39;", "&quot;", "&lt;", "&gt;", "&eacute;", "&EACUTE;", "&nbsp;", "&amp;amp;",
        "&#x27;", "&copy", "&#8220;", "&hellip;", "&amp;quot;", "&#233;", "&notanentity;", "&",
        "<b>", "</b>", "&#769;", "&#133;", "&#1;", "AT&T", "&amp;#8217;", "&#X41;", "&#0;"]
FTFY_FIXES = ["“", "”", "‘", "’", "‚", "‛", "ʼ", "ﬂ", "ﬃ", "ŉ", "\ufeff", "\x00", "\x07", "\x7f",
              "\x1b[31m", "\x1b[0m", "\x1b[1;4m", "\x1b", "\u200b", "\u200d", "\u206a", "\ufffc",
              "ｈｅｌｌｏ", "＂", "\u3000"]
SPECIALS = ["<start_of_text>", "<end_of_text>", "<END_OF_TEXT>", "!<end_of_text>",
            "<start_of_text><end_of_text>", "<ſtart_of_text>", "'<end_of_text>", "x<end_of_text>y"]
KINDS = [(WORDS, 30), (CONTRACTIONS, 4), (PUNCTUATION, 6), (NUMBERS, 4), (ACCENTED, 5), (CJK, 3),
         (EMOJI, 3), (SCRIPTS, 3), (HTML, 4), (FTFY_FIXES, 3), (SPECIALS, 1)]


def reads_as_utf8_lead(char: str) -> bool:
    """A Latin-1 character whose byte starts a UTF-8 sequence ("Ã" is 0xC3, "É" 0xC9)."""
    return 0xC2 <= ord(char) <= 0xF4


def reads_as_utf8_continuation(char: str) -> bool:
    """A character whose Latin-1 or Windows-1252 byte is a UTF-8 continuation byte (0x80..0xBF:
    "©", NBSP, C1 controls, curly quotes, dashes)."""
    for codec in ("latin-1", "cp1252"):
        try:
            byte = char.encode(codec)[0]
        except UnicodeEncodeError:
            continue
        if 0x80 <= byte <= 0xBF:
            return True
    return False


def random_text(rng: random.Random) -> str:
    """A few pieces of the kinds above, in random case, with random whitespace (or none).

    Where a piece or space would put a "continuation" character right after a "lead" one
    (as "É©", bytes C9 A9, which ftfy takes for the UTF-8 of "ɩ" read as Latin-1: mojibake),
    a " " goes between them: so the texts avoid ftfy's mojibake repair. The other documented
    differences are in no pool.
    """
    n = rng.choice([0, 1, 2, 3, 5, 8, 12, 20]) if rng.random() > 0.03 else rng.randint(80, 200)
    pools, weights = zip(*KINDS)
    text = ""
    for _ in range(n):
        piece = rng.choice(rng.choices(pools, weights)[0])
        case = rng.random()
        piece = piece.upper() if case < 0.1 else piece.title() if case < 0.2 else piece
        for part in [piece, rng.choice(SPACES)]:
            last = ftfy.fix_text(text[-32:], fix_encoding=False)[-1:]  # "&EACUTE;" is "É"
            if last and part and reads_as_utf8_lead(last) and reads_as_utf8_continuation(part[0]):
                text += " "
            text += part
    return text


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rng = random.Random(0)
    return ["", " ", "\n\t ", *(random_text(rng) for _ in range(3000))]


# --- the documented differences, as predicates ----------------------------------------------

def mojibake_repaired(text: str) -> bool:
    """Whether ftfy's mojibake repair (fix_encoding), which we do not reproduce, changes it."""
    return ftfy.fix_text(text) != ftfy.fix_text(text, fix_encoding=False)


LIBRARY_LOWERCASE = normalizers.Lowercase()


def newer_than_python_case(char: str) -> bool:
    """A character the library lower-cases and Python's (older) Unicode database does not."""
    return LIBRARY_LOWERCASE.normalize_str(char) != char.lower()


def newer_than_library_letter(char: str, tok: Tokenizer) -> bool:
    """A letter / digit for the regex module (open_clip's pattern engine) that the library's
    engine, with its older Unicode tables, does not know: for it, a run of punctuation goes on
    through the character ("!" + char is one word) instead of stopping before it."""
    known = regex.fullmatch(r"[\p{L}\p{N}]", char) is not None
    return known and len(tok.backend.pre_tokenizer.pre_tokenize_str("!" + char)) == 1


def open_clip_bpe(reference: SimpleTokenizer, cleaned: str) -> list[int]:
    """open_clip's words and BPE on a text that is already cleaned (no ftfy, no unescaping)."""
    ids = []
    for word in regex.findall(reference.pat, cleaned):
        word = "".join(reference.byte_encoder[b] for b in word.encode("utf-8"))
        ids += [reference.encoder[piece] for piece in reference.bpe(word).split(" ")]
    return ids


def test_random_texts_avoid_only_the_documented_differences(texts, tok):
    # The generator draws from fixed pools that contain no documented difference; this checks
    # it, so that no difference the tokenizer does not document hides behind the generator.
    assert [t for t in texts if mojibake_repaired(t)] == []
    chars = set("".join(texts))
    assert [c for c in chars if 0xD800 <= ord(c) < 0xE000] == []  # no surrogates
    assert [c for c in chars if newer_than_python_case(c)] == []
    assert [c for c in chars if newer_than_library_letter(c, tok)] == []
    # ... while covering what ftfy fixes and what open_clip unescapes.
    assert sum(ftfy.fix_text(t) != t for t in texts) > 500
    assert sum("&" in t and "<" not in t for t in texts) > 100
    assert sum("&" in t and "<" in t for t in texts) > 20


# --- (a) equivalence with open_clip ---------------------------------------------------------

def first_mismatches(ours: torch.Tensor, theirs: torch.Tensor, texts: list[str]) -> list:
    rows = (ours != theirs).any(dim=1).nonzero().flatten().tolist()
    return [(texts[b], ours[b].tolist(), theirs[b].tolist()) for b in rows[:3]]


def test_ids_equal_open_clip_tokenize(tok, texts):
    theirs = open_clip.tokenize(texts)  # (B, 77)
    ours = tok.encode_batch(texts, CLIP_CONTEXT_LENGTH, pad_to_max_len=True)
    assert ours.shape == theirs.shape == (len(texts), 77)
    assert torch.equal(ours, theirs), first_mismatches(ours, theirs, texts)
    assert (theirs[:, -1] == END).sum() > 30  # long texts were truncated, keeping the end token


def test_ids_equal_the_coca_models_tokenizer(tok, texts):
    coca = open_clip.get_tokenizer("coca_ViT-B-32")
    assert coca.context_length == COCA_CONTEXT_LENGTH == 76
    theirs = coca(texts)  # (B, 76)
    ours = tok.encode_batch(texts, COCA_CONTEXT_LENGTH, pad_to_max_len=True)
    assert torch.equal(ours, theirs), first_mismatches(ours, theirs, texts)
    # Unpadded, each row is `encode` followed by zeros (the class's own convention).
    short = tok.encode_batch(texts[:50], COCA_CONTEXT_LENGTH)
    T = short.shape[1]
    assert torch.equal(short, theirs[:50, :T]) and (theirs[:50, T:] == 0).all()


def test_pieces_equal_open_clip_untruncated(tok, reference, texts):
    bad = [t for t in texts if tok.encode(t, add_special=False) != reference.encode(t)]
    assert bad == []


def test_cleaning_equals_ftfy_without_its_mojibake_repair(texts):
    lines = ["&amp; one\n", "two &lt;b&gt; &#8220;\r\n", "<b>three</b> &amp;amp; “\n", "&amp;"]
    targeted = ["".join(lines), "".join(lines[::-1]), "&amp;amp;amp;amp;", "\x1b［31ｍred",
                "e&#769;", "<i>e&#769;</i>", "ŉ", "\x91quoted\x92", "&EACUTE;&NTILDE;&AMP;",
                "&#xD800; &#x110000; &#128512;", "a\r\n\r\nb", "&#133;"]
    for text in [*texts, *targeted]:
        assert ftfy_fixes(text) == ftfy.fix_text(text, fix_encoding=False), text


def test_cleaning_cuts_long_lines_where_ftfy_does():
    # ftfy fixes a line in pieces of 10^6 characters, and a "<" turns entity unescaping off
    # from its piece on. Here the first piece has "&lt;" (unescaped), the second the "<".
    text = "&lt;x&gt; " + "a" * (1_000_000 - 10) + "&amp;lt; <"
    assert ftfy_fixes(text) == ftfy.fix_text(text, fix_encoding=False)
    assert ftfy_fixes(text).startswith("<x> a") and ftfy_fixes(text).endswith("a&amp;lt; <")


def test_decoding_equals_open_clip(tok, reference, texts):
    compared = 0
    for text in texts[:500]:
        ids = tok.encode(text)
        if START in ids[1:-1] or END in ids[1:-1]:
            continue  # a special token's name in the text: decode stops at the end token
        assert tok.decode(ids) == reference.decode(ids[1:-1]).strip(), text
        compared += 1
    assert compared > 400
    # Any ids, some of them byte tokens that make broken UTF-8 (decoded as U+FFFD by both).
    rng = random.Random(1)
    for _ in range(300):
        pieces = [rng.randrange(512) if rng.random() < 0.5 else rng.randrange(START)
                  for _ in range(rng.randint(1, 30))]
        pieces[-1] = pieces[-1] or 1  # a trailing 0 is padding for us, "!" for open_clip
        ids = [START, *pieces, END, 0, 0]
        assert tok.decode(ids) == reference.decode(pieces).strip(), pieces
        assert tok.decode_batch([ids]) == [tok.decode(ids)]


# --- (b) hand-worked examples ---------------------------------------------------------------

def test_hand_worked_ids(tok):
    # Ids 0..255 are the bytes in clip_byte_alphabet's order: the 94 visible ASCII characters
    # from "!" (id 0) first, so "a" (0x61) is 0x61 - 0x21 = 64 and "." (0x2E) is 13; "a</w>"
    # (an "a" that ends a word) is 64 + 256 = 320, ".</w>" 269. A merged token is 512 + the
    # rank of the merge that makes it (its 0-based position after the header line):
    # "photo</w>" is 1125 ("pho" + "to</w>", rank 613), "cat</w>" 2368 ("c" + "at</w>", 1856).
    assert tok.encode("a photo of a cat.") == [START, 320, 1125, 539, 320, 2368, 269, END]
    assert tok.tokens("a photo of a cat.") == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                                               ".</w>"]
    merges = read_clip_merges(MERGES_FILE)
    assert merges[1125 - 512] == ("pho", "to</w>") and merges[2368 - 512] == ("c", "at</w>")
    # Cleaning: lower-case, whitespace collapsed. Words: "don" and the contraction "'t"; every
    # digit its own word; a run of punctuation one word ("!?</w>" is a merged token, 6004).
    assert tok.encode("  Don't\t2024!?", add_special=False) == [847, 713, 273, 271, 273, 275, 6004]
    assert tok.tokens("Don't 2024!?") == ["don</w>", "'t</w>", "2</w>", "0</w>", "2</w>", "4</w>",
                                          "!?</w>"]
    # "é" is the UTF-8 bytes C3 A9, shown as "Ã©"; the whole word is one merged token.
    assert tok.tokens("Café") == ["cafÃ©</w>"] and tok.encode("Café", add_special=False) == [15304]
    # ftfy's fixes and HTML entities: curly quotes straightened, "&amp;" unescaped.
    assert tok.encode("“Tom &amp; Jerry”") == tok.encode('"tom & jerry"')


def test_case_insensitive_pattern_details(tok, reference):
    # open_clip's pattern is case-insensitive: "'ſ" (long s) is the contraction "'s", one word
    # ("'" + the bytes C5 BF of "ſ": "'", "Å", "¿</w>"); U+0345 (a combining mark that
    # case-folds to "ι") matches no alternative and is dropped like a space.
    assert tok.tokens("it'ſ") == ["it</w>", "'", "Å", "¿</w>"]
    assert tok.encode("it'ſ") == reference(["it'ſ"])[0, :6].tolist()
    assert tok.encode("a\u0345b", add_special=False) == tok.encode("a b", add_special=False) \
        == reference.encode("a\u0345b") == [320, 321]


def test_exclamation_mark_is_id_0_like_padding(tok, reference):
    # "x!<end_of_text>": words "x", "!<" (a punctuation run swallows the "<", so the name is
    # not read as the special token), "end", "_", "of", "_", "text", ">". "!<" has no merge:
    # "!" (id 0, not word-final) and "<</w>" (283).
    ids = tok.encode("x!<end_of_text>")
    assert ids == [START, 343, 0, 283, 806, 318, 539, 318, 4160, 285, END]
    # Read where a word starts there, the name is the special token, as in open_clip.
    assert tok.encode("x <end_of_text> y") == [START, 343, END, 344, END]
    # decode keeps a 0 that has other ids after it (a "!") and drops the trailing 0s (padding),
    # also without stopping at the end token.
    padded = tok.encode_batch(["x!<end_of_text>"], 16, pad_to_max_len=True)[0]
    assert padded.tolist() == ids + [0] * 5
    expected = reference.decode(ids[1:-1]).strip()
    assert tok.decode(padded) == tok.decode(padded, stop_at_sep=False) == expected
    assert expected == "x !< end _ of _ text >"


def test_byte_alphabet():
    table = clip_byte_alphabet()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert list(table.values())[:3] == ["!", '"', "#"] and table[ord("a")] == "a"
    assert list(table)[188:191] == [0, 1, 2] and table[0] == "\u0100" and table[ord(" ")] == "Ġ"
    assert list(table.items()) == list(bytes_to_unicode().items())  # same pairs, same order


# --- (c) the documented differences ---------------------------------------------------------

def test_known_difference_mojibake_is_not_repaired(tok, reference):
    # "cafÃ©" is "café" encoded as UTF-8 and read as Latin-1. ftfy's fix_encoding guesses that
    # and repairs it; we do not (tokenizer.py, section 3a).
    text = "cafÃ©"
    assert ftfy.fix_text(text) == "café" and ftfy.fix_text(text, fix_encoding=False) == text
    assert mojibake_repaired(text)
    assert tok.encode(text, add_special=False) == open_clip_bpe(reference, "cafã©")
    assert reference.encode(text) == open_clip_bpe(reference, "café") == [15304]
    assert tok.encode(text, add_special=False) != [15304]


def test_known_difference_surrogates_are_refused(tok, reference):
    # A surrogate pair in a str (e.g. from JSON "\ud83d\ude00"): ftfy joins it into "😀", we
    # refuse it as every tokenizer of the module does (not valid UTF-8).
    text = "\ud83d\ude00 smile"
    assert reference.encode(text) == reference.encode("😀 smile")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode(text)


def test_known_difference_case_mappings_newer_than_python(tok, reference):
    # U+1C89 CYRILLIC CAPITAL LETTER TJE (Unicode 16) lower-cases to U+1C8A in the library's
    # tables; Python's str.lower (open_clip's) does so only from Unicode 16 (Python 3.14) on.
    # Written for any versions: the test asserts what each side does with its own tables.
    upper = "\u1c89"
    library = LIBRARY_LOWERCASE.normalize_str(upper)  # "\u1c8a" from Unicode 16 on
    ours = tok.encode(upper, add_special=False)
    assert ours == open_clip_bpe(reference, library)
    assert (reference.encode(upper) == ours) == (upper.lower() == library)
    assert newer_than_python_case(upper) == (upper.lower() != library)


def test_known_difference_letters_newer_than_the_librarys_regex_engine(tok, reference):
    # U+32400, an ideograph of CJK Extension J (Unicode 17): a letter for the regex module that
    # open_clip uses (if it is as new), unknown to the library's engine, for which it is then
    # neither letter nor digit: "a<it>b" is three words here, one word for open_clip.
    # Written for any versions: the test asserts what each side does with its own tables.
    char = "\U00032400"
    text = "a" + char + "b"
    library_letter = len(tok.backend.pre_tokenizer.pre_tokenize_str("!" + char)) == 2
    regex_letter = regex.fullmatch(r"[\p{L}\p{N}]", char) is not None
    ours = tok.encode(text, add_special=False)
    assert ours == open_clip_bpe(reference, text if library_letter else "a " + char + " b")
    assert (reference.encode(text) == ours) == (library_letter == regex_letter)
    assert newer_than_library_letter(char, tok) == (regex_letter and not library_letter)


# --- (d) the class's contract ---------------------------------------------------------------

def test_round_trips_keep_the_ids(tok, texts, tmp_path):
    s = tok.to_str()
    tok.save(tmp_path / "tokenizer.json")
    sample = texts[:500]
    ids = tok.encode_batch(sample, 77)
    for copy in [Tokenizer.from_str(s), Tokenizer.load(tmp_path / "tokenizer.json"),
                 pickle.loads(pickle.dumps(tok))]:
        assert copy.kind == "clip" and copy.to_str() == s
        assert (copy.pad_id, copy.cls_id, copy.sep_id, copy.vocab_size) == (0, START, END, 49408)
        assert torch.equal(copy.encode_batch(sample, 77), ids)
        assert copy.decode_batch(ids) == tok.decode_batch(ids)


def test_special_ids_and_missing_specials(tok):
    assert (tok.kind, tok.pad_id, tok.cls_id, tok.sep_id, tok.vocab_size) == ("clip", 0, START, END,
                                                                           49408)
    assert tok.id_to_token(START) == "<start_of_text>" and tok.id_to_token(0) == "!"
    with pytest.raises(AttributeError, match="unknown"):
        tok.unk_id
    with pytest.raises(AttributeError, match="mask"):
        tok.mask_id
    assert not hasattr(tok, "mask_id")
    assert repr(tok) == "Tokenizer(kind='clip', vocab_size=49408, pad=0, cls=49406, sep=49407)"


def test_the_kind_is_read_from_the_special_tokens():
    neither = BackendTokenizer(models.WordLevel({"[PAD]": 0, "<end_of_text>": 1},
                                                unk_token="[PAD]"))
    with pytest.raises(ValueError, match="<start_of_text>"):
        Tokenizer(neither)  # the message names both kinds' special tokens
    clip_only = BackendTokenizer(models.WordLevel(
        {"!": 0, "<start_of_text>": 1, "<end_of_text>": 2}, unk_token="!"))
    assert Tokenizer(clip_only).kind == "clip"


def test_batches_truncation_and_errors(tok):
    long = "one two three " * 40
    cut = tok.encode(long, max_len=10)
    assert cut == [START, *tok.encode(long, add_special=False)[:8], END]
    batch = tok.encode_batch(["a cat", long, ""], 10)
    assert batch.shape == (3, 10) and batch[2].tolist() == [START, END] + [0] * 8
    assert tok.encode_batch(["a cat"], 10).shape == (1, 4)  # longest row, unless padded
    assert tok.encode_batch(["a cat"], 10, pad_to_max_len=True).shape == (1, 10)
    with pytest.raises(ValueError, match="pad_to_max_len"):
        tok.encode_batch(["a cat"], pad_to_max_len=True)
    with pytest.raises(TypeError):
        tok.encode_batch("a cat")
    with pytest.raises(ValueError, match="max_len"):
        tok.encode("a cat", max_len=1)


def test_merges_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_clip_bpe(tmp_path / "nowhere.txt.gz")
    lines = gzip.open(MERGES_FILE).read().decode("utf-8").split("\n")
    short = tmp_path / "short.txt"
    short.write_text("\n".join(lines[:1000]), encoding="utf-8")
    with pytest.raises(ValueError, match=str(CLIP_NUM_MERGES)):
        Tokenizer.from_clip_bpe(short)
    plain = tmp_path / "merges.txt"  # the same file unzipped reads the same
    plain.write_text("\n".join(lines), encoding="utf-8")
    assert Tokenizer.from_clip_bpe(plain).to_str() == Tokenizer.from_clip_bpe(MERGES_FILE).to_str()


def test_whitespace_class_is_pythons():
    # The normalizer's whitespace runs are exactly the characters str.split() splits on.
    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    marker = "\x00"  # each whitespace character becomes it (its run is only itself here)
    replace = normalizers.Replace(Regex(PYTHON_WHITESPACE_RUN), marker)
    kept = replace.normalize_str("".join(c + "x" for c in everything))
    spaces = {c for c, k in zip(everything, kept[::2]) if k == marker and c != marker}
    assert spaces == {c for c in everything if c.isspace()}


def test_clean_text_is_open_clips_cleaning_up_to_the_whitespace():
    text = "  “Ｈｅｌｌｏ” &amp;amp; ΟΔΟΣ\tﬁ\x1b[1mx  "
    assert clip_clean_text(text) == '  "hello" & οδος\tfix  '
    assert " ".join(clip_clean_text(text).split()) == open_clip.tokenizer._clean_lower(text)
    assert unicodedata.is_normalized("NFC", clip_clean_text("cafe\u0301"))
