"""shared/evaluate.py: the world evaluation pieces the four paper files map onto their keys."""

import pytest
import torch

from shared.evaluate import (answer_questions, grouped_retrieval, in_eval_mode, pair_scores,
                             predict_answers, reference_caption, retrieval_metrics,
                             sample_captions, vqa_metrics, world_examples)
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


def test_predict_answers_asks_every_question_in_chunks_with_its_own_image():
    examples = [{"questions": [("q0a", "yes"), ("q0b", "red")]}, {"questions": []},
                {"questions": [("q2a", "no")]}]
    answers = ["yes", "no", "red"]
    calls = []

    def answer_logits(questions, images):  # answers "red" for image 0, "no" for the others
        calls.append((questions, images))
        return torch.tensor([[0.0, 1.0, 2.0] if k == 0 else [0.0, 1.0, 0.0] for k in images])

    predicted, qa = predict_answers(examples, answer_logits, answers, chunk=2)
    assert qa == [("q0a", "yes", 0), ("q0b", "red", 0), ("q2a", "no", 2)]
    assert predicted == ["red", "red", "no"]
    assert calls == [(["q0a", "q0b"], [0, 0]), (["q2a"], [2])]


def test_answer_questions_runs_the_papers_answer_logits_in_eval_mode_without_gradients():
    """The one answer_questions of the region papers: what differs between them is the function
    that builds answer_logits (its model's inputs); it gets the model, the tokenizer, the config,
    the examples and the world's config, and the highest logit of config.answers wins."""
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2).train()
    config = SimpleNamespace(answers=("yes", "no", "red"))
    examples = [{"questions": [("q0", "yes"), ("q1", "no")]}, {"questions": [("q2", "red")]}]
    seen = {}

    def answer_logits_fn(m, tokenizer, c, exs, world_config):
        seen.update(model=m, tokenizer=tokenizer, config=c, examples=exs, world=world_config,
                    training=m.training, grad=torch.is_grad_enabled())
        return lambda questions, images: torch.tensor(
            [[0.0, 0.0, 1.0] if k == 1 else [0.0, 1.0, 0.0] for k in images])

    predicted = answer_questions(model, answer_logits_fn, "tok", config, examples, "world")
    assert predicted == ["no", "no", "red"]
    assert seen == {"model": model, "tokenizer": "tok", "config": config, "examples": examples,
                    "world": "world", "training": False, "grad": False}
    assert model.training  # restored


def test_vqa_metrics_score_the_worlds_one_answer_as_ten_agreeing_annotators():
    """A right answer scores 1 and a wrong one 0 (the server's accuracy with ten equal human
    answers), overall and per question template."""
    from shared.world import ANSWERS, question_type

    examples = world_examples(WorldConfig(seed=0, image_size=32), "val", 6)
    qa = [(q, a) for ex in examples for q, a in ex["questions"]]

    def always_yes(questions, images):
        return torch.nn.functional.one_hot(torch.full((len(questions),), ANSWERS.index("yes")),
                                           len(ANSWERS)).float()

    metrics = vqa_metrics(always_yes, examples, ANSWERS, chunk=4)
    assert metrics["vqa_acc"] == pytest.approx(sum(a == "yes" for _, a in qa) / len(qa))
    for kind in {question_type(q) for q, _ in qa}:
        rows = [a for q, a in qa if question_type(q) == kind]
        assert metrics[f"vqa_acc_{kind}"] == pytest.approx(
            sum(a == "yes" for a in rows) / len(rows))
