"""Metrics (shared/metrics.py).

Kinds: (a) hand-computed values (worked out in the comments) and loop versions written straight
from the definitions; (b) equivalence with an independent library: BLEU and CIDEr-D against the
COCO caption evaluation code (pycocoevalcap) on random corpora that nobody tuned.
"""

import itertools
import math
import random

import numpy as np
import pytest
import torch

from shared.metrics import (bleu, cider_d, coco_tokenize, normalize_answer, recall_at_k, rouge_l,
                            top1_accuracy, truth_rate, vqa_accuracy, vqa_accuracy_by_type)

WORDS = ["a", "red", "blue", "big", "small", "circle", "square", "left", "of", "above", "the",
         "is"]
OTHER_WORDS = ["zebra", "piano", "cloud"]  # never in a reference: candidates with no overlap


MIXED = ["random", "random", "copy", "one_word", "no_overlap", "long", "empty"]
SHORT = ["random", "copy", "one_word", "one_word", "empty"]  # corpus shorter than its references


def random_corpus(seed: int, n_images: int = 40, kinds: list[str] = MIXED):
    """A seeded random captioning corpus covering the awkward cases: 1-5 references of 1-9
    words, and candidates that are random, identical to a reference, one word long, sharing no
    word with any reference, longer than every reference, or empty (drawn from `kinds`)."""
    rng = random.Random(seed)

    def sentence(lo, hi, vocab=WORDS):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    candidates, references = [], []
    for _ in range(n_images):
        refs = [sentence(1, 9) for _ in range(rng.randint(1, 5))]
        kind = rng.choice(kinds)
        if kind == "random":
            candidate = sentence(1, 12)
        elif kind == "copy":
            candidate = rng.choice(refs)
        elif kind == "one_word":
            candidate = sentence(1, 1)
        elif kind == "no_overlap":
            candidate = sentence(1, 8, OTHER_WORDS)
        elif kind == "long":
            candidate = sentence(10, 20)
        else:
            candidate = ""
        candidates.append(candidate)
        references.append(refs)
    return candidates, references


def coco_inputs(candidates, references):
    """pycocoevalcap's format: dicts image id -> list of strings (one string for the result)."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    return gts, res


# --- (b) equivalence with the COCO caption evaluation code ----------------------------------------

@pytest.mark.parametrize("kinds", [MIXED, SHORT], ids=["mixed", "short"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_bleu_equals_pycocoevalcap_on_random_corpora(seed, kinds):
    from pycocoevalcap.bleu.bleu import Bleu

    candidates, references = random_corpus(seed, kinds=kinds)
    expected, _ = Bleu(4).compute_score(*coco_inputs(candidates, references), verbose=0)
    ours = bleu(candidates, references)
    assert len(ours) == 4
    for n in range(4):
        assert ours[n] == pytest.approx(expected[n], abs=1e-6, rel=1e-6), n


@pytest.mark.parametrize("kinds", [MIXED, SHORT], ids=["mixed", "short"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_cider_d_equals_pycocoevalcap_on_random_corpora(seed, kinds):
    from pycocoevalcap.cider.cider import Cider

    candidates, references = random_corpus(seed, kinds=kinds)
    expected, _ = Cider().compute_score(*coco_inputs(candidates, references))
    assert cider_d(candidates, references) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("kinds", [MIXED, SHORT], ids=["mixed", "short"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_rouge_l_equals_pycocoevalcap_on_random_corpora(seed, kinds):
    from pycocoevalcap.rouge.rouge import Rouge

    candidates, references = random_corpus(seed, kinds=kinds)
    expected, _ = Rouge().compute_score(*coco_inputs(candidates, references))
    assert rouge_l(candidates, references) == pytest.approx(float(expected), abs=1e-6)


def test_rouge_l_by_hand():
    """c = "a red circle left", one reference "a circle on the left": LCS "a circle left" = 3,
    P = 3/4, R = 3/5, F = (1 + 1.44) · 0.75 · 0.6 / (0.6 + 1.44 · 0.75) = 1.098 / 1.68 = 0.65357.
    With a second reference "a red circle" (LCS 3, R = 1): P = 3/4, R = max(3/5, 1) = 1,
    F = 2.44 · 0.75 / (1 + 1.08) = 0.87981 (P and R each maximised over the references)."""
    assert rouge_l(["a red circle left"], [["a circle on the left"]]) == pytest.approx(
        1.098 / 1.68, abs=1e-9)
    assert rouge_l(["a red circle left"], [["a circle on the left", "a red circle"]]) == \
        pytest.approx(2.44 * 0.75 / 2.08, abs=1e-9)
    assert rouge_l(["", "x"], [["a b"], ["y"]]) == 0.0
    with pytest.raises(ValueError, match="got 1 candidates but 2 reference lists"):
        rouge_l(["a"], [["a"], ["b"]])


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_bleu_and_cider_d_equal_pycocoevalcap_on_tiny_corpora(n_images):
    """Corpora of 1-3 images: a single image makes every CIDEr-D idf log(1) = 0."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    candidates, references = random_corpus(100 + n_images, n_images)
    gts, res = coco_inputs(candidates, references)
    expected_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected_cider, _ = Cider().compute_score(gts, res)
    assert bleu(candidates, references) == pytest.approx(expected_bleu, abs=1e-6)
    assert cider_d(candidates, references) == pytest.approx(float(expected_cider), abs=1e-6)


