"""The tokenizers of the four papers, built on the `tokenizers` library: BERT's WordPiece for
all of them, and CLIP's byte-level BPE for CoCa with open_clip's released weights.

The pipeline is BERT's [Devlin et al. 2019, §3; Wu et al. 2016 for WordPiece]:

    text --BertNormalizer--> "a large red circle"     (clean control chars, lowercase, strip accents)
         --BertPreTokenizer--> ["a", "large", ...]    (split on whitespace and punctuation)
         --WordPiece--> ["a", "lar", "##ge", ...]     (greedy longest-match-first; "##" = glued on)
         --ours--> [CLS] pieces [SEP]                  (special tokens added here, in Python)

and back: drop [PAD]/[CLS]/[MASK], stop at [SEP], and the WordPiece decoder glues every "##" piece
onto the piece before it and joins words with single spaces.

Special tokens (one vocabulary for every paper):

    token    id (trained)   id (BERT vocab.txt)   role
    [PAD]    0              0                     padding; always 0, so `tokens != 0` is the mask
    [UNK]    1              100                   a word WordPiece cannot spell
    [CLS]    2              101                   start of every sequence
    [SEP]    3              102                   end of every sequence (and segment separator)
    [MASK]   4              103                   masked-language-modelling target slot

Decoders use [CLS] as the start-of-sequence token and [SEP] as the end-of-sequence token, so one
vocabulary serves every paper:
    * VirTex's [SOS]/[EOS] [VirTex §Method: textual head] -> [CLS]/[SEP]
    * CoCa's start/end tokens of the autoregressive text decoder (the paper names none; its
      captioning loss [CoCa §3.1, Eq. 3] needs them)  -> [CLS]/[SEP]
    * Oscar's and UNITER's [CLS]/[SEP]            -> themselves
    * CoCa's contrastive [CLS] (the token appended to the unimodal text sequence whose output is
      the text embedding [CoCa §3.2, Fig. 2]) is a learned embedding in coca.py, NOT a vocabulary
      token: it is never produced by `encode` and never decoded.

Conventions:
    * `encode` returns `[CLS] pieces [SEP]`; truncating to `max_len` drops pieces from the end but
      KEEPS the final [SEP], so every sequence still ends in end-of-sequence.
    * `encode_batch` right-pads with [PAD] = 0 to the longest row: (B, T), T <= max_len.
    * `decode` returns lowercase words (a cased BERT vocabulary's keep their case) separated by
      single spaces; punctuation is its own word ("left ." not "left."), because the
      pre-tokenizer split it off and we do not guess where it was glued. [UNK] is kept (as the
      literal "[UNK]") so a reader sees what was lost.
    * A tokenizer is stored as the library's JSON (`to_str` / `save`), e.g. inside a checkpoint.
    * Input text is any str that is valid UTF-8, as the library needs; a lone surrogate (e.g. from
      bytes decoded with errors="surrogateescape") is a ValueError naming the text and position,
      a text that is not a str a TypeError. `decode` skips ids outside 0..V-1, negative or huge.

Training (`Tokenizer.train`) uses the library's `WordPieceTrainer`, which builds the vocabulary by
BPE-style pair merges (most frequent pair first) and then reads it as a WordPiece vocabulary.
# DEVIATION: we pre-register the "##x" continuation alphabet because the library's trainer is not
# deterministic across processes (huggingface/tokenizers issue #1794): it gives "##x" tokens ids in
# hash-map order, and those ids break ties between equally frequent merges. Registering them
# ourselves in sorted order makes every id, hence every tie-break, a function of the texts alone.

Note on worker processes: the library encodes batches on several threads; after a fork (DataLoader
workers) it switches that off by itself and may print a warning about TOKENIZERS_PARALLELISM.
Results are the same either way.

CLIP's byte-level BPE (`Tokenizer.from_clip_bpe`), the text side of open_clip's released CoCa
weights (coca_ViT-B-32, coca_ViT-L-14) [Radford et al. 2021, CLIP §2.4; Sennrich et al. 2016 for
BPE; code: open_clip tokenizer.py SimpleTokenizer], reproduced id for id:

    text --clip_clean_text (Python)--> ftfy's fixes, html.unescape twice, lower-case
         --normalizer--> "a photo of a cat."           (whitespace runs -> " ", strip)
         --Split(CLIP's pattern)--> ["a", ..., "cat", "."]   (letter runs, single digits,
                                                        contractions, punctuation runs)
         --ByteLevel--> each word's UTF-8 bytes as printable characters ("é" -> "Ã©")
         --BPE--> ["a</w>", ..., "cat</w>", ".</w>"]   (merges by rank; "</w>" ends a word)
         --ours--> <start_of_text> pieces <end_of_text>

and back: ids -> bytes -> UTF-8, every "</w>" -> " ", stripped ("a photo of a cat .").

    token            id       role
    "!"              0        padding (see below); ids 0..511 are the 256 bytes, then + "</w>"
    <start_of_text>  49406    cls_id: start of every sequence
    <end_of_text>    49407    sep_id: end of every sequence; V = 49408
    (none)                    no unknown token (every byte is one), no mask: unk_id and mask_id
                              raise AttributeError

    * Padding is id 0 although id 0 is the token "!" (a "!" that is not the last character of
      its word, as in "!?"): open_clip pads with 0, and its CoCa text tower masks `tokens == 0`
      as padding [code: open_clip transformer.py TextTransformer._build_additive_mask], so it
      masks such a "!" too. We keep that quirk, so ids and masks match the released weights:
      `encode_batch` pads with 0, and `decode` takes only a row's trailing run of 0s for
      padding (a 0 followed by other ids is a "!").
    * Context lengths: open_clip.tokenize gives 77 ids a row (CLIP_CONTEXT_LENGTH); the CoCa
      models' tokenizer gives 76 (COCA_CONTEXT_LENGTH), the text tower appending its CLS as the
      77th. Both pad every row to that length: `encode_batch(texts, 76, pad_to_max_len=True)`.
      Truncation is the same as BERT's: the end token is kept.
    * A tokenizer's kind is read from its vocabulary: one with <start_of_text> and <end_of_text>
      is CLIP's, so `from_str` of a checkpoint's JSON rebuilds the right one.
    * The DEVIATIONs from open_clip (none in the BPE itself) are listed where they arise, in
      section 3: mojibake and surrogates (section 3a), letters and digits newer than the
      library's Unicode tables (CLIP_WORD_PATTERN), case mappings newer than Python's
      (`_clip_backend`). Every code point, in seven short contexts, was compared with
      open_clip: these are the only differences.
    * Speed: the cleaning runs in Python (a few microseconds a caption), the rest in the library.

Shapes: B batch, T text tokens (with [CLS] and [SEP]), V vocabulary.
"""

