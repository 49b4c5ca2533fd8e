"""Property-based fuzz tests (hypothesis) of the code that takes user data: the COCO and
JSON-lines annotation readers and the region .npz reader of shared/folders.py, the tokenizer
(shared/tokenizer.py), the attention masks (shared/masks.py), the decoders
(shared/decoding.py) and `extract.py regions` (its --boxes files, a COCO SOURCE, its options).

Inputs: random bytes, truncated and mistyped JSON (lists for objects, numbers for captions,
null file names, nested junk), odd Unicode (NUL, RTL marks, emoji, combining marks, line
separators, lone surrogates written as bytes or as str), 100k-character captions; .npz files of
wrong shapes, dtypes (strings, objects, complex), NaN/inf values, boxes outside [0, 1] or
inverted, missing keys, empty and non-npz files; any string for the tokenizer; any lengths,
shapes and decoding settings for the masks and decoders; detection and COCO instances files
whose boxes hold NaN, Infinity, integers beyond a float, strings or booleans for numbers, 3 or 5
numbers, inverted or empty boxes, boxes outside the image, for images SOURCE has and has not,
and any value for extract.py's numeric options and --device.

The property, everywhere: either the result keeps the module's invariants (a corpus whose counts
add up, finite well-shaped region arrays, ids inside the vocabulary, masks of the stated shape
and content, generated rows that start with the prefix, end within max_len and never hold [PAD])
or the call raises ValueError (OSError for a file that cannot be opened) whose message names the
file or argument; a bad region file met while reading examples is a counted skip. Never another
exception type, never an error from inside json, zipfile, numpy, torch or the Rust tokenizers.
extract.py is a command: there the refusal is a SystemExit of one line beginning with "error:"
and naming the file or the flag, with no region file written, and every region file it does
write holds finite boxes inside the image with a positive width and height, finite conf, and
reads back.

Derandomized (the same examples every run) and small enough to run in seconds on a CPU.
"""

import io
import json
import math
import warnings
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.decoding import beam_search, greedy, nucleus_sample
from shared.folders import CaptionFolder, RegionFolder, open_corpus
from shared.masks import block_mask, causal_mask, expand_mask, lengths_mask, padding_mask
from shared.tokenizer import SPECIAL_TOKENS, Tokenizer


def fuzz(n: int):
    """n derandomized examples, no deadline (the machine may be busy), no example database."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def refused(call, *names: str):
    """Run call(); None and the error if it raised ValueError or OSError whose message names
    every one of `names` (the file, the argument); any other exception fails the test."""
    try:
        result = call()
        event("accepted")
        return result, None
    except (ValueError, OSError) as e:
        event("refused")  # --hypothesis-show-statistics: how often each way
        for name in names:
            assert name in str(e), f"{type(e).__name__} does not name {name!r}: {e}"
        return None, e


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# --- strategies: text and JSON --------------------------------------------------------------------

ODD = ["\x00", "\u200f", "\u202e", "\u200b", "\U0001F600", "e\u0301", "\u0301", "\ufeff",
       "\u2028", "\u2029", "\x85", "\x1c", "\r", "\t", " ", "##", "[MASK]", "[SEP]", "\u4e2d"]
SURROGATES = st.characters(categories=["Cs"])  # lone surrogates: a str, but not UTF-8


def strings(alphabet, max_size: int):
    """Strings made of pieces of `alphabet` (some of ODD are several characters long)."""
    return st.lists(alphabet, max_size=max_size).map("".join)


def sometimes_wrong(good, bad, one_in: int = 4):
    """Values of `good`, one time in `one_in` of `bad`: most examples get past the first
    check, so the code behind it is fuzzed too."""
    return st.integers(0, one_in - 1).flatmap(lambda k: bad if k == 0 else good)


TEXT = st.one_of(strings(st.characters() | st.sampled_from(ODD), 16),
                 st.sampled_from(["a " * 50_000, "x" * 100_000]))  # huge captions
ANY_TEXT = sometimes_wrong(strings(st.characters() | st.sampled_from(ODD), 24),
                           strings(st.characters() | st.sampled_from(ODD) | SURROGATES, 24))
SCALAR = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
          | strings(st.characters() | st.sampled_from(ODD), 6))
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
NAMES = sometimes_wrong(st.sampled_from(["a.png", "b.png"]),  # files that exist, or not:
                        st.sampled_from(["missing.png", "", ".", "a\x00.png", "sub/a.png"]))
CAPTION = sometimes_wrong(TEXT, SCALAR)  # a caption that is not a string: one line


def corrupt(draw, value):
    """One fault in a parsed JSON value: a node replaced by junk, a key of an object removed,
    or (one time in ten) the whole value replaced."""
    places = []  # (container, key) of every node

    def walk(node):
        for key in (list(node) if isinstance(node, dict) else range(len(node))
                    if isinstance(node, list) else []):
            places.append((node, key))
            walk(node[key])
    walk(value)
    if not places or draw(st.integers(0, 9)) == 0:
        return draw(JUNK)
    container, key = draw(st.sampled_from(places))
    if isinstance(container, dict) and draw(st.booleans()):
        del container[key]
    else:
        container[key] = draw(JUNK)
    return value


@st.composite
def coco_files(draw):
    """Bytes of a COCO captions file: a valid one (ids, file names of files that exist and do
    not, captions of any JSON type) with up to two faults, sometimes damaged as bytes."""
    ids = draw(st.lists(st.integers(0, 9) | st.text("0123456789", max_size=2), unique=True,
                        min_size=1, max_size=4))
    images = [{"id": i, "file_name": draw(NAMES)} for i in ids]
    if draw(st.integers(0, 9)) == 0:
        images.append(dict(images[0]))  # the same id twice
    notes = [{"image_id": draw(st.sampled_from(ids)), "caption": draw(CAPTION)}
             for _ in range(draw(st.integers(1, 6)))]
    data = {"images": images, "annotations": notes}
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # faults
        data = corrupt(draw, data)
    return damaged(draw, json.dumps(data, ensure_ascii=draw(st.booleans())))


@st.composite
def jsonl_files(draw):
    """Bytes of a JSON-lines file: valid records with up to two faults, now and then a line
    that is not JSON, sometimes damaged as bytes."""
    records = [{"image": "images/" + draw(NAMES), "captions": draw(st.lists(CAPTION,
                                                                           max_size=3))}
               for _ in range(draw(st.integers(1, 4)))]
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # faults
        records = corrupt(draw, records)
    lines = ([json.dumps(r, ensure_ascii=draw(st.booleans())) for r in records]
             if isinstance(records, list) else [json.dumps(records)])
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(TEXT))
    return damaged(draw, draw(st.sampled_from(["\n", "\r\n"])).join(lines))


def damaged(draw, text: str) -> bytes:
    """UTF-8 bytes of `text`; one time in four cut short, with a BOM, a stray byte, a lone
    surrogate (as CESU bytes or a JSON escape), deep nesting, or random bytes instead."""
    data = text.encode("utf-8", "surrogatepass")  # a lone surrogate that got in: CESU bytes
    kind = draw(st.integers(0, 23))
    at = draw(st.integers(0, len(data)))
    if kind == 1:
        data = data[:at]
    elif kind == 2:
        data = b"\xef\xbb\xbf" + data
    elif kind == 3:
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xed\xa0\x80", b"\x00", b"\xc3"])) \
            + data[at:]
    elif kind == 4:
        data = data.replace(b'"a.png"', b'"\\ud800.png"').replace(b'x', b'\\udfff')
    elif kind == 5:
        data = b"[" * 100_000
    elif kind == 6:
        data = draw(st.binary(max_size=64))
    return data


# --- a. the annotation and JSON-lines readers -----------------------------------------------------

@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """images/a.png, images/b.png (empty files: only their existence is read at the start) and
    regions/a.npz, regions/b.npz (valid)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    (root / "regions").mkdir()
    for name in ("a", "b"):
        (root / "images" / f"{name}.png").write_bytes(b"")
        np.savez(root / "regions" / f"{name}.npz", features=np.ones((2, 3)),
                 boxes=np.array([[0, 0, .5, .5], [.1, .2, .9, 1]]), conf=np.array([.2, .8]))
    return root