# --- (a) hand-computed values ---------------------------------------------------------------------

def test_bleu_hand_computed_single_sentence():
    # candidate "a a b c" (4 words), reference "a b c d" (4 words): c = r = 4, so BP = 1.
    #   1-grams  a,a,b,c        clipped matches: a min(2,1)=1, b 1, c 1 -> p1 = 3/4
    #   2-grams  aa, ab, bc     ref has ab, bc, cd               -> p2 = 2/3
    #   3-grams  aab, abc       ref has abc, bcd                 -> p3 = 1/2
    #   4-grams  aabc           ref has abcd                     -> p4 = 0 (+1e-15 smoothing)
    # BLEU-1 = 3/4, BLEU-2 = sqrt(3/4 · 2/3) = sqrt(1/2), BLEU-3 = (1/4)^(1/3),
    # BLEU-4 = (1/4 · 1e-15)^(1/4) ≈ 1.2574e-4: the COCO code's smoothing keeps it above 0.
    scores = bleu(["a a b c"], [["a b c d"]])
    assert scores[0] == pytest.approx(3 / 4, rel=1e-9)
    assert scores[1] == pytest.approx(math.sqrt(1 / 2), rel=1e-9)
    assert scores[2] == pytest.approx((1 / 4) ** (1 / 3), rel=1e-9)
    assert scores[3] == pytest.approx((1 / 4 * 1e-15) ** (1 / 4), rel=1e-6)