import gzip
import html
import html.entities
import json
import re
import struct
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor

# --- 1. Special tokens -----------------------------------------------------------------------

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# The order in which `train` gives them ids 0..4; [PAD] must come first so that pad id = 0.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"  # a piece starting with "##" continues the word before it [BERT]


# --- 2. Building the library pipeline --------------------------------------------------------

def _bert_pipeline(model: models.Model, lowercase: bool = True) -> BackendTokenizer:
    """Wrap a WordPiece model in BERT's normalizer, pre-tokenizer and decoder.

    Args:
        model: a `tokenizers.models.WordPiece` (empty for training, or with a vocabulary).
        lowercase: BERT-uncased's lower-casing and accent stripping; False for a cased
            vocabulary (bert-base-cased, UNITER's), which keeps both.
    Returns:
        a `tokenizers.Tokenizer` with no post-processor: [CLS]/[SEP] are added by `Tokenizer`.
    """
    backend = BackendTokenizer(model)
    # clean_text: drop control chars, map all whitespace to " "; handle_chinese_chars: put spaces
    # around CJK ideographs; strip_accents=None follows `lowercase` (BERT-uncased: strip them).
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on spaces and punctuation
    # cleanup=False: do not glue punctuation back ("left ." stays "left ."); see module docstring.
    backend.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=False)
    return backend


def _backend_from_vocab(vocab: dict[str, int], lowercase: bool = True) -> BackendTokenizer:
    """The full BERT pipeline over a fixed WordPiece vocabulary {token: id}.

    The special tokens are also registered as the library's "special added tokens": they keep
    the ids the vocabulary gives them, and a literal "[MASK]" in the input text is read as the
    [MASK] token rather than split into "[", "mask", "]" (as BERT does).
    """
    model = models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX,
                             max_input_chars_per_word=100)  # BERT: longer words become [UNK]
    backend = _bert_pipeline(model, lowercase)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return backend


def _continuation_alphabet(backend: BackendTokenizer, texts: list[str]) -> list[str]:
    """Every "##c" the trainer will need, sorted: c is any character that is not first in a word.

    Runs the same normalizer and pre-tokenizer as the trainer, so the words are the same ones.
    """
    chars = set()
    for text in texts:
        words = backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
        for word, _span in words:  # [(word, (start, end)), ...]
            chars.update(word[1:])  # the first character is a word start, not a continuation
    return sorted(CONTINUATION_PREFIX + c for c in chars)


def _do_lower_case(config_path: Path) -> bool:
    """`do_lower_case` of a Hugging Face tokenizer_config.json; True if the file or the key is
    absent (BertTokenizer's default). Raises ValueError if the file is not a JSON object or the
    value is not a boolean."""
    if not config_path.is_file():
        return True
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} is not a JSON object")
    value = config.get("do_lower_case", True)
    if not isinstance(value, bool):
        raise ValueError(f"{config_path}: do_lower_case must be true or false, got {value!r}")
    return value


def _check_text(text, where: str) -> None:
    """A str the library can take: UTF-8 encodable. Its own errors name neither the text nor the
    cause (a lone surrogate gives "TextInputSequence must be str")."""
    if not isinstance(text, str):
        raise TypeError(f"{where} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} is not valid UTF-8: lone surrogate {text[e.start]!r} at "
                         f"position {e.start} (decode its bytes with errors='replace')") from None


# --- 3. CLIP's byte-level BPE ----------------------------------------------------------------

CLIP_START, CLIP_END = "<start_of_text>", "<end_of_text>"
CLIP_SPECIAL_TOKENS = (CLIP_START, CLIP_END)  # ids 49406, 49407: the last two of the vocabulary
END_OF_WORD = "</w>"  # glued to a word's last symbol: "a</w>" (a word) != "a" (a word's start)
# CLIP reads only the first 49152 - 256 - 2 merges of its file (which lists 262,144): 256 byte
# tokens + 256 "byte</w>" tokens + 48,894 merges + 2 specials = 49,408 ids
# [code: open_clip tokenizer.py SimpleTokenizer.__init__].
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 2 * 256 + CLIP_NUM_MERGES + len(CLIP_SPECIAL_TOKENS)  # 49408
# open_clip.tokenize's rows: start + up to 75 pieces + end, right-padded with 0.
CLIP_CONTEXT_LENGTH = 77
# open_clip's coca_ViT-B-32 / coca_ViT-L-14 configs set text_cfg.context_length = 76, which is what
# open_clip.get_tokenizer("coca_ViT-B-32") pads and truncates to; the CoCa text tower then appends
# its CLS embedding at position 76, after the padding, so its positional table has 77 rows.
COCA_CONTEXT_LENGTH = 76
# CLIP's word pattern: the two special tokens, the English contractions, a run of letters, ONE
# digit, a run of anything else but whitespace; whitespace matches nothing and is dropped
# [code: open_clip tokenizer.py SimpleTokenizer.pat]. open_clip's is case-insensitive; on
# lower-cased text that changes two things only (all code points checked against the regex
# module): "ſ" (long s) matches "s", written out here as [sſ], and U+0345, see `_clip_backend`.
# (The library's engine runs about 3x slower with its case-insensitive flag.)
CLIP_WORD_PATTERN = (r"<[sſ]tart_of_text>|<end_of_text>|'[sſ]|'t|'re|'ve|'m|'ll|'d"
                     r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+")
# DEVIATION: \p{L} and \p{N} follow each engine's Unicode tables. The library's (tokenizers 0.23)
# stop at Unicode 16; the regex module that open_clip uses may know newer ones (version 2026.12.2
# knows Unicode 17): its 17,480 letters and digits new in Unicode 17 (e.g. U+32400, CJK
# Extension J) are "anything else" here, so "a" + U+32400 + "b" is three words here and one in
# open_clip. Which characters differ depends on both installed versions.
# The characters Python's str.split() splits on (str.isspace: the Unicode White_Space set plus
# the separators U+1C..U+1F), in the library's regex syntax; one run of them becomes one " ".
PYTHON_WHITESPACE_RUN = (r"[\x{9}-\x{d}\x{1c}-\x{20}\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}"
                         r"\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}]+")


def clip_byte_alphabet() -> dict[int, str]:
    """Byte value -> the printable character that stands for it inside CLIP's BPE tokens.

    GPT-2's table, which CLIP reuses [Radford et al. 2019, §2.2; code: open_clip tokenizer.py
    bytes_to_unicode]: the 188 bytes that are visible Latin-1 characters ("!".."~", "¡".."¬",
    "®".."ÿ") stand for themselves; the other 68 (controls, space, NBSP, soft hyphen) take the
    characters U+0100, U+0101, ... in byte order, so no token holds whitespace or a control.

    Returns:
        {byte: char} in CLIP's id order: the k-th entry is token id k (and k + 256 with "</w>").
    """
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in visible}
    hidden = [b for b in range(256) if b not in table]
    table.update({b: chr(0x100 + k) for k, b in enumerate(hidden)})
    return table