def check_counts(corpus, n_records: int, n_captions: int) -> None:
    """The corpus accounts for every record, and keeps only non-empty, stripped str captions."""
    assert len(corpus) >= 1
    assert len(corpus) + corpus.dropped_images == n_records
    kept = [c for _, captions in corpus.records for c in captions]
    assert all(isinstance(c, str) and c and c == c.strip() and utf8(c) for c in kept)
    assert len(kept) + corpus.dropped_captions <= n_captions


@fuzz(120)
@given(raw=coco_files(), reader=st.sampled_from(["coco", "regions", "open_coco", "open_regions"]))
@example(raw=b"[]", reader="coco")
@example(raw=b'"images annotations"', reader="coco")
@example(raw=b'{"images": [{"id": [1], "file_name": "a.png"}], "annotations": []}', reader="coco")
@example(raw=b'{"images": [{"id": 1, "file_name": null}], "annotations": []}', reader="coco")
@example(raw=b'{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
             b'[{"image_id": [1], "caption": "x"}]}', reader="coco")
@example(raw=b'{"images": {"id": 1}, "annotations": []}', reader="regions")
@example(raw=b'{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
             b'[{"image_id": 1, "caption": 5}]}', reader="coco")
@example(raw=b'{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
             b'[{"image_id": 1, "caption": "\\ud800"}]}', reader="coco")
@example(raw=b'\xef\xbb\xbf{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
             b'[{"image_id": 1, "caption": "x"}]}', reader="coco")
@example(raw=b'{"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], '
             b'"annotations": []}', reader="coco")
def test_a_coco_file_reads_as_a_consistent_corpus_or_is_refused_naming_it(corpus_dir, raw, reader):
    file = corpus_dir / "captions.json"
    file.write_bytes(raw)
    read = {"coco": lambda: CaptionFolder.coco(file, image_size=32),
            "regions": lambda: RegionFolder.coco(file),
            "open_coco": lambda: open_corpus(f"coco:{file}", "image", 32),
            "open_regions": lambda: open_corpus(f"regions:{file}", "regions", 32)}[reader]
    corpus, error = refused(read, str(file))
    if corpus is not None:
        data = json.loads(raw.decode("utf-8-sig"))
        check_counts(corpus, len(data["images"]), len(data["annotations"]))


