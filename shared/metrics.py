"""The downstream metrics of the four papers, written out from their definitions.

    bleu            BLEU-1..4, corpus level        captioning  [Oscar Table 1; CoCa Table 7]
    cider_d         CIDEr-D                        captioning  [Oscar Table 1; VirTex §Captioning;
                                                               CoCa Table 7]
    coco_tokenize   a caption as the COCO toolkit tokenises it (lower case, no punctuation)
    rouge_l         ROUGE-L (F, β = 1.2)           captioning  [Oscar, VirTex, CoCa: the COCO
                                                               toolkit's third score]
    recall_at_k     R@1/5/10, both directions      retrieval   [Oscar Table 2(a); UNITER Table 3;
                                                               CoCa Table 3]
    vqa_accuracy    VQA accuracy as the server     VQA         [Oscar Table 2(b); UNITER Table 3]
                    computes it: answers normalised (normalize_answer), leave-one-annotator-out
                    subsets; vqa_accuracy_by_type: the same per question type
    top1_accuracy   top-1 of a (N, C) logit table  zero-shot / linear probe
                                                   [VirTex §Downstream; CoCa Tables 2, 4]
    truth_rate      share of true captions         the synthetic world (OURS, no paper)

BLEU, CIDEr-D and ROUGE-L are defined here *exactly* as the COCO caption evaluation code computes
them (pycocoevalcap 1.2: `Bleu(4)`, `Cider()` and `Rouge()`), because that code, not the original papers, is
what every captioning number in the four papers comes from. The places where that code differs
from the papers' formulas (BLEU's smoothing constants and per-image "closest" reference length;
CIDEr-D's length penalty on bigram counts) are reproduced on purpose and marked `QUIRK:`.
`tests/test_metrics.py` checks all three against pycocoevalcap on random corpora.

    BLEU:    Papineni, Roukos, Ward, Zhu. "BLEU: a Method for Automatic Evaluation of Machine
             Translation". ACL 2002.
    CIDEr:   Vedantam, Zitnick, Parikh. "CIDEr: Consensus-based Image Description Evaluation".
             CVPR 2015; arXiv 1411.5726v2. CIDEr-D is the variant of its §8 / the COCO server.
    COCO:    Chen, Fang, Lin, Vedantam, Gupta, Dollár, Zitnick. "Microsoft COCO Captions: Data
             Collection and Evaluation Server". arXiv 1504.00325.
    ROUGE:   Lin. "ROUGE: A Package for Automatic Evaluation of Summaries". ACL workshop 2004
             (ROUGE-L: its §3, the longest common subsequence).
    VQA:     Antol et al. "VQA: Visual Question Answering". ICCV 2015 (its accuracy metric);
             Goyal et al. "Making the V in VQA Matter". CVPR 2017 (VQA v2, whose evaluation
             server averages that metric over the leave-one-annotator-out subsets).

Text conventions: captions arrive lower-cased and tokenised, tokens separated by whitespace
(`str.split()` is the tokeniser here, as it is inside pycocoevalcap once its Java PTB
tokeniser has run; we do not run that tokeniser). One candidate caption per image, one or more
reference captions per image.

Shapes: N images (or examples), C classes; retrieval: N_img images, N_txt texts.
"""

import math
import re
from collections import Counter

import numpy as np
import torch

MAX_N = 4  # BLEU-4 and CIDEr-D both use n-grams of n = 1..4 [COCO §3]

# BLEU's two smoothing constants, as in the COCO code: every n-gram precision is computed as
# (matches + TINY) / (candidate n-grams + SMALL), and the length ratio likewise. They only keep
# 0/0 finite: a precision with no match is ~1e-15 / count instead of 0, so log and root stay
# defined. QUIRK: part of the COCO numbers, not of Papineni et al.
BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9

CIDER_SIGMA = 6.0  # σ of CIDEr-D's Gaussian length penalty [CIDEr §8, COCO code default]
CIDER_SCALE = 10.0  # CIDEr-D is multiplied by 10 "to make the scores comparable to other metrics"