def read_clip_merges(path: str | Path) -> list[tuple[str, str]]:
    """CLIP's first 48,894 merges, in rank order, from bpe_simple_vocab_16e6.txt.gz (or the
    same file unzipped): a "#version" line, then one "left right" pair per line.

    Raises:
        FileNotFoundError: no such file. ValueError: fewer merges than CLIP uses, or a line that
            is not two symbols.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP merges file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic number
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")[1: 1 + CLIP_NUM_MERGES]  # line 0 is the header
    merges = [tuple(line.split()) for line in lines]
    bad = [k + 1 for k, pair in enumerate(merges) if len(pair) != 2]
    if len(merges) < CLIP_NUM_MERGES or bad:
        raise ValueError(f"{path}: want {CLIP_NUM_MERGES} merge lines of two symbols after the "
                         f"header, got {len(merges)} lines" + (f", line {bad[0]} is not a pair"
                                                               if bad else ""))
    return merges


# --- 3a. ftfy's deterministic fixes, which open_clip applies before anything else ---
#
# open_clip cleans every text as ftfy.fix_text -> html.unescape twice -> strip -> collapse
# whitespace -> lower [code: open_clip tokenizer.py basic_clean, whitespace_clean]. ftfy.fix_text
# (version 6) [code: ftfy __init__.py fix_text, fix_and_explain; ftfy fixes.py; ftfy chardata.py]:
#   * cuts the text after every "\n" (and every 10^6 characters within a line) into segments;
#     from the first segment that contains "<" on, HTML entities are left alone ("auto" mode:
#     such text is taken for HTML);
#   * fixes each segment by repeating, until nothing changes: unescape HTML entities (only
#     "&name;" / "&#n;" forms with the semicolon, plus all-caps names like "&EACUTE;");
#     repair mojibake (fix_encoding); C1 controls U+80..U+9F -> their Windows-1252 characters;
#     Latin ligatures -> letters; fullwidth / halfwidth forms -> normal width; curly quotes ->
#     straight; CR, CRLF, U+2028, U+2029, U+85 -> "\n"; surrogates -> characters; ANSI terminal
#     escapes removed; control characters removed; NFC.
# We do all of that but the mojibake repair, in the same order, in `ftfy_fixes`.
# DEVIATION: mojibake repair (ftfy's fix_encoding) is a statistical guess over code pages, not
# reproduced: text that is UTF-8 read as Latin-1 / Windows-1252 stays as it is here ("cafÃ©" is
# tokenized as "cafã©" here, as "café" by open_clip). The guess can also fire on text that only
# looks like that: an accented Latin-1 capital right before "©", NBSP, a curly quote or a C1
# control ("É©" is the bytes C9 A9, the UTF-8 of "ɩ"); such text differs too.
# DEVIATION: surrogates: ftfy joins a surrogate pair and turns a lone one into U+FFFD; here, as
# for every tokenizer of this module, a str with surrogates is not valid UTF-8: a ValueError.

_SEGMENT_CHARS = 1_000_000  # ftfy's max_decode_length
_ENTITY = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_ESCAPE = re.compile(r"\x1b\[(?:\d|;)*[a-zA-Z]")  # \d: any Unicode digit, as ftfy's
_LIGATURES = {  # Latin ligatures and digraphs ftfy splits (it keeps other scripts' ligatures)
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž",
    "ǆ": "dž", "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj", "ﬀ": "ff",
    "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st"}
# Removed: C0 controls but tab, LF, form feed and CR; DEL; deprecated Arabic format controls;
# the BOM; interlinear annotation marks and the object replacement character.
_CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])


def _windows_1252(b: int) -> str:
    """The Windows-1252 character of byte b; the five bytes Windows-1252 leaves undefined
    (0x81, 0x8D, 0x8F, 0x90, 0x9D) keep their Latin-1 character, as ftfy's "sloppy" codec."""
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return chr(b)


def _character_fixes() -> dict[int, str]:
    """ftfy's four one-character fixes, applied in its order, as one str.translate table:
    C1 control -> Windows-1252, ligature -> letters, fullwidth / halfwidth -> normal width (each
    form's NFKC, and U+3000 ideographic space -> " "), curly quote -> straight. A character
    that is not a key of any step passes all four unchanged, so the keys' union is enough."""
    c1 = {b: _windows_1252(b) for b in range(0x80, 0xA0)}
    ligatures = {ord(k): v for k, v in _LIGATURES.items()}
    width = {0x3000: " "} | {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                             if unicodedata.normalize("NFKC", chr(i)) != chr(i)}
    quotes = {0x02BC: "'", **dict.fromkeys(range(0x2018, 0x201C), "'"),
              **dict.fromkeys(range(0x201C, 0x2020), '"')}
    steps = [c1, ligatures, width, quotes]
    table = {}
    for code in set().union(*steps):
        text = chr(code)
        for step in steps:
            text = text.translate(step)
        if text != chr(code):
            table[code] = text
    return table


def _html_entities() -> dict[str, str]:
    """"&name;" -> character for every HTML5 entity written with its semicolon, plus the
    all-caps spelling of each lower-case name that is not an entity itself ("&EACUTE;" -> "É")."""
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            upper = "&" + name.upper()
            if name == name.lower() and html.unescape(upper) == upper:
                table[upper] = char.upper()
    return table


