"""shared/evaluate.py: the world evaluation pieces the four paper files map onto their keys."""

import pytest
import torch

from shared.evaluate import (grouped_retrieval, in_eval_mode, pair_scores, reference_caption,
                             retrieval_metrics, sample_captions, world_examples)
from shared.tokenizer import Tokenizer
from shared.world import WorldConfig


def test_in_eval_mode_evaluates_without_gradients_and_restores_the_mode_even_on_error():
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    seen = {}

    @in_eval_mode
    def evaluate(m, x):
        seen["training"], seen["grad"] = m.training, torch.is_grad_enabled()
        return {"value": m(x).sum()}

    metrics = evaluate(model.train(), torch.ones(1, 2))
    assert seen == {"training": False, "grad": False} and model.training
    assert isinstance(metrics["value"], float)

    @in_eval_mode
    def broken(m):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        broken(model.train())
    assert model.training
    model.eval()
    evaluate(model, torch.ones(1, 2))
    assert not model.training  # an eval-mode model stays in eval mode


def test_in_eval_mode_returns_counts_as_ints_and_the_rest_as_floats():
    import numpy as np

    @in_eval_mode
    def evaluate(m):
        return {"questions": 190, "images": np.int64(12), "pairs": torch.tensor(40),
                "acc": torch.tensor(0.5), "cider": np.float32(1.25), "r1": 1}

    metrics = evaluate(torch.nn.Linear(1, 1))
    assert metrics == {"questions": 190, "images": 12, "pairs": 40, "acc": 0.5, "cider": 1.25,
                       "r1": 1}
    assert [type(v) for v in metrics.values()] == [int, int, int, float, float, int]


def test_pair_scores_is_the_loop_over_every_image_text_pair():
    table = torch.randn(7, 7)
    calls = []

    def score(image, text):
        calls.append(len(image))
        return table[image, text]

    scores = pair_scores(score, 7, chunk=10)
    expected = torch.tensor([[table[i, t] for t in range(7)] for i in range(7)])
    assert torch.equal(scores, expected) and calls == [10, 10, 10, 10, 9]


def test_retrieval_metrics_of_a_perfect_and_a_reversed_matrix():
    perfect = retrieval_metrics(torch.eye(20))
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == perfect["r1_mean"] == 1.0
    worst = retrieval_metrics(-torch.eye(20))
    assert worst["r1_mean"] == 0.0 and worst["i2t_r10"] == pytest.approx(0.0)


def test_grouped_retrieval_scores_each_group_of_images_against_its_own_captions():
    examples = [{"image": k, "captions": [f"c{k}", f"d{k}"]} for k in range(5)]

    def embed_images(images):
        return torch.eye(8)[list(images)]  # image k -> e_k

    def embed_texts(texts):
        return torch.eye(8)[[int(t[1:]) for t in texts]]  # caption of image k -> e_k

    metrics = grouped_retrieval(embed_images, embed_texts, examples, group=2)  # groups 2, 2, 1
    assert metrics["i2t_r1"] == metrics["t2i_r1"] == 1.0


def test_reference_caption_is_what_the_tokenizer_writes_back():
    tokenizer = Tokenizer.train(["a red circle left of a blue square"] * 5, vocab_size=60)
    text = "A red circle left of a blue square"
    assert reference_caption(tokenizer, text, 100) == "a red circle left of a blue square"
    # as the captioners' `max_len` cut: [CLS] + max_len - 2 pieces + [SEP]
    assert reference_caption(tokenizer, text, 3) == tokenizer.decode(
        tokenizer.encode(text, max_len=5)).lower()


def test_world_examples_and_sample_captions_take_the_first_examples_of_a_split():
    config = WorldConfig(seed=0, image_size=32)
    examples = world_examples(config, "val", 3, regions=False)
    assert len(examples) == 3 and "features" not in examples[0]
    samples = sample_captions(lambda exs: [ex["captions"][1] for ex in exs], config, "val", 3,
                              regions=False)
    assert samples == [(ex["captions"][1], ex["captions"][0]) for ex in examples]