@fuzz(120)
@given(raw=jsonl_files())
@example(raw=b'["image", "captions"]')
@example(raw=b'"image captions"')
@example(raw=b'{"image": null, "captions": ["x"]}')
@example(raw=b'{"image": 7, "captions": ["x"]}')
@example(raw=b'{"image": "images/a.png", "captions": 5}')
@example(raw=b'{"image": "images/a.png", "captions": null}')
@example(raw=b'{"image": "images/a.png", "captions": ["x\xe2\x80\xa8y"]}')  # raw U+2028
@example(raw=b'{"image": "images/a.png", "captions": ["\xff"]}')
@example(raw=b'[' * 100_000)
def test_a_jsonl_file_reads_as_a_consistent_corpus_or_is_refused_naming_it(corpus_dir, raw):
    file = corpus_dir / "corpus.jsonl"
    file.write_bytes(raw)
    corpus, error = refused(lambda: CaptionFolder.jsonl(file, image_size=32), str(file))
    if corpus is not None:
        lines = [json.loads(line) for line in raw.decode("utf-8-sig").split("\n") if line.strip()]
        check_counts(corpus, len(lines), sum(len(r["captions"]) for r in lines))


@fuzz(60)
@given(spec=strings(st.characters() | st.sampled_from(ODD + [":", ","]), 20)
       | st.sampled_from(["coco:", "jsonl:", "regions:", "regions:,", "coco:,x", "jsonl:/"]),
       inputs=st.sampled_from(["image", "regions"]))
def test_any_data_spec_opens_a_corpus_or_is_refused(spec, inputs):
    _, error = refused(lambda: open_corpus(spec, inputs, 32))
    assert error is not None and str(error)


# --- b. the region .npz reader --------------------------------------------------------------------

ANY_ARRAY = hnp.arrays(
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.int64, np.uint8, np.bool_,
                           np.complex64, np.dtype("<U3"), np.dtype("S2")]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))