def test_bleu_brevity_penalty_uses_the_closest_reference_length():
    # candidate "a b" (c = 2); references of 4 and 6 words: the closest is 4, so r = 4 and
    # BP = exp(1 - r/c) = exp(1 - 2) = e^-1. Both unigrams and the bigram match: p1 = p2 = 1
    # (up to the smoothing: p2 = 1 / (1 + 1e-9), hence rel=1e-8).
    scores = bleu(["a b"], [["a b c d", "a b c d e f"]])
    assert scores[0] == pytest.approx(math.exp(-1), rel=1e-8)
    assert scores[1] == pytest.approx(math.exp(-1), rel=1e-8)
    # A tie: candidate of 4 words, references of 3 and 5 words are equally close; the shorter
    # one wins (r = 3 <= c, BP = 1). Every n-gram of "a b c d" is in the 5-word reference.
    assert bleu(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx([1.0] * 4, abs=1e-9)


def test_bleu_of_candidates_equal_to_all_their_references_is_one():
    candidates = ["a red circle left of the blue square", "the big square is above a circle"]
    references = [[c] * 3 for c in candidates]
    assert bleu(candidates, references)[3] == pytest.approx(1.0, abs=1e-9)


def test_cider_d_of_perfect_distinct_captions_is_ten_and_of_one_image_is_zero():
    # Three images with disjoint words: every n-gram has df = 1 < |I| (idf > 0), the candidate's
    # TF-IDF vectors equal each reference's, every cosine and penalty is 1: 10 · mean(1) = 10.
    candidates = ["a red circle left of it", "the big blue square above", "one small green dot there"]
    references = [[c, c] for c in candidates]
    assert cider_d(candidates, references) == pytest.approx(10.0, abs=1e-9)
    # One image: |I| = 1, every idf is log 1 - log 1 = 0, all vectors are zero.
    assert cider_d(candidates[:1], references[:1]) == 0.0


@pytest.mark.parametrize("call", [bleu, cider_d])
def test_caption_metrics_reject_bad_inputs_clearly(call):
    with pytest.raises(ValueError, match="2 candidates but 1 reference"):
        call(["a b", "c"], [["a b"]])
    with pytest.raises(ValueError, match="image 1 has no reference"):
        call(["a b", "c"], [["a b"], []])
    with pytest.raises(ValueError, match="not a string"):
        call(["a b", 3], [["a b"], ["c"]])
    with pytest.raises(ValueError, match=r"references\[0\]\[1\].*not a string"):
        call(["a b"], [["a b", None]])
    with pytest.raises(ValueError, match="must be a list of strings"):
        call(["a b"], ["a b"])
    with pytest.raises(ValueError, match="empty"):
        call([], [])


# --- recall@K -------------------------------------------------------------------------------------

def recall_at_k_loop(scores, text_image):
    """Straight from the definition, ties ranked against the query (a wrong candidate with an
    equal score goes first): sort, then look for the first right candidate."""
    n_img, n_txt = len(scores), len(text_image)
    out = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda j: (-scores[i][j], text_image[j] == i))
            first_own = min(pos for pos, j in enumerate(order) if text_image[j] == i)
            hits += first_own < k
        out[f"i2t_r{k}"] = hits / n_img
        hits = 0
        for j in range(n_txt):
            order = sorted(range(n_img), key=lambda i: (-scores[i][j], i == text_image[j]))
            hits += order.index(text_image[j]) < k
        out[f"t2i_r{k}"] = hits / n_txt
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_equals_a_loop_version(seed):
    gen = torch.Generator().manual_seed(seed)
    n_img = 12
    text_image = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (20,), generator=gen)])
    text_image = text_image[torch.randperm(len(text_image), generator=gen)]  # (32,)
    # Integer scores in a small range: plenty of ties to exercise the tie rule.
    scores = torch.randint(0, 6, (n_img, len(text_image)), generator=gen).float()  # (12, 32)
    ours = recall_at_k(scores, text_image)
    expected = recall_at_k_loop(scores.tolist(), text_image.tolist())
    assert list(ours) == ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
    for key in expected:
        assert ours[key] == pytest.approx(expected[key]), key
    # numpy inputs give the same
    assert recall_at_k(scores.numpy(), text_image.numpy()) == ours


def test_recall_at_k_hand_case():
    # image 0 owns text 0; image 1 owns texts 1, 2.
    #   i2t: image 0's own text scores 0.3 but text 2 scores 0.75 -> rank 1: miss at K=1.
    #        image 1's best own text (0.8) beats text 0 (0.2) -> hit.          i2t R@1 = 1/2
    #   t2i: text 0: image 0 (0.3) > image 1 (0.2) hit; text 1: 0.8 > 0.1 hit;
    #        text 2: its image 1 scores 0.7 < image 0's 0.75 -> miss.         t2i R@1 = 2/3
    #   K = 5, 10 exceed the 2 images / 3 texts: clipped, everything is a hit.
    scores = torch.tensor([[0.3, 0.1, 0.75],
                           [0.2, 0.8, 0.70]])
    r = recall_at_k(scores, torch.tensor([0, 1, 1]))
    assert r == pytest.approx({"i2t_r1": 0.5, "i2t_r5": 1.0, "i2t_r10": 1.0,
                               "t2i_r1": 2 / 3, "t2i_r5": 1.0, "t2i_r10": 1.0})