_CHARACTER_FIXES = _character_fixes()
_HTML_ENTITIES = _html_entities()


def _unescape_entity(match: re.Match) -> str:
    """One "&...;" -> its character; a numeric one only if html.unescape reads all of it."""
    entity = match.group(0)
    if entity in _HTML_ENTITIES:
        return _HTML_ENTITIES[entity]
    if entity.startswith("&#"):
        char = html.unescape(entity)
        return entity if ";" in char else char
    return entity


def _fix_segment(text: str, unescape: bool) -> str:
    """One ftfy segment: every fix but the mojibake repair, repeated until nothing changes."""
    while True:
        before = text
        if unescape and "&" in text:
            text = _ENTITY.sub(_unescape_entity, text)
        text = text.translate(_CHARACTER_FIXES)
        text = (text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
                .replace("\u2029", "\n").replace("\x85", "\n"))
        if "\x1b" in text:
            text = _ANSI_ESCAPE.sub("", text)
        text = unicodedata.normalize("NFC", text.translate(_CONTROL_CHARS))
        if text == before:
            return text


def ftfy_fixes(text: str) -> str:
    """ftfy.fix_text(text) without its mojibake repair (see the DEVIATIONs above)."""
    if "\n" not in text and len(text) <= _SEGMENT_CHARS:  # one segment: the usual caption
        return _fix_segment(text, unescape="<" not in text)
    out, start, unescape = [], 0, True
    while start < len(text):
        end = text.find("\n", start) + 1 or len(text)  # just after the "\n"
        end = min(end, start + _SEGMENT_CHARS)
        segment = text[start:end]
        unescape = unescape and "<" not in segment  # off for good from the first "<"
        out.append(_fix_segment(segment, unescape))
        start = end
    return "".join(out)


def clip_clean_text(text: str) -> str:
    """open_clip's cleaning up to the whitespace: ftfy's fixes, html.unescape twice, lower-case.

    The rest (whitespace runs -> " ", strip) is the library normalizer's. Lower-casing happens
    here, with Python's str.lower, because the library lower-cases one character at a time and
    so misses the final-sigma rule ("ΟΔΟΣ" -> "οδος" in Python, "οδοσ" in the library).
    """
    return html.unescape(html.unescape(ftfy_fixes(text))).lower()


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> BackendTokenizer:
    """CLIP's pipeline in the library, run after `clip_clean_text` has run in Python.

    Args:
        vocab: {token: id}, the 49,408 tokens. merges: the 48,894 pairs in rank order.
    Returns:
        a `tokenizers.Tokenizer` with no post-processor: the specials are added by `Tokenizer`.
    """
    model = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD,
                       fuse_unk=False)  # no unk_token: every byte is a token
    backend = BackendTokenizer(model)
    # The normalizer lower-cases once more, so that the stored JSON is a CLIP tokenizer on its own.
    # DEVIATION: that is a no-op on str.lower's output except for characters whose case mapping
    # is newer than Python's Unicode database: 55 code points under Python 3.11 (Unicode 14),
    # e.g. U+1C89 CYRILLIC CAPITAL LETTER TJE -> U+1C8A here, kept upper-case by open_clip there.
    # U+0345 COMBINING GREEK YPOGEGRAMMENI -> " ": open_clip's case-insensitive pattern matches
    # it with no alternative (it is no letter, but it case-folds to the letter "ι", which keeps
    # it out of the class "anything else"), so open_clip drops it as it drops a space.
    backend.normalizer = normalizers.Sequence([
        normalizers.Replace("\u0345", " "),
        normalizers.Replace(Regex(PYTHON_WHITESPACE_RUN), " "), normalizers.Strip(),
        normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        # invert=True: the pattern's matches are the words, everything between them is dropped
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        # each word's UTF-8 bytes -> clip_byte_alphabet characters (the same table as GPT-2's)
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    # ids -> characters -> bytes -> UTF-8 (a broken sequence -> U+FFFD, as open_clip's
    # errors="replace"), then every "</w>" -> " " [code: open_clip tokenizer.py decode].
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " ")])
    # normalized=True: matched after lower-casing, like open_clip's case-insensitive pattern.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=True)
                                for t in CLIP_SPECIAL_TOKENS])
    return backend


@lru_cache(maxsize=1)
def _clip_word_splitter() -> pre_tokenizers.PreTokenizer:
    """CLIP's word pattern alone (no byte mapping), for texts that name a special token."""
    return pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True)


# --- 3b. VirTex's SentencePiece BPE ------------------------------------------------------------
# VirTex's vocabulary (coco_10k.model) is a SentencePiece BPE model trained on COCO captions
# [VirTex §Implementation; code: kdexd/virtex scripts/build_vocabulary.py]: ids 0..3 are <unk>,
# [SOS], [EOS], [MASK] (SentencePiece's own <s> and </s> switched off, the other three added as
# control symbols), then 9,996 pieces, "▁" marking a word's start. Its pipeline, rebuilt here in
# the library so that ids equal SentencePiece's own:
#
#     text --virtex_normalize (Python)--> lower-case, NFKD, combining marks dropped
#                                         [code: kdexd/virtex v1.0 transforms.py NormalizeCaption]
#          --Precompiled--> the model's own character map (NFKC and SentencePiece's rules)
#          --Replace, Strip--> runs of spaces -> one, none at either end
#          --Metaspace--> "▁a▁dog" split before every "▁" (SentencePiece's dummy prefix)
#          --BPE--> pieces: adjacent symbols merged, the merge whose result has the highest
#                   score first; a run of unknown characters is one <unk>, as in SentencePiece
#          --ours--> [SOS] pieces [EOS]
#
#   * Padding is id 0, which is <unk>: the official code pads with its unknown token
#     [code: kdexd/virtex factories.py, padding_idx = UNK_INDEX]. We keep that quirk so that the
#     released weights see the ids they were trained on: an unknown word inside a caption is
#     masked as a pad would be, and `decode` drops it.
#   * The control symbols are in the vocabulary but never produced from text: "[SOS]" typed in
#     a caption is spelled with ordinary pieces, as SentencePiece does.

