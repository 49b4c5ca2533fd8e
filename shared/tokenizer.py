"""A BERT-style WordPiece tokenizer for all four papers, built on the `tokenizers` library.

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
    * `decode` returns lowercase words separated by single spaces; punctuation is its own word
      ("left ." not "left."), because the pre-tokenizer split it off and we do not guess where it
      was glued. [UNK] is kept (as the literal "[UNK]") so a reader sees what was lost.
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

Shapes: B batch, T text tokens (with [CLS] and [SEP]), V vocabulary.
"""

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor

# --- 1. Special tokens -----------------------------------------------------------------------

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# The order in which `train` gives them ids 0..4; [PAD] must come first so that pad id = 0.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"  # a piece starting with "##" continues the word before it [BERT]


# --- 2. Building the library pipeline --------------------------------------------------------

def _bert_pipeline(model: models.Model) -> BackendTokenizer:
    """Wrap a WordPiece model in BERT's normalizer, pre-tokenizer and decoder.

    Args:
        model: a `tokenizers.models.WordPiece` (empty for training, or with a vocabulary).
    Returns:
        a `tokenizers.Tokenizer` with no post-processor: [CLS]/[SEP] are added by `Tokenizer`.
    """
    backend = BackendTokenizer(model)
    # clean_text: drop control chars, map all whitespace to " "; handle_chinese_chars: put spaces
    # around CJK ideographs; strip_accents=None follows `lowercase` (BERT-uncased: strip them).
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on spaces and punctuation
    # cleanup=False: do not glue punctuation back ("left ." stays "left ."); see module docstring.
    backend.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX, cleanup=False)
    return backend


def _backend_from_vocab(vocab: dict[str, int]) -> BackendTokenizer:
    """The full BERT pipeline over a fixed WordPiece vocabulary {token: id}.

    The special tokens are also registered as the library's "special added tokens": they keep
    the ids the vocabulary gives them, and a literal "[MASK]" in the input text is read as the
    [MASK] token rather than split into "[", "mask", "]" (as BERT does).
    """
    model = models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=CONTINUATION_PREFIX,
                             max_input_chars_per_word=100)  # BERT: longer words become [UNK]
    backend = _bert_pipeline(model)
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


# --- 3. The tokenizer ------------------------------------------------------------------------

class Tokenizer:
    """BERT WordPiece tokenizer: text <-> list of ids / (B, T) LongTensor.

    Build one with `Tokenizer.train(texts)`, `Tokenizer.from_vocab_file("vocab.txt")`,
    `Tokenizer.from_str(json)` or `Tokenizer.load("tokenizer.json")`.

    Attributes:
        backend: the `tokenizers.Tokenizer` that normalizes, splits and looks pieces up.
    """

    def __init__(self, backend: BackendTokenizer):
        """Wrap a library tokenizer after checking it has the five special tokens and [PAD] = 0.

        Raises:
            ValueError: if a special token is missing or [PAD] is not id 0.
        """
        missing = [t for t in SPECIAL_TOKENS if backend.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the special token(s) {missing}; "
                             f"it needs all of {list(SPECIAL_TOKENS)}")
        if backend.token_to_id(PAD) != 0:
            raise ValueError(f"{PAD} must be id 0 (padding is `tokens == 0` everywhere), "
                             f"got id {backend.token_to_id(PAD)}")
        self.backend = backend
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
    def from_vocab_file(cls, path: str | Path) -> "Tokenizer":
        """Load a BERT `vocab.txt`: one token per line, id = line number (0-based).

        BERT-base-uncased's file has [PAD] = 0, [UNK] = 100, [CLS] = 101, [SEP] = 102,
        [MASK] = 103; any file with the five specials and [PAD] on line 0 works.

        Args:
            path: the vocab.txt file.
        Returns:
            a Tokenizer whose ids are the file's line numbers.
        Raises:
            ValueError: the file does not exist, a token appears twice (ids could not equal line
                numbers), a special token is missing, or [PAD] is not on line 0.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"BERT vocab file {path} does not exist")
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
        return cls(_backend_from_vocab(vocab))

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        """Rebuild from `to_str()`'s JSON (e.g. `Tokenizer.from_str(checkpoint["tokenizer"])`)."""
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
        """[PAD], always 0."""
        return self._pad_id

    @property
    def unk_id(self) -> int:
        """[UNK], a word WordPiece cannot spell."""
        return self._unk_id

    @property
    def cls_id(self) -> int:
        """[CLS], the first token of every sequence; the decoders' start-of-sequence."""
        return self._cls_id

    @property
    def sep_id(self) -> int:
        """[SEP], the last token of every sequence; the decoders' end-of-sequence."""
        return self._sep_id

    @property
    def mask_id(self) -> int:
        """[MASK], the masked-language-modelling slot."""
        return self._mask_id

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
        return (f"Tokenizer(vocab_size={self.vocab_size}, pad={self.pad_id}, unk={self.unk_id}, "
                f"cls={self.cls_id}, sep={self.sep_id}, mask={self.mask_id})")

    # --- text -> ids ---

    def tokens(self, text: str) -> list[str]:
        """The word pieces of a text, without [CLS]/[SEP], e.g. ["a", "lar", "##ge"]."""
        _check_text(text, "text")
        return self.backend.encode(text, add_special_tokens=False).tokens

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
            text: any string; it is lowercased and split by the BERT pipeline.
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
        pieces = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(pieces, max_len, add_special)

    def encode_batch(self, texts: list[str], max_len: int | None = None,
                     add_special: bool = True) -> Tensor:
        """Many texts -> one right-padded LongTensor, encoded by the library in one (parallel) call.

        Row b equals `encode(texts[b], max_len, add_special)` followed by [PAD] = 0 up to T.

        Args:
            texts: B strings.
            max_len: as in `encode`; T is the longest row, so T <= max_len.
            add_special: as in `encode`.
        Returns:
            (B, T) long.
        Raises:
            ValueError: as `encode`, naming the text (texts[b]); TypeError for one str, which
                would otherwise be read as a batch of its characters.
        """
        self._check_max_len(max_len, add_special)
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings, got one str (use encode)")
        texts = list(texts)
        for k, text in enumerate(texts):
            _check_text(text, f"texts[{k}]")
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        rows = [self._wrap(e.ids, max_len, add_special) for e in encodings]  # B lists of ids
        T = max((len(r) for r in rows), default=0)
        padded = [r + [self.pad_id] * (T - len(r)) for r in rows]  # right-pad with [PAD] = 0
        return torch.tensor(padded, dtype=torch.long).reshape(len(rows), T)  # (B, T)

    # --- ids -> text ---

    def _content_ids(self, ids: list[int], stop_at_sep: bool) -> list[int]:
        """Drop [PAD]/[CLS]/[MASK] (and [SEP]) and ids outside 0..V-1 (the library takes only
        unsigned 32-bit ids: a negative one is an OverflowError there); with stop_at_sep,
        nothing after the first [SEP]."""
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
        """Ids -> lowercase words separated by single spaces, "##" pieces glued back on.

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
        return self.backend.decode(kept, skip_special_tokens=False)  # the WordPiece decoder

    def decode_batch(self, ids: Tensor | list[list[int]], stop_at_sep: bool = True) -> list[str]:
        """(B, T) ids -> B strings, each as `decode`."""
        if isinstance(ids, Tensor):
            if ids.dim() != 2:
                raise ValueError(f"decode_batch takes (B, T), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        kept = [self._content_ids(list(row), stop_at_sep) for row in ids]
        return self.backend.decode_batch(kept, skip_special_tokens=False)