@st.composite
def region_files(draw):
    """Bytes of a region file: mostly an .npz of the right keys with up to two things wrong
    (a key dropped or replaced by any array, NaN, inf, 1e300, pixel boxes, boxes a little or
    far outside [0, 1], x1 and x2 swapped, rows missing or doubled, flattened, an object array);
    sometimes a truncated one, a damaged zip, a .npy, or bytes that are no npz at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from([b"", b"PK\x03\x04junk", b"not an npz", b"\x93NUMPY"])
                    | st.binary(max_size=40))
    n, f, c = draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x1y1 = rng.random((n, 2)) * 0.5
    arrays = {"features": rng.standard_normal((n, f)).astype(np.float16),
              "boxes": np.concatenate([x1y1, x1y1 + rng.random((n, 2)) * 0.5], 1),
              "conf": rng.random(n), "cls_prob": rng.dirichlet(np.ones(c), n),
              "tags": np.array(["dog", "couch"][:draw(st.integers(0, 2))])}
    for _ in range(draw(st.integers(0, 2))):  # what is wrong
        key = draw(st.sampled_from(sorted(arrays)))
        change = draw(st.sampled_from(["drop", "any", "nan", "inf", "huge", "pixels", "slightly",
                                       "swap", "negative", "rows", "flat", "object"]))
        a = arrays.get(key)
        if change == "drop" or a is None:
            arrays.pop(key, None)
        elif change == "any":
            arrays[key] = draw(ANY_ARRAY)
        elif change == "object":
            arrays[key] = np.array([{"a": 1}, None], dtype=object)
        elif change == "rows" and a.ndim:
            arrays[key] = a[:max(len(a) - 1, 0)] if draw(st.booleans()) else np.concatenate([a, a])
        elif change == "flat":
            arrays[key] = a.reshape(-1)[:, None] if a.ndim == 1 else a.reshape(-1)
        elif a.dtype.kind == "f" and a.size:
            a = a.astype(np.float64)
            at = tuple(draw(st.integers(0, s - 1)) for s in a.shape)
            if change in ("nan", "inf", "huge", "negative"):
                a[at] = {"nan": np.nan, "inf": -np.inf, "huge": 1e300, "negative": -0.5}[change]
            elif change == "pixels":
                a = a * 640
            elif change == "slightly":
                a[at] += draw(st.sampled_from([-0.004, 0.004, 1e-7, -1e-7]))
            elif change == "swap" and a.ndim == 2 and a.shape[1] == 4:
                a = a[:, [2, 1, 0, 3]]
            arrays[key] = a
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # object arrays are pickled, as a careless writer would
    data = buffer.getvalue()
    if kind == 1:
        data = data[:draw(st.integers(0, len(data)))]
    elif kind == 2:
        bad = io.BytesIO()
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("features.npy", b"\x93NUMPY junk")
            z.writestr("boxes.npy", data[:20])
            z.writestr("conf.npy", b"")
        data = bad.getvalue()
    elif kind == 3:
        one = io.BytesIO()
        np.save(one, arrays.get("features", np.zeros(3)))  # a .npy, not an .npz
        data = one.getvalue()
    return data


def check_regions(out: dict) -> None:
    """What the models may rely on: finite float32 rows, boxes in [0, 1], conf descending."""
    features, boxes, conf = out["features"], out["boxes"], out["conf"]
    assert features.dtype == boxes.dtype == conf.dtype == np.float32
    n = len(features)
    assert n >= 1 and features.ndim == 2 and features.shape[1] >= 1
    assert boxes.shape == (n, 4) and conf.shape == (n,)
    assert np.isfinite(features).all() and np.isfinite(boxes).all() and np.isfinite(conf).all()
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert (np.diff(conf) <= 0).all()
    if "cls_prob" in out:
        p = out["cls_prob"]
        assert p.dtype == np.float32 and p.ndim == 2 and len(p) == n and p.shape[1] >= 1
        assert np.isfinite(p).all() and (p >= 0).all()
    assert isinstance(out["tags"], list) and all(isinstance(t, str) for t in out["tags"])


@fuzz(200)
@given(raw=region_files())
def test_a_region_file_reads_as_finite_well_shaped_rows_or_is_a_counted_skip(corpus_dir, raw):
    bad, good = corpus_dir / "fuzzed.npz", corpus_dir / "regions" / "a.npz"
    bad.write_bytes(raw)
    folder = RegionFolder([(bad, ["fuzzed"]), (good, ["good"])])
    out, error = refused(lambda: folder._read(bad), str(bad))
    if out is not None:
        check_regions(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = folder.example(0)
    if error is None:
        assert got["captions"] == ["fuzzed"] and folder.unreadable == 0 and not caught
    else:  # the next readable file, with one counted warning that names the bad one
        assert got["captions"] == ["good"] and folder.unreadable == 1
        assert len(caught) == 1 and str(bad) in str(caught[0].message)
        check_regions(got)


def test_region_boxes_a_rounding_error_outside_the_image_are_clipped(tmp_path):
    np.savez(tmp_path / "r.npz", features=np.ones((2, 3)), conf=np.array([.5, .4]),
             boxes=np.array([[-1e-3, 0, 1.004, 1], [0.2, 0.2, 0.4, 0.4]]))
    out = RegionFolder([(tmp_path / "r.npz", ["x"])])._read(tmp_path / "r.npz")
    assert out["boxes"][0].tolist() == [0, 0, 1, 1]


# --- c. the tokenizer ---------------------------------------------------------------------------

WORDS = ["a", "large", "red", "circle", "two", "small", "blue", "squares", "left", "of", "the"]
TOKENIZER = Tokenizer.train([" ".join(WORDS), "the red circle is left of two squares .",
                             "caf\u00e9 \u4e2d\u6587 \U0001F600 e\u0301"], vocab_size=80)


def check_ids(tokenizer: Tokenizer, ids: list[int], max_len, add_special: bool) -> None:
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    if max_len is not None:
        assert len(ids) <= max_len
    if add_special:
        assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id
    assert isinstance(tokenizer.decode(ids), str)


@fuzz(200)
@given(text=ANY_TEXT, max_len=st.none() | st.integers(-2, 12), add_special=st.booleans())
@example(text="a\ud800b", max_len=None, add_special=True)
@example(text="x" * 100_000, max_len=16, add_special=True)
def test_any_string_encodes_to_ids_in_the_vocabulary_or_is_refused(text, max_len, add_special):
    ids, error = refused(lambda: TOKENIZER.encode(text, max_len=max_len, add_special=add_special))
    too_short = max_len is not None and max_len < (2 if add_special else 1)
    if error is not None:
        assert too_short or not utf8(text), f"refused a valid input: {error}"
        assert ("max_len" in str(error)) if too_short else ("UTF-8" in str(error))
        return
    assert not too_short and utf8(text)
    check_ids(TOKENIZER, ids, max_len, add_special)
    assert all(isinstance(t, str) for t in TOKENIZER.tokens(text))


@fuzz(80)
@given(texts=st.lists(ANY_TEXT, max_size=4), max_len=st.none() | st.integers(2, 10))
def test_a_batch_encodes_row_by_row_or_names_the_text_it_refuses(texts, max_len):
    batch, error = refused(lambda: TOKENIZER.encode_batch(texts, max_len=max_len))
    bad = [k for k, t in enumerate(texts) if not utf8(t)]
    if error is not None:
        assert bad and f"texts[{bad[0]}]" in str(error), error
        return
    assert not bad
    assert batch.dtype == torch.long and batch.shape[0] == len(texts)
    for row, text in zip(batch.tolist(), texts):
        ids = TOKENIZER.encode(text, max_len=max_len)
        assert row == ids + [TOKENIZER.pad_id] * (batch.shape[1] - len(ids))


def test_a_batch_of_one_string_is_refused():
    with pytest.raises(TypeError, match="list of strings"):
        TOKENIZER.encode_batch("a red circle")


@fuzz(60)
@given(texts=st.lists(ANY_TEXT, max_size=4), vocab_size=st.integers(0, 60))
def test_training_on_any_texts_gives_a_tokenizer_or_is_refused(texts, vocab_size):
    tokenizer, error = refused(lambda: Tokenizer.train(texts, vocab_size=vocab_size))
    bad = [k for k, t in enumerate(texts) if not utf8(t)]
    if error is not None:
        assert vocab_size < len(SPECIAL_TOKENS) or (bad and f"texts[{bad[0]}]" in str(error)), \
            error
        return
    assert not bad and vocab_size >= len(SPECIAL_TOKENS)
    for text in texts:
        check_ids(tokenizer, tokenizer.encode(text, max_len=12), 12, True)


@fuzz(100)
@given(ids=st.lists(st.integers(-2**40, 2**40) | st.integers(-3, 90), max_size=12),
       stop_at_sep=st.booleans())
@example(ids=[-1, 2**40, 7], stop_at_sep=True)
def test_any_ids_decode_to_a_string_skipping_those_outside_the_vocabulary(ids, stop_at_sep):
    inside = [i for i in ids if 0 <= i < TOKENIZER.vocab_size]
    text = TOKENIZER.decode(ids, stop_at_sep=stop_at_sep)
    assert text == TOKENIZER.decode(inside, stop_at_sep=stop_at_sep)
    assert TOKENIZER.decode(torch.tensor(ids, dtype=torch.long), stop_at_sep) == text
    assert TOKENIZER.decode_batch([ids, inside], stop_at_sep) == [text, text]


@fuzz(40)
@given(corpus=st.lists(st.lists(st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12),
                                min_size=1, max_size=6), min_size=1, max_size=4),
       vocab_size=st.integers(5, 120), data=st.data())
def test_vocabulary_words_round_trip_exactly(corpus, vocab_size, data):
    tokenizer = Tokenizer.train([" ".join(words) for words in corpus], vocab_size=vocab_size)
    words = data.draw(st.lists(st.sampled_from([w for ws in corpus for w in ws]), max_size=8))
    text = " ".join(words)
    ids = tokenizer.encode(text)
    check_ids(tokenizer, ids, None, True)
    assert tokenizer.decode(ids) == text


# --- d. masks and decoders ----------------------------------------------------------------------

def ints(min_dims: int, max_dims: int, low: int = -2, high: int = 6):
    return hnp.arrays(np.int64, hnp.array_shapes(min_dims=min_dims, max_dims=max_dims,
                                                 min_side=0, max_side=5),
                      elements=st.integers(low, high))


INTS = ints(0, 3)  # any shape


@fuzz(80)
@given(tokens=sometimes_wrong(ints(2, 2), INTS), pad_id=st.integers(-1, 3))
def test_padding_mask_is_tokens_not_pad_or_refuses_a_shape(tokens, pad_id):
    tokens = torch.from_numpy(tokens)
    mask, error = refused(lambda: padding_mask(tokens, pad_id), "tokens")
    if tokens.dim() != 2:
        assert error is not None
        return
    assert mask.shape == (tokens.shape[0], 1, tokens.shape[1]) and mask.dtype == torch.bool
    assert torch.equal(mask[:, 0], tokens != pad_id)


@fuzz(80)
@given(lengths=sometimes_wrong(ints(1, 1, 0, 4), INTS), max_len=st.integers(-2, 6))
def test_lengths_mask_marks_the_first_lengths_keys_or_refuses(lengths, max_len):
    lengths = torch.from_numpy(lengths)
    mask, error = refused(lambda: lengths_mask(lengths, max_len))
    valid = (lengths.dim() == 1 and max_len >= 0
             and bool(((lengths >= 0) & (lengths <= max_len)).all()))
    assert (error is None) == valid, error
    if valid:
        assert mask.shape == (len(lengths), 1, max_len)
        assert mask[:, 0].sum(1).tolist() == lengths.tolist()
        assert torch.equal(mask[:, 0], mask[:, 0].cummin(1).values)  # a prefix of real keys


@fuzz(30)
@given(T=st.integers(-3, 9))
def test_causal_mask_is_lower_triangular_or_refuses_a_negative_length(T):
    mask, error = refused(lambda: causal_mask(T), "T")
    assert (error is None) == (T >= 0)
    if T >= 0:
        i = torch.arange(T)
        assert mask.shape == (T, T) and torch.equal(mask, i[:, None] >= i[None, :])


@fuzz(80)
@given(K=st.integers(1, 3), segments=sometimes_wrong(ints(2, 2, -1, 2), INTS),
       rules=sometimes_wrong(st.none(), hnp.arrays(np.bool_, hnp.array_shapes(
           min_dims=1, max_dims=3, max_side=4)) | st.just(np.eye(2, dtype=np.int64))),
       data=st.data())
def test_block_mask_follows_the_rules_or_refuses(K, segments, rules, data):
    if rules is None:  # a right one: (K, K) bool
        rules = data.draw(hnp.arrays(np.bool_, (K, K)))
    segments, rules = torch.from_numpy(segments), torch.from_numpy(rules)
    mask, error = refused(lambda: block_mask(segments, rules))
    K = rules.shape[0]  # the table's
    valid = (rules.dtype == torch.bool and rules.dim() == 2 and rules.shape == (K, K) and K >= 1
             and segments.dim() == 2 and bool(((segments >= -1) & (segments < K)).all()))
    assert (error is None) == valid, error
    if valid:
        B, S = segments.shape
        for b, i, j in np.ndindex(B, S, S):
            a, c = int(segments[b, i]), int(segments[b, j])
            assert bool(mask[b, i, j]) == (a >= 0 and c >= 0 and bool(rules[a, c]))


@fuzz(80)
@given(B=st.integers(1, 3), Tq=st.integers(1, 3), Tk=st.integers(1, 3),
       shape=sometimes_wrong(st.none(), st.lists(st.integers(0, 3), max_size=4)),
       boolean=sometimes_wrong(st.just(True), st.just(False)), data=st.data())
def test_expand_mask_returns_a_mask_that_broadcasts_or_refuses(B, Tq, Tk, shape, boolean, data):
    if shape is None:  # one that broadcasts: each side 1 or its size, B's side maybe left out
        shape = [data.draw(st.sampled_from([1, n])) for n in (B, Tq, Tk)]
        shape = shape[data.draw(st.integers(0, 1)):]
    allowed = torch.ones(shape, dtype=torch.bool if boolean else torch.int64)
    mask, error = refused(lambda: expand_mask(allowed, B, Tq, Tk))
    if mask is not None:
        assert boolean and mask.dim() == 3
        assert torch.broadcast_to(mask, (B, Tq, Tk)).shape == (B, Tq, Tk)
    else:
        fits = len(shape) in (2, 3) and all(m in (1, n) for m, n in zip(shape[::-1], (Tk, Tq, B)))
        assert not (boolean and fits), error


def table_step_fn(V: int, seed: int):
    """A model without a model: log-softmax of a fixed random table indexed by the last token."""
    table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
    return lambda tokens, rows: table[tokens[:, -1]]  # (R, V)


@st.composite
def decoding_setups(draw):
    V = draw(st.integers(1, 6))
    B, T0 = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    prefix = torch.tensor(draw(st.lists(st.lists(st.integers(0, V - 1), min_size=T0,
                                                 max_size=T0), min_size=B, max_size=B)))
    return dict(V=V, prefix=prefix, seed=draw(st.integers(0, 100)),
                max_len=draw(sometimes_wrong(st.integers(T0, T0 + 5), st.integers(0, T0 - 1))),
                end_id=draw(st.integers(-1, V)), pad_id=draw(st.integers(0, V)),
                block_repeat=draw(st.booleans()))


TINY = dict(V=3, prefix=torch.tensor([[1], [2]]), seed=0, max_len=5, end_id=2, pad_id=0,
            block_repeat=False)
# V = 2 without an end token, repeats blocked: after token 1 only [PAD] and 1 itself are left
STUCK = dict(TINY, V=2, prefix=torch.tensor([[1]]), end_id=5, block_repeat=True)


def check_generated(tokens, score, prefix, max_len, end_id, pad_id, V) -> None:
    """Starts with the prefix, T0 <= T <= max_len, no [PAD] before the end token, only [PAD]
    after it, every generated token in the vocabulary, a finite score."""
    B, T0 = prefix.shape
    assert tokens.dtype == torch.long and tokens.shape[0] == B
    assert min(T0 + 1, max_len) <= tokens.shape[1] <= max_len
    assert torch.equal(tokens[:, :T0], prefix)
    for row in tokens[:, T0:].tolist():
        end = row.index(end_id) + 1 if end_id in row else len(row)
        assert all(0 <= t < V for t in row[:end])
        assert pad_id == end_id or pad_id not in row[:end], row
        assert all(t == pad_id for t in row[end:]), row
    assert torch.isfinite(score).all()


def may_refuse(setup) -> bool:
    """Whether a step can be left with no token to generate: every token is [PAD] or, under
    block_repeat, the one just emitted."""
    V, pad_id, end_id = setup["V"], setup["pad_id"], setup["end_id"]
    return V - int(pad_id < V and pad_id != end_id) - int(setup["block_repeat"]) < 1


@fuzz(150)
@given(setup=decoding_setups(), method=st.sampled_from(["greedy", "beam", "nucleus"]),
       beam_size=sometimes_wrong(st.integers(1, 4), st.integers(-1, 0)),
       length_penalty=sometimes_wrong(st.sampled_from([0.0, 0.6, 1.0]),
                                      st.sampled_from([-1.0, math.nan, math.inf])),
       top_p=sometimes_wrong(st.sampled_from([1e-9, 0.5, 0.9, 1.0]),
                             st.sampled_from([0.0, 1.5, math.nan])),
       temperature=sometimes_wrong(st.sampled_from([1.0, 0.5, 1e-300, 1e-40, 1e300]),
                                   st.sampled_from([0.0, -1.0, math.nan, math.inf])))
@example(setup=TINY, method="nucleus", beam_size=1, length_penalty=0.0, top_p=0.9,
         temperature=1e-300)  # 0 in float32
@example(setup=TINY, method="nucleus", beam_size=1, length_penalty=0.0, top_p=0.9,
         temperature=1e300)  # inf in float32, and [PAD]'s log p is -inf
@example(setup=TINY, method="nucleus", beam_size=1, length_penalty=0.0, top_p=0.9,
         temperature=math.nan)
@example(setup=TINY, method="beam", beam_size=2, length_penalty=math.nan, top_p=0.9,
         temperature=1.0)
@example(setup=STUCK, method="beam", beam_size=2, length_penalty=0.0, top_p=0.9,
         temperature=1.0)
@example(setup=STUCK, method="nucleus", beam_size=1, length_penalty=0.0, top_p=0.9,
         temperature=1.0)
def test_decoders_respect_the_prefix_max_len_and_padding_or_refuse(
        setup, method, beam_size, length_penalty, top_p, temperature):
    V, prefix, max_len = setup["V"], setup["prefix"], setup["max_len"]
    step_fn = table_step_fn(V, setup["seed"])
    common = dict(end_id=setup["end_id"], pad_id=setup["pad_id"],
                  block_repeat=setup["block_repeat"])
    if method == "greedy":
        call, valid = partial(greedy, step_fn, prefix, max_len, **common), True
    elif method == "beam":
        call = partial(beam_search, step_fn, prefix, max_len, beam_size=beam_size,
                       length_penalty=length_penalty, **common)
        valid = beam_size >= 1 and 0 <= length_penalty < math.inf
    else:
        call = partial(nucleus_sample, step_fn, prefix, max_len, top_p=top_p,
                       temperature=temperature, generator=torch.Generator().manual_seed(0),
                       **common)
        valid = 0 < top_p <= 1 and 0 < temperature < math.inf
    valid = valid and max_len >= prefix.shape[1]
    out, error = refused(call)
    if error is not None:
        assert not valid or may_refuse(setup), f"refused a valid setting: {error}"
        return
    assert valid
    check_generated(*out, prefix, max_len, setup["end_id"], setup["pad_id"], V)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_an_image_with_a_damaged_header_is_read_or_is_an_os_error_naming_it(tmp_path, suffix):
    """Bytes flipped in the first 40 of a valid PNG or JPEG (its signature and header fields:
    IHDR's size, depth and colour type; JPEG's markers and segment lengths). Pillow raises
    many kinds on such files (SyntaxError, struct.error, IndexError, ...); load_image gives
    an image or an OSError naming the file, nothing else."""
    from PIL import Image

    from shared.folders import load_image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:24, 0:32]
    Image.fromarray(np.stack([x * 8, y * 10, x + y], -1).astype(np.uint8)).save(
        tmp_path / f"valid{suffix}")
    valid = (tmp_path / f"valid{suffix}").read_bytes()
    path = tmp_path / f"damaged{suffix}"
    refused = set()
    for _ in range(300):
        data = bytearray(valid)
        for at in rng.choice(40, size=int(rng.integers(1, 4)), replace=False):
            data[at] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            array = load_image(path, 16)
        except OSError as e:
            assert str(e).startswith(f"cannot read {path}: "), e
            refused.add(str(e).split(": ", 1)[1][:30])
            continue
        assert array.shape == (16, 16, 3) and array.dtype == np.uint8
    assert refused  # some of them are refused


# --- e. extract.py regions: the --boxes files, a COCO SOURCE, the options ------------------------

@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """A folder of two small real images (a.png 40 x 30, b.png 16 x 64) and extract.py with one
    random ResNet-50 built once and its hash computed once (each example then costs a forward
    pass at 32 x 32, not a network's construction), on one thread: on a busy machine two OpenMP
    threads can spin against another process for 10x the time of such a small pass."""
    from PIL import Image

    import extract

    root = tmp_path_factory.mktemp("extract")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for name, (W, H) in {"a.png": (40, 30), "b.png": (16, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            root / "images" / name)
    resnet, size, description = extract.load_backbone("", "", 0)
    sha = extract.weights_sha256(resnet)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(extract, "load_backbone", lambda *args: (resnet, size, description))
        patch.setattr(extract, "weights_sha256", lambda module: sha)
        yield extract, root
    torch.set_num_threads(threads)


def extracted(extraction, **kwargs):
    """extract_regions into a fresh folder: (summary or None, the SystemExit's message or None,
    the folder). A SystemExit is one line beginning with "error:"; any other exception fails."""
    import tempfile

    extract, root = extraction
    out = Path(tempfile.mkdtemp(dir=root)) / "regions"
    try:
        summary = extract.extract_regions(**{"source": root / "images", "out_dir": out,
                                             "random_weights": 0, "image_size": 32, **kwargs})
        event("extracted")
        return summary, None, out
    except SystemExit as e:
        event("refused")
        message = str(e)
        assert message.startswith("error: ") and "\n" not in message, repr(message)
        return None, message, out


def check_region_files(out: Path, summary: dict) -> int:
    """Every .npz written holds finite boxes inside [0, 1] with x2 > x1 and y2 > y1, finite conf
    and one feature row per box, and reads back through RegionFolder; the counts add up.
    Returns the number of boxes written."""
    files = sorted(out.glob("*.npz"))
    assert len(files) == summary["written"] and not list(out.glob("*.tmp"))
    assert summary["written"] + summary["no_boxes"] + summary["unreadable"] == summary["images"]
    rows = 0
    for path in files:
        with np.load(path) as z:
            boxes, conf, features = z["boxes"], z["conf"], z["features"]
            assert boxes.dtype == conf.dtype == np.float32 and len(boxes) >= 1
            assert boxes.shape == (len(conf), 4) and features.shape == (len(conf), 2048)
            assert np.isfinite(boxes).all() and np.isfinite(conf).all()
            assert (boxes >= 0).all() and (boxes <= 1).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            rows += len(boxes)
        check_regions(RegionFolder([(path, ["x"])])._read(path))
    return rows


# numbers a box or a score may hold: mostly ordinary ones in and around a 40 x 64 image, now
# and then NaN, an infinity, a value beyond float32 or float (dropped and counted at extraction);
# rarely a JSON value that is no number, or a box of 3 or 5 of them (refused when read)
NUMBER = sometimes_wrong(st.floats(-20, 90) | st.integers(-20, 90),
                         st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e39, 10**400,
                                          0, 1e-30]))
NOT_NUMBER = st.sampled_from(["5", True, None, [1]]) | JUNK
BOX = sometimes_wrong(st.lists(NUMBER, min_size=4, max_size=4),
                      st.lists(NUMBER | NOT_NUMBER, min_size=3, max_size=5) | JUNK, one_in=12)
# mostly SOURCE's images (a.png, b.png), sometimes others (then a warning, or an error if none)
IMAGE_NAMES = st.sampled_from(["a.png", "a.png", "b.png", "b.png", "other.png", "images/a.png"])


def faulty(draw, data) -> bytes:
    """The bytes of a JSON value; one time in eight with a fault in its structure (corrupt), one
    in eight damaged as bytes (damaged). Hypothesis draws small integers more often than large
    ones, so a fault is asked for by the largest value: most files get as far as extraction."""
    if draw(st.integers(0, 7)) == 7:
        data = corrupt(draw, data)
    text = json.dumps(data)
    return damaged(draw, text) if draw(st.integers(0, 7)) == 7 else text.encode()


@st.composite
def detection_files(draw):
    """A --boxes json: file: detections for some of the images (and others), boxes and scores
    of NUMBER, labels of any kind; now and then a fault in its structure, or damaged bytes."""
    data = {}
    for name in draw(st.lists(IMAGE_NAMES, unique=True, min_size=1, max_size=3)):
        data[name] = []
        for _ in range(draw(st.integers(0, 4))):
            d = {"box": draw(BOX)}
            if draw(st.booleans()):
                d["score"] = draw(sometimes_wrong(NUMBER, NOT_NUMBER, one_in=12))
            if draw(st.booleans()):
                d["label"] = draw(sometimes_wrong(st.sampled_from(["dog", "", "\u202e", 3]),
                                                  SCALAR, one_in=12))
            data[name].append(d)
    return faulty(draw, data)


@st.composite
def instances_files(draw):
    """A --boxes instances: file: images (some of SOURCE's, some not), two categories,
    annotations with bbox of NUMBER; now and then a fault in its structure, or damaged bytes."""
    names = draw(st.lists(IMAGE_NAMES, unique=True, min_size=1, max_size=3))
    images = [{"id": k, "file_name": name} for k, name in enumerate(names)]
    annotations = [{"image_id": draw(st.integers(0, max(len(names) - 1, 0))),
                    "category_id": draw(st.sampled_from([1, 7])), "bbox": draw(BOX)}
                   for _ in range(draw(st.integers(0, 5)))]
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "dog"}, {"id": 7, "name": "cat"}]}
    return faulty(draw, data)


@fuzz(60)
@given(raw=detection_files())
@example(raw=b'{"a.png": [{"box": [NaN, 0, 5, 5]}], "b.png": [{"box": [5, 5, 1, 1]}]}')
@example(raw=b'{"a.png": [{"box": ["2", "10", "5", "5"]}]}')
@example(raw=b'{"a.png": [{"box": [0, 0, 5, 5], "score": Infinity}, {"box": [1, 1, 9, 9]}]}')
def test_a_detection_file_gives_well_formed_region_files_or_one_line(extraction, raw):
    extract, root = extraction
    file = root / "detections.json"
    file.write_bytes(raw)
    summary, error, out = extracted(extraction, boxes=f"json:{file}")
    if error is not None:
        assert f"json:{file}" in error and not list(out.glob("*.npz"))
        return
    rows = check_region_files(out, summary)
    data = json.loads(raw.decode("utf-8-sig"))
    given_boxes = sum(len(data[name]) for name in ("a.png", "b.png") if name in data)
    assert rows + summary["bad_boxes"] == given_boxes  # each box written or counted
    assert summary["not_in_boxes_file"] == sum(name not in data for name in ("a.png", "b.png"))


@fuzz(60)
@given(raw=instances_files())
@example(raw=b'{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": '
             b'"x"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [1, 1, 0, -4]}]}')
@example(raw=b'{"images": [{"id": 1, "file_name": "a.png"}], "categories": [{"id": 1, "name": '
             b'"x"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": ["1", "1", '
             b'"5", "5"]}]}')
def test_an_instances_file_gives_well_formed_region_files_or_one_line(extraction, raw):
    extract, root = extraction
    file = root / "instances.json"
    file.write_bytes(raw)
    summary, error, out = extracted(extraction, boxes=f"instances:{file}")
    if error is not None:
        assert f"instances:{file}" in error and not list(out.glob("*.npz"))
        return
    rows = check_region_files(out, summary)
    assert summary["written"] == 2  # every image has its whole-image box
    data = json.loads(raw.decode("utf-8-sig"))
    names = {image["id"]: image["file_name"] for image in data["images"]}
    annotated = sum(names[a["image_id"]] in ("a.png", "b.png") for a in data["annotations"])
    assert rows - 2 + summary["bad_boxes"] == annotated  # each bbox written or counted


@fuzz(40)
@given(raw=coco_files())
def test_a_coco_source_extracts_or_is_one_line(extraction, corpus_dir, raw):
    """A COCO SOURCE of the captions fuzz above (file names that exist as empty, undecodable
    files, that do not exist, NUL, "", ".", junk): counted unreadable, or one line."""
    extract, root = extraction
    file = root / "captions.json"
    file.write_bytes(raw)
    summary, error, out = extracted(extraction, source=file, boxes="grid:1",
                                    image_dir=str(corpus_dir / "images"))
    if error is None:
        check_region_files(out, summary)
        listed = (out / "unreadable.txt").read_text().splitlines() if summary["unreadable"] else []
        assert len(listed) == len({line.split("\t")[0] for line in listed}) <= summary["unreadable"]


@fuzz(40)
@given(image_size=sometimes_wrong(st.sampled_from([32, 33]), st.sampled_from([-5, 1, 31]),
                                  one_in=6),
       batch_size=sometimes_wrong(st.integers(1, 3), st.integers(-2, 0), one_in=6),
       n=sometimes_wrong(st.integers(0, 3), st.integers(-3, -1), one_in=6),
       device=sometimes_wrong(st.sampled_from(["auto", "cpu", "cpu:0"]),
                              st.sampled_from(["", "bogus", "meta", "cuda:99", "cuda:x", "mps"]),
                              one_in=6),
       tag_threshold=sometimes_wrong(st.floats(0, 1), st.floats(), one_in=6),
       tag_context=sometimes_wrong(st.floats(0, 1e3), st.floats(), one_in=6),
       random_weights=sometimes_wrong(st.just(0), st.integers(-2**70, 2**70), one_in=6))
def test_any_options_extract_or_are_one_line(extraction, image_size, batch_size, n, device,
                                            tag_threshold, tag_context, random_weights):
    summary, error, out = extracted(extraction, boxes="grid:1", image_size=image_size,
                                    batch_size=batch_size, n=n, device=device,
                                    tag_threshold=tag_threshold, tag_context=tag_context,
                                    random_weights=random_weights)
    if error is None:
        assert image_size in (0, 32, 33) and batch_size >= 1 and n >= 0
        assert math.isfinite(tag_context) and 0 <= tag_threshold <= 1
        check_region_files(out, summary)
    else:
        assert not out.exists()