def test_recall_at_k_counts_ties_against_the_query():
    # Collapsed scores: all equal. 20 images, one text each: the right candidate ranks last
    # (19 wrong ones tie with it), so R@1 = R@5 = R@10 = 0, not 1.
    r = recall_at_k(torch.zeros(20, 20), torch.arange(20))
    assert all(v == 0.0 for v in r.values())


def test_recall_at_k_rejects_bad_inputs():
    with pytest.raises(ValueError, match="one image index per text"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="image 1 has none"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 0, 0]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


# --- VQA, top-1, truth ----------------------------------------------------------------------------

def subsets_accuracy(predicted: str, answers: list[str]) -> float:
    """The evaluation's definition, literally: the mean over every choice of n - 1 of the n
    annotators of min(#{those who gave the prediction} / 3, 1)."""
    guess = normalize_answer(predicted)
    subsets = list(itertools.combinations(answers, len(answers) - 1))
    return sum(min(sum(normalize_answer(a) == guess for a in subset) / 3, 1)
               for subset in subsets) / len(subsets)


@pytest.mark.parametrize("text, normalised", [
    ("Two dogs.", "2 dogs"), ("2.5", "2.5"), ("Yes!", "yes"), ("the red one", "red 1"),
    ("  A  Frisbee ", "frisbee"), ("t-shirt", "t shirt"), ("none", "0"), ("ten", "10")])
def test_answers_are_compared_after_normalisation(text, normalised):
    assert normalize_answer(text) == normalised


def test_vqa_accuracy_worked_by_hand():
    # 2 of 10 said "2": leaving out one of them, 1 of 9 agrees (1/3); leaving out any of the
    # other 8, 2 of 9 agree (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_accuracy(["2"], [answers]) == pytest.approx(0.6)
    assert vqa_accuracy(["two"], [answers]) == pytest.approx(0.6)  # normalised to "2"
    assert vqa_accuracy(["3"], [answers]) == 1.0
    # exactly 3 agree: min(3 / 3, 1) = 1 would be the paper's formula; the server's subsets of
    # 9 give (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_accuracy(["yes"], [["yes"] * 3 + ["no"] * 7]) == pytest.approx(0.9)
    assert vqa_accuracy(["maybe"], [["yes"] * 10]) == 0.0
    # one reference answer given by all ten annotators (the world's): exact match
    assert vqa_accuracy(["Red", "blue"], [["red"] * 10, ["red"] * 10]) == 0.5


def test_vqa_accuracy_is_the_mean_over_questions():
    predicted = ["yes", "two", "red", "Blue "]
    answers = [["yes"] * 10,  # every subset of 9 has >= 3 "yes": 1
               ["2", "2"] + ["3"] * 8,  # 0.6 (worked above)
               ["blue"] * 9 + ["red"],  # without the one "red": 0; with it, 1/3: 9/30 = 0.3
               ["blue"] * 10]  # case and spaces normalised away: 1
    assert vqa_accuracy(predicted, answers) == pytest.approx((1 + 0.6 + 0.3 + 1) / 4)


def test_vqa_accuracy_equals_the_loop_over_subsets_of_annotators():
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "red", "Red.", "blue"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(rng.choice([2, 3, 5, 10]))]
        guess = rng.choice(pool)
        assert vqa_accuracy([guess], [answers]) == pytest.approx(
            subsets_accuracy(guess, answers), abs=1e-12)


