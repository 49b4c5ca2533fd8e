"""shared.vqa: the VQA v2 accuracy against values worked out by hand and a loop over the subsets
of 9 annotators written from the definition; answer normalisation, soft scores, the answer
vocabulary; the files read back from the world's export, and one-line errors for bad files.
Training on the export with train.py --data vqa: (UNITER and Oscar) and infer.py vqa on it
are tested in test_infer.py."""

import itertools
import json
import random

import numpy as np
import pytest

import train
from shared.vqa import (VQAFolder, accuracy_by_type, answer_index, answer_vocabulary,
                        count_unanswerable, normalize_answer, read_vqa, region_file,
                        results_json, soft_scores, vqa_v2_accuracy)
from shared.world import World, WorldConfig, export_split


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


def test_accuracy_worked_by_hand():
    # 2 of 10 said "2": leaving out one of them, 1 of 9 agrees (1/3); leaving out any of the
    # other 8, 2 of 9 agree (2/3): (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    answers = ["2", "2"] + ["3"] * 8
    assert vqa_v2_accuracy("2", answers) == pytest.approx(0.6)
    assert vqa_v2_accuracy("two", answers) == pytest.approx(0.6)  # normalised to "2"
    assert vqa_v2_accuracy("3", answers) == 1.0
    # exactly 3 agree: min(3 / 3, 1) = 1 would be the paper's formula; the server's subsets of
    # 9 give (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert vqa_v2_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_v2_accuracy("maybe", ["yes"] * 10) == 0.0
    assert vqa_v2_accuracy("Red", ["red"]) == 1.0  # one reference: exact match


def test_accuracy_equals_the_loop_over_subsets_of_annotators():
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "red", "Red.", "blue"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(rng.choice([2, 3, 5, 10]))]
        guess = rng.choice(pool)
        assert vqa_v2_accuracy(guess, answers) == pytest.approx(
            subsets_accuracy(guess, answers), abs=1e-12)


def test_soft_scores_are_min_of_count_over_3_and_1():
    index = answer_index(("yes", "no", "2", "red"))
    scores = soft_scores(["yes"] * 4 + ["two"] * 2 + ["red"] + ["purple"] * 3, index)
    np.testing.assert_allclose(scores, [1.0, 0.0, 2 / 3, 1 / 3])  # purple: not a class
    np.testing.assert_array_equal(soft_scores(["no"], index), [0, 1, 0, 0])  # one: one-hot
    assert scores.dtype == np.float32


def test_the_vocabulary_keeps_answers_common_enough_most_frequent_first():
    records = ([{"multiple_choice_answer": "yes"}] * 5 + [{"multiple_choice_answer": "Two"}] * 3
               + [{"multiple_choice_answer": "2"}] * 2 + [{"multiple_choice_answer": "no"}] * 5
               + [{"multiple_choice_answer": "cat"}] * 4)
    assert answer_vocabulary(records, min_count=5) == ("2", "no", "yes")  # 5 each: alphabetical
    assert answer_vocabulary(records, min_count=4) == ("2", "no", "yes", "cat")


def test_questions_without_an_answer_in_the_vocabulary_are_counted():
    records = [{"answers": ["Two", "3"]},  # "two" -> "2": in it
               {"answers": ["cat", "dog."]},  # neither: an all-zero target
               {"answers": ["The cat"]},  # "cat" after normalisation: not in it either
               {"answers": ["yes"] * 10}]
    answers = ("2", "yes", "no")
    assert count_unanswerable(records, answers) == 2
    index = answer_index(answers)
    assert count_unanswerable(records, answers) == sum(
        not soft_scores(r["answers"], index).any() for r in records)
    assert count_unanswerable(records, ()) == 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa")
    world = World(WorldConfig(image_size=32, n_test=10), "test")
    export_split(world, out, n=10)
    return world, out


def test_the_world_export_reads_back_question_by_question(exported):
    world, out = exported
    folder = VQAFolder(out / "vqa_questions_test.json", out / "vqa_annotations_test.json")
    assert len(folder) == 10 and folder.missing == []
    for i in range(10):
        ex, truth = folder.example(i), world.example(i)
        assert [(q, a[0]) for q, a in ex["questions"]] == truth["questions"]
        assert all(len(a) == 10 and len(set(a)) == 1 for _, a in ex["questions"])
        np.testing.assert_allclose(ex["features"], truth["features"], rtol=1e-3, atol=1e-3)
        assert ex["tags"] == truth["tags"]
    records = [r for i in range(10) for r in folder.example(i)["records"]]
    assert {r["answer_type"] for r in records} <= {"yes/no", "number", "other"}
    assert folder.n_questions == len(records) == 10 * world.config.n_questions
    predicted = [r["answers"][0] for r in records]
    metrics = accuracy_by_type(predicted, records)
    assert metrics["vqa_acc"] == 1.0 and all(v == 1.0 for v in metrics.values())
    saved = json.loads(results_json(predicted, records))
    assert saved[0] == {"question_id": records[0]["question_id"], "answer": predicted[0]}