SPM_UNK, SOS, EOS = "<unk>", "[SOS]", "[EOS]"
VIRTEX_SPECIAL_TOKENS = (SPM_UNK, SOS, EOS, MASK)  # ids 0..3 of VirTex's coco_10k.model
SPM_SPACE = "\u2581"  # "▁", SentencePiece's word-start mark
# SentencePiece's piece types [SentencePiece sentencepiece_model.proto, ModelProto.SentencePiece]
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6


def virtex_normalize(text: str) -> str:
    """VirTex's caption normalisation, applied before SentencePiece: lower-case, NFKD, and every
    character with a non-zero combining class dropped (accents)."""
    text = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in text if not unicodedata.combining(c))


def _proto_fields(buf: bytes):
    """(field number, value) of a serialised protobuf message's top-level fields: an int for a
    varint, bytes for a length-delimited field or a fixed 32/64-bit one (the wire format)."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = buf[i]
            value, shift, i = value | (b & 0x7F) << shift, shift + 7, i + 1
            if b < 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(i)
        elif wire in (1, 5):  # fixed 64 / 32 bits
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = varint(i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, value


def read_sentencepiece_model(path: str | Path) -> dict:
    """The parts of a SentencePiece .model file (a serialised ModelProto) that encoding needs:
    {"pieces": [(piece, score, type)] in id order, "model_type": 1 unigram / 2 BPE / ...,
    "byte_fallback", "charsmap": the normaliser's precompiled map, "add_dummy_prefix",
    "remove_extra_whitespaces", "escape_whitespaces"}. Field numbers and defaults are those of
    sentencepiece_model.proto; read directly, so neither sentencepiece nor protobuf is needed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SentencePiece model {path} does not exist")
    out = {"pieces": [], "model_type": 1, "byte_fallback": False, "charsmap": b"",
           "add_dummy_prefix": True, "remove_extra_whitespaces": True, "escape_whitespaces": True}
    try:
        for field, value in _proto_fields(path.read_bytes()):
            if field == 1:  # ModelProto.pieces
                piece = {1: b"", 2: b"\0\0\0\0", 3: SPM_NORMAL} | dict(_proto_fields(value))
                out["pieces"].append((piece[1].decode("utf-8"),
                                      struct.unpack("<f", piece[2])[0], piece[3]))
            elif field == 2:  # TrainerSpec: model_type = 3, byte_fallback = 35
                spec = dict(_proto_fields(value))
                out["model_type"] = spec.get(3, 1)
                out["byte_fallback"] = bool(spec.get(35, 0))
            elif field == 3:  # NormalizerSpec: charsmap 2, dummy prefix 3, whitespace 4, 5
                spec = dict(_proto_fields(value))
                out["charsmap"] = spec.get(2, b"")
                for number, name in ((3, "add_dummy_prefix"), (4, "remove_extra_whitespaces"),
                                     (5, "escape_whitespaces")):
                    out[name] = bool(spec.get(number, 1))
    except (IndexError, UnicodeDecodeError, ValueError, struct.error, TypeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
    if not out["pieces"]:
        raise ValueError(f"{path}: not a SentencePiece model (no pieces)")
    return out


def _sentencepiece_backend(spm: dict) -> BackendTokenizer:
    """A library tokenizer that encodes as SentencePiece's BPE does (section 3b's pipeline).

    SentencePiece's BPE merges, at each step, the adjacent pair whose concatenation is the
    piece of highest score; the library's BPE takes a ranked list of pairs instead. The list is
    every split (a, b) of every normal piece into two normal pieces, ranked by the merged
    piece's score (then id): whichever split the current symbols form, the merge that makes a
    piece has that piece's rank."""
    vocab, score, mergeable = {}, {}, set()
    for i, (piece, s, kind) in enumerate(spm["pieces"]):
        vocab[piece], score[piece] = i, s
        if kind in (SPM_NORMAL, SPM_USER_DEFINED):
            mergeable.add(piece)
    ranked = []
    for piece in mergeable:
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((-score[piece], vocab[piece], k, (left, right)))
    merges = [pair for *_, pair in sorted(ranked)]
    unk = next(p for p, _, kind in spm["pieces"] if kind == SPM_UNKNOWN)
    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True))
    steps = [normalizers.Precompiled(spm["charsmap"])] if spm["charsmap"] else []
    steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement=SPM_SPACE, prepend_scheme="always")
    return backend


# --- 4. The tokenizer ------------------------------------------------------------------------