# --- input checks -------------------------------------------------------------------------------

def _check_captions(candidates: list[str], references: list[list[str]]) -> None:
    """Raise ValueError unless there is one candidate string and >= 1 reference strings per image."""
    if not isinstance(candidates, (list, tuple)) or not isinstance(references, (list, tuple)):
        raise ValueError("candidates must be a list of strings and references a list of lists "
                         "of strings")
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference "
                         "lists: give exactly one candidate and one list of references per image")
    if len(candidates) == 0:
        raise ValueError("the corpus is empty: give at least one image")
    for i, (candidate, refs) in enumerate(zip(candidates, references)):
        if not isinstance(candidate, str):
            raise ValueError(f"candidates[{i}] is a {type(candidate).__name__}, not a string")
        if isinstance(refs, str) or not isinstance(refs, (list, tuple)):
            raise ValueError(f"references[{i}] must be a list of strings (one per reference "
                             f"caption), not a {type(refs).__name__}")
        if len(refs) == 0:
            raise ValueError(f"image {i} has no reference captions; every image needs at least one")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(f"references[{i}][{j}] is a {type(ref).__name__}, not a string")


def _ngram_counts(words: list[str], max_n: int = MAX_N) -> Counter:
    """Counts of every n-gram of `words` for n = 1..max_n, keyed by the tuple of its words.

    >>> _ngram_counts("a a b".split(), 2)
    Counter({('a',): 2, ('b',): 1, ('a', 'a'): 1, ('a', 'b'): 1})
    """
    counts = Counter()
    for n in range(1, max_n + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start:start + n])] += 1
    return counts


# --- BLEU ---------------------------------------------------------------------------------------