def test_vqa_accuracy_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_accuracy(["a", "b"], [["a"] * 10])
    with pytest.raises(ValueError, match=">= 2 human answers"):
        vqa_accuracy(["a"], [["a"]])  # one answer: no subset of the others to score against
    with pytest.raises(ValueError, match="no questions"):
        vqa_accuracy([], [])
    with pytest.raises(ValueError, match="not a string"):
        vqa_accuracy([3], [["3"] * 10])


def test_top1_accuracy():
    logits = torch.tensor([[0.1, 2.0, 0.3], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 3.0]])
    labels = torch.tensor([1, 0, 2, 1])  # the last row is wrong
    assert top1_accuracy(logits, labels) == pytest.approx(0.75)
    assert top1_accuracy(logits.numpy(), labels.numpy()) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labels"):
        top1_accuracy(logits, labels[:3])


def test_truth_rate_with_a_stub_checker():
    def is_true(caption, scene):  # stub world: the caption "n<k>" is true of scene k
        return caption == f"n{scene}"

    captions = ["n1", "n1", "n2", "n3"]
    scenes = [1, 2, 2, 3]
    # truth: n1|1 yes, n1|2 no, n2|2 yes, n3|3 yes -> 3/4.
    # baseline: the most common caption "n1" said of every scene: true only of scene 1 -> 1/4.
    assert truth_rate(captions, scenes, is_true) == {"truth": 0.75, "baseline": 0.25}
    with pytest.raises(ValueError, match="4 captions but 3 scenes"):
        truth_rate(captions, scenes[:3], is_true)


def test_metrics_accept_numpy_logits():
    assert top1_accuracy(np.eye(3), np.arange(3)) == 1.0


def test_vqa_accuracy_by_type_by_hand():
    answers = [[a] * 10 for a in ["two", "red", "one", "zero"]]
    predicted = ["two", "blue", "one", "six"]
    kinds = ["count", "colour", "count", "count"]
    metrics = vqa_accuracy_by_type(predicted, answers, kinds)
    assert metrics == {"vqa_acc": 0.5, "vqa_acc_count": pytest.approx(2 / 3),
                       "vqa_acc_colour": 0.0}
    assert list(metrics) == ["vqa_acc", "vqa_acc_count", "vqa_acc_colour"]  # first seen
    with pytest.raises(ValueError, match="4 predictions but 3 question types"):
        vqa_accuracy_by_type(predicted, answers, kinds[:3])


@pytest.mark.parametrize("raw, tokens", [
    ("A dog's toy, on the bed.", "a dog 's toy on the bed"),
    ("Don't run -- now...", "do n't run now"),
    ('A black-and-white "photo" (old)!', "a black-and-white photo old"),
    ("  Two   cats; one sleeping?  ", "two cats one sleeping"),
    ("a red circle left of a blue star", "a red circle left of a blue star"),
])
def test_coco_tokenize_lowercases_drops_punctuation_and_splits_clitics(raw, tokens):
    assert coco_tokenize(raw) == tokens


def test_cider_d_scores_of_a_fixed_corpus_average_to_the_corpus_cider_d_on_its_own_corpus():
    """CiderD(corpus).scores: per caption; with the captions' own references as the corpus,
    their mean is cider_d; with a larger corpus (SCST's training references) the document
    frequencies, and so the scores, change."""
    from shared.metrics import CiderD

    references = [["a red circle", "one red circle"], ["two blue squares", "a blue square"],
                  ["a green star above a circle", "a star and a circle"]]
    candidates = ["a red circle", "a blue square", "a star"]
    scores = CiderD(references).scores(candidates, references)
    assert len(scores) == 3 and max(scores) > 0
    assert float(np.mean(scores)) == pytest.approx(cider_d(candidates, references))
    larger = references + [["a red square", "a red star"], ["a red triangle"]]
    assert CiderD(larger).scores(candidates, references) != scores
    assert CiderD(larger).scores(["a red circle"], [["a red circle"]])[0] > \
        CiderD(larger).scores(["a blue star"], [["a red circle"]])[0]
    with pytest.raises(ValueError, match="document frequencies"):
        CiderD([])