class Tokenizer:
    """BERT WordPiece or CLIP byte-level BPE tokenizer: text <-> list of ids / (B, T) LongTensor.

    Build one with `Tokenizer.train(texts)`, `Tokenizer.from_vocab_file("vocab.txt")`,
    `Tokenizer.from_clip_bpe("bpe_simple_vocab_16e6.txt.gz")`,
    `Tokenizer.from_sentencepiece("coco_10k.model")`, `Tokenizer.from_str(json)` or
    `Tokenizer.load("tokenizer.json")`.

    Attributes:
        backend: the `tokenizers.Tokenizer` that normalizes, splits and looks pieces up.
        kind: "bert", "clip" or "sentencepiece" (VirTex's), read from the vocabulary's
            special tokens.
    """

    def __init__(self, backend: BackendTokenizer):
        """Wrap a library tokenizer: a CLIP one if it has <start_of_text> and <end_of_text> (and
        not BERT's five special tokens), else a BERT one, which must have the five special
        tokens and [PAD] = 0.

        Raises:
            ValueError: (BERT) if a special token is missing or [PAD] is not id 0.
        """
        self.backend = backend
        clip = all(backend.token_to_id(t) is not None for t in CLIP_SPECIAL_TOKENS)
        bert = all(backend.token_to_id(t) is not None for t in SPECIAL_TOKENS)
        if clip and not bert:
            self.kind = "clip"
            self._pad_id = 0  # the token "!", used as padding by open_clip (module docstring)
            self._unk_id = self._mask_id = None  # CLIP's BPE has neither
            self._cls_id = backend.token_to_id(CLIP_START)
            self._sep_id = backend.token_to_id(CLIP_END)
            return
        if not bert and all(backend.token_to_id(t) is not None for t in VIRTEX_SPECIAL_TOKENS):
            self.kind = "sentencepiece"  # VirTex's SentencePiece BPE (section 3b)
            self._pad_id = self._unk_id = backend.token_to_id(SPM_UNK)  # 0: pads are <unk>
            self._cls_id = backend.token_to_id(SOS)
            self._sep_id = backend.token_to_id(EOS)
            self._mask_id = backend.token_to_id(MASK)
            return
        self.kind = "bert"
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the special token(s) {missing}; "
                             f"it needs all of {list(SPECIAL_TOKENS)} (BERT) or of "
                             f"{list(CLIP_SPECIAL_TOKENS)} (CLIP)")
        if backend.token_to_id(PAD) != 0:
            raise ValueError(f"{PAD} must be id 0 (padding is `tokens == 0` everywhere), "
                             f"got id {backend.token_to_id(PAD)}")
        # Plain ints, read once: the ids never change after construction.
        self._pad_id = backend.token_to_id(PAD)
        self._unk_id = backend.token_to_id(UNK)
        self._cls_id = backend.token_to_id(CLS)
        self._sep_id = backend.token_to_id(SEP)
        self._mask_id = backend.token_to_id(MASK)

    # --- construction ---

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1) -> "Tokenizer":
        """Learn a WordPiece vocabulary from texts; ids 0..4 are [PAD], [UNK], [CLS], [SEP], [MASK].

        Deterministic: the same texts (in the same order) give the same vocabulary and ids, in
        any process. The vocabulary can come out smaller than `vocab_size` when the texts have
        fewer distinct pieces than that (every word already a single token).

        Args:
            texts: the training corpus, e.g. every caption of the synthetic world's train split.
            vocab_size: the most tokens, specials and single characters included; but every
                character of the texts (and its "##" form) is always kept, so texts with a
                larger alphabet give a larger vocabulary: read the result's `vocab_size`.
            min_frequency: a pair must occur at least this often to be merged into a new piece.
        Returns:
            the trained Tokenizer.
        Raises:
            ValueError: vocab_size below the 5 special tokens, or a text that is not valid UTF-8
                (named, texts[k]); TypeError for a text that is not a str.
        """
        if vocab_size < len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS)} (the special "
                             f"tokens), got {vocab_size}")
        texts = list(texts)  # read twice below (alphabet, then training)
        for k, text in enumerate(texts):
            _check_text(text, f"texts[{k}]")
        empty = models.WordPiece(unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX)
        scratch = _bert_pipeline(empty)
        # DEVIATION (see module docstring): "##c" tokens listed after the specials so that their
        # ids are fixed by sorting instead of by hash-map order (tokenizers issue #1794).
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS) + _continuation_alphabet(scratch, texts),
            continuing_subword_prefix=CONTINUATION_PREFIX, show_progress=False)
        scratch.train_from_iterator(texts, trainer=trainer)
        # Rebuild from the learned {token: id} alone, so only the five real specials are
        # registered as special (the "##c" tokens were listed as "special" only to fix their ids).
        vocab = scratch.get_vocab(with_added_tokens=False)  # {token: id}, ids 0..V-1
        return cls(_backend_from_vocab(vocab))

    @classmethod
    def from_vocab_file(cls, path: str | Path, lowercase: bool | None = None) -> "Tokenizer":
        """Load a BERT `vocab.txt`: one token per line, id = line number (0-based).

        BERT-base-uncased's file has [PAD] = 0, [UNK] = 100, [CLS] = 101, [SEP] = 102,
        [MASK] = 103; any file with the five specials and [PAD] on line 0 works.

        Args:
            path: the vocab.txt file.
            lowercase: True for an uncased vocabulary (lower-case, strip accents, as
                BERT-base-uncased's tokenizer); False for a cased one (bert-base-cased, which
                UNITER starts from). None (the default): the `do_lower_case` of a
                `tokenizer_config.json` beside the file, as a Hugging Face BERT folder has
                (bert-base-cased's says false), so `train.py --init_bert FOLDER` and `--vocab
                FOLDER/vocab.txt` read a cased checkpoint cased; True where there is no such
                file or it does not say (Hugging Face's BertTokenizer default too).
        Returns:
            a Tokenizer whose ids are the file's line numbers.
        Raises:
            ValueError: the file does not exist, a token appears twice (ids could not equal line
                numbers), a special token is missing, [PAD] is not on line 0, or the
                tokenizer_config.json beside it is not a JSON object with a boolean (or no)
                do_lower_case.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"BERT vocab file {path} does not exist")
        if lowercase is None:
            lowercase = _do_lower_case(path.parent / "tokenizer_config.json")
        # Read as BERT's own loader does: universal newlines, strip only the line break.
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        vocab: dict[str, int] = {}
        for line_number, token in enumerate(tokens):
            if token in vocab:
                raise ValueError(f"{path}: token {token!r} appears on lines {vocab[token]} and "
                                 f"{line_number}; ids must equal line numbers")
            vocab[token] = line_number
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks the special token(s) {missing}")
        if vocab[PAD] != 0:
            raise ValueError(f"{path}: {PAD} must be on the first line (id 0), found on line "
                             f"{vocab[PAD]}")
        return cls(_backend_from_vocab(vocab, lowercase))

    @classmethod
    def from_clip_bpe(cls, path: str | Path) -> "Tokenizer":
        """CLIP's tokenizer, as open_clip's CoCa weights expect it, from CLIP's merges file.

        The file is bpe_simple_vocab_16e6.txt.gz, shipped inside the open_clip package (next to
        its tokenizer.py) and in OpenAI's CLIP repository; gzipped or not.

        Args:
            path: the merges file.
        Returns:
            a Tokenizer of kind "clip": 49,408 ids, cls_id 49406 (<start_of_text>), sep_id
            49407 (<end_of_text>), pad_id 0. `encode_batch(texts, CLIP_CONTEXT_LENGTH,
            pad_to_max_len=True)` equals open_clip.tokenize(texts), and with COCA_CONTEXT_LENGTH
            open_clip.get_tokenizer("coca_ViT-B-32")(texts) (but the DEVIATIONs above).
        Raises:
            FileNotFoundError: no such file. ValueError: not a CLIP merges file.
        """
        merges = read_clip_merges(path)
        alphabet = list(clip_byte_alphabet().values())  # ids 0..255
        tokens = [*alphabet, *(c + END_OF_WORD for c in alphabet),  # 256..511
                  *("".join(pair) for pair in merges), *CLIP_SPECIAL_TOKENS]  # 512..49405, 49406-7
        vocab = {token: i for i, token in enumerate(tokens)}
        if len(vocab) != CLIP_VOCAB_SIZE:
            raise ValueError(f"{path}: the merges give {len(vocab)} distinct tokens, CLIP has "
                             f"{CLIP_VOCAB_SIZE}")
        return cls(_clip_backend(vocab, merges))

    @classmethod
    def from_sentencepiece(cls, path: str | Path) -> "Tokenizer":
        """VirTex's tokenizer, as its released weights expect it, from its SentencePiece BPE
        model (coco_10k.model) [code: kdexd/virtex data/tokenizers.py SentencePieceBPETokenizer].

        The .model file is read directly (read_sentencepiece_model): the sentencepiece package
        is not needed.

        Args:
            path: the .model file.
        Returns:
            a Tokenizer of kind "sentencepiece" (section 3b): cls_id = [SOS] (1), sep_id = [EOS] (2),
            mask_id = [MASK] (3), pad_id = unk_id = <unk> (0); the ids of `encode(text)`
            between [SOS] and [EOS] are SentencePiece's EncodeAsIds(virtex_normalize(text)).
        Raises:
            FileNotFoundError: no such file. ValueError: not a SentencePiece BPE model, or one
                without VirTex's special tokens.
        """
        spm = read_sentencepiece_model(path)
        if spm["model_type"] != 2 or spm["byte_fallback"]:
            raise ValueError(f"{path}: a SentencePiece model of type {spm['model_type']}"
                             f"{' with byte fallback' if spm['byte_fallback'] else ''}; "
                             f"VirTex's is BPE (type 2) without byte fallback")
        if not (spm["add_dummy_prefix"] and spm["remove_extra_whitespaces"]
                and spm["escape_whitespaces"]):
            raise ValueError(f"{path}: non-default SentencePiece whitespace handling")
        pieces = [p for p, _, _ in spm["pieces"]]
        missing = [t for t in VIRTEX_SPECIAL_TOKENS if t not in pieces]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks VirTex's special token(s) {missing}")
        if len(set(pieces)) != len(pieces):
            raise ValueError(f"{path}: a piece appears twice")
        return cls(_sentencepiece_backend(spm))

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        """Rebuild from `to_str()`'s JSON (e.g. `Tokenizer.from_str(checkpoint["tokenizer"])`);
        the kind (BERT or CLIP) is read from the special tokens in it."""
        return cls(BackendTokenizer.from_str(s))

    def to_str(self) -> str:
        """The whole tokenizer (pipeline and vocabulary) as a JSON string, for a checkpoint dict."""
        return self.backend.to_str()

    def save(self, path: str | Path) -> None:
        """Write the JSON of `to_str` to a tokenizer.json file."""
        self.backend.save(str(path), pretty=True)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a tokenizer.json written by `save`.

        Raises:
            FileNotFoundError: the file does not exist (the message names it).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(BackendTokenizer.from_file(str(path)))

    # --- the special ids and the vocabulary ---

    @property
    def pad_id(self) -> int:
        """[PAD], always 0 (for CLIP the token "!", see the module docstring)."""
        return self._pad_id

    @property
    def unk_id(self) -> int:
        """[UNK], a word WordPiece cannot spell. AttributeError for CLIP, which has none."""
        return self._special_or_raise(self._unk_id, "unknown token (every byte is a token)")

    @property
    def cls_id(self) -> int:
        """[CLS] / <start_of_text>, the first token of every sequence; the decoders' start."""
        return self._cls_id

    @property
    def sep_id(self) -> int:
        """[SEP] / <end_of_text>, the last token of every sequence; the decoders' end."""
        return self._sep_id

    @property
    def mask_id(self) -> int:
        """[MASK], the masked-language-modelling slot. AttributeError for CLIP, which has none."""
        return self._special_or_raise(self._mask_id, "mask token (CLIP's text encoder was "
                                                     "never trained to fill masks)")

    def _special_or_raise(self, i: int | None, what: str) -> int:
        if i is None:
            raise AttributeError(f"the {self.kind.upper()} tokenizer has no {what}")
        return i

    @property
    def vocab_size(self) -> int:
        """V: the number of ids, 0..V-1 (the size of the embedding and output layers)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of one vocabulary entry, e.g. "##ge". Raises KeyError if it is not one."""
        i = self.backend.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        """The vocabulary entry of one id. Raises KeyError if the id is out of range."""
        token = self.backend.id_to_token(i)
        if token is None:
            raise KeyError(f"id {i} is not in the vocabulary (size {self.vocab_size})")
        return token

    def __repr__(self) -> str:
        if self.kind == "clip":
            return (f"Tokenizer(kind='clip', vocab_size={self.vocab_size}, pad={self.pad_id}, "
                    f"cls={self.cls_id}, sep={self.sep_id})")
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, unk={self.unk_id}, "
                f"cls={self.cls_id}, sep={self.sep_id}, mask={self.mask_id})")

    # --- text -> ids ---

    def tokens(self, text: str) -> list[str]:
        """The word pieces of a text, without [CLS]/[SEP], e.g. ["a", "lar", "##ge"] (BERT) or
        ["a</w>", "photo</w>"] (CLIP; bytes shown as clip_byte_alphabet characters)."""
        _check_text(text, "text")
        return self._encode_pieces([text])[0].tokens

    def _encode_pieces(self, texts: list[str]) -> list:
        """The library's encodings (no specials) of checked texts.

        CLIP texts are cleaned first (`clip_clean_text`). A CLIP text that names a special
        token ("... <end_of_text> ...") is split into CLIP's words before the library sees it:
        open_clip reads the name as the special token only where one of its words starts there
        (not in "x!<end_of_text>", where "!<" is one word), while the library would find it
        anywhere in the text. The library then gets the words as pre-split input.
        """
        if self.kind == "clip":
            texts = [clip_clean_text(t) for t in texts]
        if self.kind == "sentencepiece":
            texts = [virtex_normalize(t) for t in texts]
        if len(texts) == 1:  # one text (encode, tokens): no batch machinery
            encodings = [self.backend.encode(texts[0], add_special_tokens=False)]
        else:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        if self.kind != "clip":
            return encodings
        for k, text in enumerate(texts):
            if CLIP_START in text or CLIP_END in text:
                normalized = self.backend.normalizer.normalize_str(text)
                words = [w for w, _span in _clip_word_splitter().pre_tokenize_str(normalized)]
                encodings[k] = self.backend.encode(words, is_pretokenized=True,
                                                   add_special_tokens=False)
        return encodings

    def _wrap(self, pieces: list[int], max_len: int | None, add_special: bool) -> list[int]:
        """[CLS] pieces [SEP], truncated to at most max_len ids keeping the final [SEP]."""
        if not add_special:
            return pieces if max_len is None else pieces[:max_len]
        if max_len is not None:
            pieces = pieces[: max_len - 2]  # room for [CLS] and [SEP]
        return [self.cls_id] + pieces + [self.sep_id]

    def _check_max_len(self, max_len: int | None, add_special: bool) -> None:
        smallest = 2 if add_special else 1  # [CLS] and [SEP] must both fit
        if max_len is not None and max_len < smallest:
            raise ValueError(f"max_len must be at least {smallest}"
                             f"{' (room for [CLS] and [SEP])' if add_special else ''}, got {max_len}")

    def encode(self, text: str, max_len: int | None = None, add_special: bool = True) -> list[int]:
        """Text -> ids: `[CLS] pieces [SEP]`.

        Args:
            text: any string; it is lowercased (not by a cased BERT vocabulary) and split by
                the BERT or CLIP pipeline.
            max_len: the most ids to return. Longer encodings lose pieces from the end, but the
                final [SEP] is kept, so the result is [CLS] p_1 .. p_{max_len-2} [SEP].
                None = no limit.
            add_special: False returns the bare pieces (truncated to max_len).
        Returns:
            list of ids, length <= max_len.
        Raises:
            ValueError: max_len too small, or text not valid UTF-8 (a lone surrogate).
        """
        self._check_max_len(max_len, add_special)
        _check_text(text, "text")
        pieces = self._encode_pieces([text])[0].ids
        return self._wrap(pieces, max_len, add_special)

    def encode_batch(self, texts: list[str], max_len: int | None = None,
                     add_special: bool = True, pad_to_max_len: bool = False) -> Tensor:
        """Many texts -> one right-padded LongTensor, encoded by the library in one (parallel) call.

        Row b equals `encode(texts[b], max_len, add_special)` followed by [PAD] = 0 up to T.

        Args:
            texts: B strings.
            max_len: as in `encode`; T is the longest row, so T <= max_len.
            add_special: as in `encode`.
            pad_to_max_len: pad every row to T = max_len exactly, as open_clip does (its CoCa
                text tower puts its CLS after the padding, at a fixed position).
        Returns:
            (B, T) long.
        Raises:
            ValueError: as `encode`, naming the text (texts[b]), or pad_to_max_len without
                max_len; TypeError for one str, which would otherwise be read as a batch of its
                characters.
        """
        self._check_max_len(max_len, add_special)
        if pad_to_max_len and max_len is None:
            raise ValueError("pad_to_max_len needs a max_len")
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one str (use encode)")
        texts = list(texts)
        for k, text in enumerate(texts):
            _check_text(text, f"texts[{k}]")
        encodings = self._encode_pieces(texts)
        rows = [self._wrap(e.ids, max_len, add_special) for e in encodings]  # B lists of ids
        T = max_len if pad_to_max_len else max((len(r) for r in rows), default=0)
        padded = [r + [self.pad_id] * (T - len(r)) for r in rows]  # right-pad with [PAD] = 0
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), T)  # (B, T)

    # --- ids -> text ---

    def _content_ids(self, ids: list[int], stop_at_sep: bool) -> list[int]:
        """Drop [PAD]/[CLS]/[MASK] (and [SEP]) and ids outside 0..V-1 (the library takes only
        unsigned 32-bit ids: a negative one is an OverflowError there); with stop_at_sep,
        nothing after the first [SEP]. CLIP: id 0 is also "!", so only the row's trailing run
        of 0s is padding; a 0 with anything but 0s after it is a "!"."""
        if self.kind == "clip":
            end = len(ids)
            while end and ids[end - 1] == self.pad_id:
                end -= 1
            ids, skip = ids[:end], {self.cls_id, self.sep_id}
        else:
            skip = {self.pad_id, self.cls_id, self.mask_id, self.sep_id}
        V = self.vocab_size
        kept = []
        for i in ids:
            if i == self.sep_id and stop_at_sep:
                break  # end of sequence
            if i not in skip and 0 <= i < V:
                kept.append(i)
        return kept

    def decode(self, ids: list[int] | Tensor, stop_at_sep: bool = True) -> str:
        """Ids -> lowercase words separated by single spaces, "##" pieces glued back on (BERT);
        CLIP: the words' bytes as UTF-8 (a broken sequence -> U+FFFD), each "</w>" -> " ",
        stripped: "a photo of a cat ." (open_clip's decode, stripped).

        Args:
            ids: (T,) ids, a list or a 1-D tensor (e.g. one generated caption).
            stop_at_sep: stop at the first [SEP] (end of sequence). False drops every [SEP] and
                reads on (e.g. both segments of an Oscar "caption [SEP] tags" input).
        Returns:
            e.g. "a large red circle". [UNK] stays as "[UNK]"; ids outside the vocabulary are
            skipped; a "##" piece with no piece before it keeps its "##".
        """
        if isinstance(ids, Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (T,), got shape {tuple(ids.shape)}; "
                                 f"use decode_batch for (B, T)")
            ids = ids.tolist()
        kept = self._content_ids(list(ids), stop_at_sep)
        text = self.backend.decode(kept, skip_special_tokens=False)  # WordPiece / ByteLevel decoder
        return text.strip() if self.kind == "clip" else text

    def decode_batch(self, ids: Tensor | list[list[int]], stop_at_sep: bool = True) -> list[str]:
        """(B, T) ids -> B strings, each as `decode`."""
        if isinstance(ids, Tensor):
            if ids.dim() != 2:
                raise ValueError(f"decode_batch takes (B, T), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        kept = [self._content_ids(list(row), stop_at_sep) for row in ids]
        texts = self.backend.decode_batch(kept, skip_special_tokens=False)
        return [t.strip() for t in texts] if self.kind == "clip" else texts