def bleu(candidates: list[str], references: list[list[str]]) -> list[float]:
    """Corpus-level BLEU-1..4, as the COCO caption evaluation code (`Bleu(4)`) computes it.

    For every n = 1..4, over the whole corpus (sums over images i, not an average of per-image
    scores) [Papineni et al. §2.1, §2.2.2]:

        p_n  = (Σ_i Σ_g min(count_i(g), max_r count_{i,r}(g)) + TINY) / (Σ_i #n-grams(c_i) + SMALL)
               (g runs over the n-grams of candidate c_i; counts clipped by the most any single
               reference of image i holds: "modified n-gram precision")
        BP   = exp(1 - r / c)  if c < r, else 1       (with c and r smoothed the same way)
        BLEU-N = BP · (p_1 · p_2 · ... · p_N) ^ (1/N)  (geometric mean, uniform weights)

    c = Σ_i len(c_i) is the candidate length. r = Σ_i r_i, the reference length: QUIRK of the
    COCO code ("closest"): r_i is the length of the reference of image i whose length is closest
    to len(c_i), the shorter one on a tie.

    Args:
        candidates: N strings, the generated caption of each image (lower-cased, tokens
            separated by whitespace).
        references: N lists of >= 1 strings, the reference captions of each image.
    Returns:
        [BLEU-1, BLEU-2, BLEU-3, BLEU-4], floats in [0, 1].
    Raises:
        ValueError: on a length mismatch, an image without references, or a non-string.
    """
    _check_captions(candidates, references)
    matches = [0] * MAX_N  # Σ_i clipped matches of n-grams, index n-1
    totals = [0] * MAX_N  # Σ_i number of n-grams in the candidate, index n-1
    candidate_length = 0  # c
    reference_length = 0  # r
    for candidate, refs in zip(candidates, references):
        words = candidate.split()
        counts = _ngram_counts(words)  # n-gram -> count in the candidate
        # For every n-gram, the most times any *single* reference contains it: the clip.
        max_ref_counts = Counter()
        for ref in refs:
            for gram, count in _ngram_counts(ref.split()).items():
                max_ref_counts[gram] = max(max_ref_counts[gram], count)
        for gram, count in counts.items():
            matches[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(1, MAX_N + 1):
            totals[n - 1] += max(0, len(words) - n + 1)  # a sentence of L words has L-n+1 n-grams
        # QUIRK ("closest"): the reference length nearest to the candidate's, shorter on a tie.
        ref_lengths = [len(ref.split()) for ref in refs]
        candidate_length += len(words)
        reference_length += min(ref_lengths, key=lambda length: (abs(length - len(words)), length))

    # Brevity penalty: BP = exp(1 - r/c) when the candidates are shorter than the references.
    ratio = (candidate_length + BLEU_TINY) / (reference_length + BLEU_SMALL)  # c / r, smoothed
    brevity_penalty = math.exp(1.0 - 1.0 / ratio) if ratio < 1.0 else 1.0

    scores = []
    product = 1.0  # p_1 · ... · p_n, grown one n at a time
    for n in range(1, MAX_N + 1):
        precision = (matches[n - 1] + BLEU_TINY) / (totals[n - 1] + BLEU_SMALL)  # p_n, smoothed
        product *= precision
        scores.append(brevity_penalty * product ** (1.0 / n))  # BLEU-n
    return scores


# --- CIDEr-D ------------------------------------------------------------------------------------

def _tfidf(counts: Counter, log_num_images: float, document_frequency: Counter):
    """TF-IDF vector of one sentence, split by n-gram order [CIDEr Eq. 1].

        g_k(s) = h_k(s) · log(|I| / max(1, Σ_i [k in any reference of image i]))

    h_k(s) is the raw count of n-gram k in s (the COCO code does not divide by the number of
    n-grams of s: the cosine below is invariant to that scale anyway).

    Returns:
        (vectors, norms, length): vectors[n-1] a dict n-gram -> g_k for n-grams of order n,
        norms[n-1] its Euclidean norm, and `length` the sentence length used by the Gaussian
        penalty. QUIRK: the COCO code takes as length the number of *bigrams* (its loop counts
        term frequencies of order index 1), i.e. words - 1 for a non-empty sentence. Differences
        of lengths, which is all the penalty uses, equal word-length differences unless one of
        the two sentences is empty.
    """
    vectors = [dict() for _ in range(MAX_N)]
    squared_norms = [0.0] * MAX_N
    length = 0
    for gram, term_frequency in counts.items():
        n = len(gram)
        # idf = log |I| - log df; an n-gram no reference contains gets df = 1 (idf = log |I|).
        idf = log_num_images - math.log(max(1.0, document_frequency[gram]))
        weight = term_frequency * idf  # g_k(s)
        vectors[n - 1][gram] = weight
        squared_norms[n - 1] += weight * weight
        if n == 2:
            length += term_frequency  # QUIRK: the number of bigrams (see above)
    norms = [math.sqrt(s) for s in squared_norms]
    return vectors, norms, length


def cider_d(candidates: list[str], references: list[list[str]]) -> float:
    """CIDEr-D over a corpus, as the COCO caption evaluation code (`Cider()`) computes it.

    Per image i with candidate c and references S_i = {s_1..s_m} [CIDEr Eq. 1-4, §8]:

        CIDEr-D_n(c, S_i) = 10/m · Σ_j exp(-(l(c) - l(s_j))² / (2σ²))
                                 · Σ_k min(g_k(c), g_k(s_j)) · g_k(s_j) / (‖g(c)‖ · ‖g(s_j)‖)
        CIDEr-D(c, S_i)   = 1/4 · Σ_{n=1..4} CIDEr-D_n(c, S_i)

    with g the TF-IDF vectors of n-grams of order n (`_tfidf`), σ = 6, and the score of the
    corpus the mean over its images. Details that matter for the value:
      * the document frequencies (df) count, for each n-gram, the images of *this corpus* whose
        references contain it, and |I| is the number of images in this corpus: CIDEr-D of a
        single image is always 0 (every idf is log 1 = 0);
      * `min(g_k(c), g_k(s_j))` clips the candidate's weight by the reference's, so repeating an
        n-gram does not pay (the "-D" of CIDEr-D, with the length penalty);
      * a zero norm leaves the (then zero) dot product undivided instead of dividing by 0;
      * the Gaussian penalty uses bigram counts as lengths (QUIRK, see `_tfidf`).

    Args:
        candidates: N strings (lower-cased, whitespace-tokenised), one per image.
        references: N lists of >= 1 strings.
    Returns:
        The corpus CIDEr-D, a float in [0, 10] (every cosine and penalty is <= 1, times 10;
        on COCO good captioners score about 1).
    Raises:
        ValueError: on a length mismatch, an image without references, or a non-string.
    """
    _check_captions(candidates, references)
    return float(np.mean(CiderD(references).scores(candidates, references)))  # mean over images


class CiderD:
    """CIDEr-D with the document frequencies of a fixed corpus of reference sets: per-caption
    scores, as SCST's reward needs them [Rennie et al. 2017, "Self-critical Sequence Training
    for Image Captioning", CVPR: CIDEr-D with the training references' n-gram statistics]. With
    the corpus the captions' own references, the mean of `scores` is `cider_d`.

        scorer = CiderD(corpus)            corpus: one list of reference strings per image
        scorer.scores(candidates, references)  -> [CIDEr-D(c_i, S_i)], one float per caption
    """

    def __init__(self, corpus: list[list[str]]):
        if not corpus or any(not refs for refs in corpus):
            raise ValueError("CIDEr-D's document frequencies need >= 1 image, each with >= 1 "
                             "reference")
        # Document frequency: in how many images' reference sets each n-gram occurs [CIDEr
        # Eq. 1]; log |I| with |I| the corpus's images.
        self.document_frequency = Counter()
        for refs in corpus:
            self.document_frequency.update(set().union(*(_ngram_counts(r.split())
                                                         for r in refs)))  # each image once
        self.log_num_images = math.log(float(len(corpus)))

    def scores(self, candidates: list[str], references: list[list[str]]) -> list[float]:
        """CIDEr-D of each candidate against its own references (module docstring of
        `cider_d` for the formula), under this corpus's document frequencies."""
        _check_captions(candidates, references)
        df, log_n = self.document_frequency, self.log_num_images
        out = []
        for candidate, refs in zip(candidates, references):
            vec_c, norm_c, len_c = _tfidf(_ngram_counts(candidate.split()), log_n, df)
            per_order = np.zeros(MAX_N)  # Σ_j CIDEr-D_n(c, s_j) before the 10/m, index n-1
            for ref in refs:
                vec_r, norm_r, len_r = _tfidf(_ngram_counts(ref.split()), log_n, df)
                delta = float(len_c - len_r)
                penalty = math.exp(-(delta ** 2) / (2.0 * CIDER_SIGMA ** 2))  # Gaussian, σ = 6
                for n in range(MAX_N):
                    # Clipped dot product: Σ_k min(g_k(c), g_k(s)) · g_k(s), k over c's n-grams.
                    dot = sum(min(weight, vec_r[n].get(gram, 0.0)) * vec_r[n].get(gram, 0.0)
                              for gram, weight in vec_c[n].items())
                    if norm_c[n] != 0.0 and norm_r[n] != 0.0:
                        dot /= norm_c[n] * norm_r[n]  # cosine (a zero vector: the dot is 0)
                    per_order[n] += dot * penalty
            # mean over n = 1..4, mean over the m references, times 10
            out.append(float(CIDER_SCALE * per_order.mean() / len(refs)))
        return out


# --- retrieval ----------------------------------------------------------------------------------

def coco_tokenize(text: str) -> str:
    """A caption as the COCO caption toolkit scores it: lower-cased, the punctuation its PTB
    tokenizer splits off removed (. , ? ! : ; quotes, brackets, dashes, ellipses), clitics split
    as PTB does ("don't" -> "do n't", "dog's" -> "dog 's"), tokens joined by single spaces.
    DIFFERENCE from the toolkit's Java Stanford PTB tokenizer, which we do not run: its rarer
    rules (abbreviations such as "u.s.", numbers with commas, currency) are not reproduced;
    hyphenated words stay one token, as there."""
    text = text.lower()
    text = re.sub(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)  # PTB's clitics
    text = re.sub(r"\.\.\.|--+|[.,?!:;\"`()\[\]{}]", " ", text)  # the toolkit's PUNCTUATIONS
    return " ".join(t for t in text.split() if t not in ("'", "''", "-"))


def _lcs_length(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence of two token lists (dynamic programming,
    one row at a time: O(len(a) · len(b)) time, O(len(b)) memory)."""
    row = [0] * (len(b) + 1)  # row[j] = LCS of a[:i] and b[:j], for the current i
    for token in a:
        diagonal = 0  # LCS of a[:i-1] and b[:j-1]
        for j, other in enumerate(b, start=1):
            above = row[j]  # LCS of a[:i-1] and b[:j]
            row[j] = diagonal + 1 if token == other else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(candidates: list[str], references: list[list[str]]) -> float:
    """ROUGE-L over a corpus, as the COCO caption evaluation code (`Rouge()`) computes it.

    Per image with candidate c and references r_1..r_m [Lin 2004, §3.1]:

        P = max_j LCS(c, r_j) / len(c)        R = max_j LCS(c, r_j) / len(r_j)
        ROUGE-L = (1 + β²) · P · R / (R + β² · P),   β = 1.2   (0 when P or R is 0)

    QUIRK of the COCO code: P and R are maximised over the references separately (they may come
    from two different references), not taken from the best single reference; β = 1.2 weighs
    recall a little more than precision. The corpus score is the mean over images.

    Args:
        candidates: N strings (lower-cased, whitespace-tokenised), one per image.
        references: N lists of >= 1 strings.
    Returns:
        The corpus ROUGE-L, a float in [0, 1].
    Raises:
        ValueError: on a length mismatch, an image without references, or a non-string.
    """
    _check_captions(candidates, references)
    beta2 = 1.2 ** 2
    scores = []
    for candidate, refs in zip(candidates, references):
        c = candidate.split()
        lcs = [(_lcs_length(c, r.split()), len(r.split())) for r in refs]  # (LCS, len(r_j))
        precision = max(n for n, _ in lcs) / len(c) if c else 0.0
        recall = max(n / length if length else 0.0 for n, length in lcs)
        scores.append((1 + beta2) * precision * recall / (recall + beta2 * precision)
                      if precision and recall else 0.0)
    return sum(scores) / len(scores)


def recall_at_k(scores, text_image) -> dict[str, float]:
    """Retrieval recall@K, image→text and text→image, from one score matrix.

    Image→text: image i is a hit at K if *any* of its texts is among the K best-scoring texts of
    row i. Text→image: text j is a hit at K if its image is among the K best-scoring images of
    column j. R@K is the fraction of hits: the COCO / Flickr30K retrieval protocol of Oscar,
    UNITER and CoCa, where each image has 5 captions.

    Ties count against the query: a wrong candidate that scores *equal* to the best right one is
    ranked above it, so R@K is a lower bound that never credits a tie. A model whose scores are
    all equal (e.g. collapsed embeddings) gets R@K = 0, not 1. K larger than the number of
    candidates is clipped to it (R@K = 1 then).

    Args:
        scores: (N_img, N_txt) similarity of image i and text j, higher = more similar
            (torch tensor or numpy array).
        text_image: (N_txt,) int, the image index (0 .. N_img-1) text j belongs to.
    Returns:
        {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}: floats in [0, 1].
    Raises:
        ValueError: on shape mismatches, image indices out of range, or an image without text.
    """
    scores = torch.as_tensor(scores).detach().double().cpu()  # (N_img, N_txt)
    text_image = torch.as_tensor(text_image).detach().long().cpu()  # (N_txt,)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N_img, N_txt), got shape {tuple(scores.shape)}")
    n_img, n_txt = scores.shape
    if text_image.shape != (n_txt,):
        raise ValueError(f"text_image must be ({n_txt},), one image index per text (column of "
                         f"scores), got shape {tuple(text_image.shape)}")
    if n_txt and (text_image.min() < 0 or text_image.max() >= n_img):
        raise ValueError(f"text_image holds indices outside 0..{n_img - 1}")
    own = text_image[None, :] == torch.arange(n_img)[:, None]  # (N_img, N_txt), text j is image i's
    if not own.any(dim=1).all():
        raise ValueError("every image needs at least one text: image "
                         f"{int((~own.any(dim=1)).nonzero()[0])} has none")

    # Image→text. The rank of the best own text = the number of *other* texts scoring >= it.
    best_own = scores.masked_fill(~own, float("-inf")).amax(dim=1)  # (N_img,)
    i2t_rank = ((scores >= best_own[:, None]) & ~own).sum(dim=1)  # (N_img,), 0 = first

    # Text→image. The rank of the right image = the number of other images scoring >= it.
    right = scores[text_image, torch.arange(n_txt)]  # (N_txt,), score of text j with its image
    t2i_rank = ((scores >= right[None, :]) & ~own).sum(dim=0)  # (N_txt,)

    out = {}
    for k in (1, 5, 10):
        # rank < K <=> hit at K. Clipping K to the candidates is automatic: a rank is at most
        # (number of candidates - 1), so K >= number of candidates always hits.
        out[f"i2t_r{k}"] = float((i2t_rank < k).double().mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).double().mean())
    return {key: out[key] for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}


# --- VQA, classification, truth -----------------------------------------------------------------

# The evaluation server's answer normalisation (the official VQA evaluation code): number words
# to digits, articles dropped, punctuation removed.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:']")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point


def normalize_answer(answer: str) -> str:
    """The form in which two answers are compared: lower case; punctuation removed (a period
    only where it is not a decimal point, "2.5" stays); number words zero..ten as digits; the
    articles a, an, the dropped; whitespace collapsed. "Two dogs." -> "2 dogs".
    DEVIATION: the official evaluation script also rewrites ~170 apostrophe-less contractions
    ("dont" -> "don't") and treats a comma between digits apart ("1,000"); we leave both out, so
    an answer differing only in those counts as different (rare among VQA v2 answers)."""
    text = _PUNCTUATION.sub(" ", answer.lower().replace("\n", " ").replace("\t", " "))
    text = _PERIOD.sub("", text)
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(predicted: list[str], answers: list[list[str]]) -> float:
    """VQA accuracy as the evaluation server computes it, averaged over questions. Per question,
    with the n human answers a_1..a_n (10 in VQA v2) and the prediction p, all normalised
    (normalize_answer):

        Acc(p) = (1/n) Σ_i min(#{j ≠ i : a_j = p} / 3, 1)

    the paper's min(#humans / 3, 1) (Antol et al.) averaged over the n leave-one-annotator-out
    subsets of n - 1 annotators. Worked example: 3 of 10 annotators said "yes"; leaving out one of
    those 3, 2 of the other 9 agree (min(2/3, 1) = 2/3), leaving out any of the other 7, 3 agree
    (1): Acc("yes") = (3 · 2/3 + 7 · 1) / 10 = 0.9, where min(3/3, 1) alone would give 1. Ten
    equal answers give that answer 1 and any other 0: exact match, how the synthetic world (one
    answer a question) is scored.

    Args:
        predicted: N answer strings.
        answers: N lists of >= 2 human answers (one per annotator; repeats count).
    Returns:
        The mean accuracy, a float in [0, 1].
    Raises:
        ValueError: on a length mismatch, a question with fewer than 2 answers (nothing to leave
            one out of: give a single reference answer as 10 equal ones), or a non-string.
    """
    if len(predicted) != len(answers):
        raise ValueError(f"got {len(predicted)} predictions but {len(answers)} answer lists")
    if len(predicted) == 0:
        raise ValueError("no questions: give at least one prediction")
    total = 0.0
    for i, (guess, refs) in enumerate(zip(predicted, answers)):
        if not isinstance(guess, str):
            raise ValueError(f"predicted[{i}] is a {type(guess).__name__}, not a string")
        if isinstance(refs, str) or len(refs) < 2:
            raise ValueError(f"answers[{i}] must be a list of >= 2 human answers (a single "
                             "reference answer: the same answer 10 times)")
        if not all(isinstance(r, str) for r in refs):
            raise ValueError(f"answers[{i}] holds a non-string")
        guess = normalize_answer(guess)
        same = [normalize_answer(r) == guess for r in refs]  # (n,)
        agree = sum(same)
        total += sum(min((agree - s) / 3, 1.0) for s in same) / len(refs)  # leave out each one
    return total / len(predicted)


def vqa_accuracy_by_type(predicted: list[str], answers: list[list[str]],
                         kinds: list[str]) -> dict[str, float]:
    """vqa_acc over every question, and vqa_acc_<kind> over the questions of each kind (a
    question template of the world, an answer type of VQA v2), kinds in first-seen order.

    Args:
        predicted, answers: as vqa_accuracy.
        kinds: N type names, one per question.
    Returns:
        {"vqa_acc": float, "vqa_acc_<kind>": float for each kind present}.
    """
    if len(kinds) != len(predicted):
        raise ValueError(f"got {len(predicted)} predictions but {len(kinds)} question types")
    metrics = {"vqa_acc": vqa_accuracy(predicted, answers)}
    for kind in dict.fromkeys(kinds):
        rows = [i for i, k in enumerate(kinds) if k == kind]
        metrics[f"vqa_acc_{kind}"] = vqa_accuracy([predicted[i] for i in rows],
                                                  [answers[i] for i in rows])
    return metrics


def top1_accuracy(logits, labels) -> float:
    """Fraction of rows whose highest logit is at the true class (zero-shot, linear probe).

    Args:
        logits: (N, C) scores (tensor or array), higher = more likely.
        labels: (N,) int class indices in 0 .. C-1.
    Returns:
        A float in [0, 1]. (Ties go to the lowest class index, as argmax does.)
    """
    logits = torch.as_tensor(logits).detach()  # (N, C)
    labels = torch.as_tensor(labels).detach().to(logits.device)  # (N,)
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"need logits (N, C) and labels (N,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no examples: N = 0")
    return float((logits.argmax(dim=1) == labels).double().mean())


def truth_rate(captions: list[str], scenes: list, is_true) -> dict[str, float]:
    """How often generated captions are true of their scene, and a constant-caption baseline.

    OURS (the synthetic world lets a program check a caption, which real data does not):

        truth    = mean_i is_true(captions[i], scenes[i])
        baseline = mean_i is_true(mode, scenes[i]),  mode = the most common string in `captions`

    `baseline` is what a captioner that always wrote its own favourite caption would score: a
    model that collapsed onto one caption has truth == baseline, and learning to look at the
    image shows as truth > baseline. (Ties for the most common caption: the first to appear.)

    Args:
        captions: N generated captions.
        scenes: N scenes, whatever the world's checker takes.
        is_true: the world's checker, is_true(caption, scene) -> bool; passed in so that this
            file does not import the world.
    Returns:
        {"truth": float in [0, 1], "baseline": float in [0, 1]}.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"got {len(captions)} captions but {len(scenes)} scenes")
    if len(captions) == 0:
        raise ValueError("no captions: give at least one")
    truth = sum(bool(is_true(caption, scene)) for caption, scene in zip(captions, scenes))
    mode = Counter(captions).most_common(1)[0][0]  # most_common keeps first-seen order on ties
    baseline = sum(bool(is_true(mode, scene)) for scene in scenes)
    return {"truth": truth / len(captions), "baseline": baseline / len(captions)}