def test_a_missing_region_file_or_annotation_is_named(exported, tmp_path):
    _, out = exported
    questions = json.loads((out / "vqa_questions_test.json").read_text())
    questions["questions"][0]["image_id"] = 999  # an image without a region file
    (tmp_path / "q.json").write_text(json.dumps(questions))
    folder = VQAFolder(tmp_path / "q.json", out / "vqa_annotations_test.json", out / "regions")
    assert folder.missing[0] == (questions["questions"][0]["question_id"],
                                 out / "regions" / f"{999:012d}.npz")
    assert folder.dropped_images == 1
    questions["questions"][0]["question_id"] = 10**6  # no annotation for it
    (tmp_path / "q.json").write_text(json.dumps(questions))
    with pytest.raises(ValueError, match="no annotation for question 1000000"):
        read_vqa(tmp_path / "q.json", out / "vqa_annotations_test.json")
    annotations = json.loads((out / "vqa_annotations_test.json").read_text())
    annotations["annotations"][3]["answer_type"] = "colour"
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"annotations\[3\]: answer_type must be one of"):
        read_vqa(out / "vqa_questions_test.json", tmp_path / "a.json")
    with pytest.raises(FileNotFoundError, match="no VQA questions file"):
        read_vqa(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="needs the annotations file"):
        VQAFolder(out / "vqa_questions_test.json").answers()


def test_region_files_are_found_by_the_coco_name_too(tmp_path):
    (tmp_path / "COCO_val2014_000000000042.npz").write_bytes(b"")
    assert region_file(tmp_path, 42, "val2014").name == "COCO_val2014_000000000042.npz"
    assert region_file(tmp_path, 7, "val2014").name == f"{7:012d}.npz"  # none: the first name


def test_a_region_folder_without_any_of_the_images_is_named(exported, tmp_path):
    _, out = exported
    files = (out / "vqa_questions_test.json", out / "vqa_annotations_test.json")
    expected = (f"no region file in {tmp_path / 'absent'}/ for any of its 10 images (expected "
                f"{tmp_path / 'absent'}/<image_id:012d>.npz, COCO_test_<image_id:012d>.npz or "
                f"<image_id>.npz); there is no folder {tmp_path / 'absent'}")
    with pytest.raises(ValueError) as e:
        VQAFolder(*files, tmp_path / "absent")
    assert str(e.value) == f"{files[0]}: {expected}"
    with pytest.raises(ValueError, match="for any of its 10 images") as e:
        VQAFolder(*files, tmp_path)  # a folder, but not the region folder
    assert "there is no folder" not in str(e.value)
    run, paper, _ = train.parse_args(["--model", "uniter", "--task", "vqa", "--data",
                                      f"vqa:{files[0]},{files[1]},{tmp_path / 'absent'}"])
    with pytest.raises(SystemExit, match="no region file in .*absent/ for any of its 10"):
        train.open_data(run, paper, paper.Config.tiny())


@pytest.mark.parametrize("min_count", [1, 3])
def test_train_logs_the_answer_vocabulary_and_the_questions_it_leaves_without_answer(
        exported, min_count):
    _, out = exported
    folder = VQAFolder(out / "vqa_questions_test.json", out / "vqa_annotations_test.json")
    lines = []
    answers = train.vqa_answers(folder, min_count, lines.append)
    assert answers == folder.answers(min_count)
    records = [r for i in range(len(folder)) for r in folder.example(i)["records"]]
    missed = sum(normalize_answer(r["answers"][0]) not in answers for r in records)
    assert (missed == 0) == (min_count == 1)  # the world's 10 answers of a question agree
    assert lines == [f"answer vocabulary: {len(answers)} answers (the most common answer of "
                     f">= {min_count} questions); {missed} of 40 training questions "
                     f"({100 * missed / 40:.1f} %) have no answer in it"]
    with pytest.raises(SystemExit, match=">= 1000 questions \\(--min_answer_count\\)"):
        train.vqa_answers(folder, 1000, lines.append)
    run, _, _ = train.parse_args(["--model", "uniter", "--task", "vqa", "--min_answer_count",
                                  str(min_count)])
    assert run.min_answer_count == min_count


def test_train_refuses_vqa_data_for_another_task_or_a_pixel_model(exported):
    _, out = exported
    spec = f"vqa:{out / 'vqa_questions_test.json'},{out / 'vqa_annotations_test.json'}"
    for args, message in ((["--model", "uniter"], "trains --task vqa"),
                          (["--model", "coca"], "trains --task vqa")):
        run, paper, overrides = train.parse_args(args + ["--data", spec, "--out", "/tmp/x"])
        with pytest.raises(SystemExit, match=message):
            train.open_data(run, paper, None)
