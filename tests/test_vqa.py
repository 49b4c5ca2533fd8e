"""shared.vqa: soft scores, the answer vocabulary, the accuracy per answer type as the server
reports it; the files read back from the world's export, and one-line errors for bad files. (The
accuracy itself and the answer normalisation, shared.metrics: test_metrics.py.) Training on the
export with train.py --data vqa: (UNITER and Oscar) and infer.py vqa on it are tested in
test_infer.py."""

import json

import numpy as np
import pytest

import train
from shared.metrics import normalize_answer
from shared.vqa import (VQAFolder, accuracy_by_type, answer_classes, answer_index,
                        answer_vocabulary, count_unanswerable, read_vqa, region_file,
                        results_json, soft_scores, world_answers)
from shared.world import World, WorldConfig, export_split


def test_accuracy_by_answer_type_in_the_servers_order():
    records = [{"answers": ["red"] * 10, "answer_type": "other"},
               {"answers": ["2", "2"] + ["3"] * 8, "answer_type": "number"},  # "two": 0.6
               {"answers": ["yes"] * 3 + ["no"] * 7, "answer_type": "yes/no"},  # "yes": 0.9
               {"answers": ["no"] * 10, "answer_type": "yes/no"}]
    metrics = accuracy_by_type(["blue", "two", "yes", "no"], records)
    assert metrics == pytest.approx({"vqa_acc": (0 + 0.6 + 0.9 + 1) / 4, "vqa_acc_yes_no": 0.95,
                                     "vqa_acc_number": 0.6, "vqa_acc_other": 0.0})
    assert list(metrics) == ["vqa_acc", "vqa_acc_yes_no", "vqa_acc_number", "vqa_acc_other"]
    with pytest.raises(ValueError, match="2 predictions but 4"):
        accuracy_by_type(["a", "b"], records)


def test_a_config_without_answers_gets_the_worlds():
    from shared.world import ANSWERS
    assert world_answers() == ANSWERS


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
    run, paper, overrides = train.parse_args([
        "--model", "uniter", "--task", "vqa", "--data",
        f"vqa:{files[0]},{files[1]},{tmp_path / 'absent'}", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="no region file in .*absent/ for any of its 10"):
        train.train(run, paper, overrides, log=lambda line: None)


@pytest.mark.parametrize("min_count", [1, 3])
def test_train_logs_the_answer_vocabulary_and_the_questions_it_leaves_without_answer(
        exported, min_count):
    _, out = exported
    folder = VQAFolder(out / "vqa_questions_test.json", out / "vqa_annotations_test.json")
    lines = []
    answers = answer_classes(folder, min_count, lines.append)
    assert answers == folder.answers(min_count)
    records = [r for i in range(len(folder)) for r in folder.example(i)["records"]]
    missed = sum(normalize_answer(r["answers"][0]) not in answers for r in records)
    assert (missed == 0) == (min_count == 1)  # the world's 10 answers of a question agree
    assert lines == [f"answer vocabulary: {len(answers)} answers (the most common answer of "
                     f">= {min_count} questions); {missed} of 40 training questions "
                     f"({100 * missed / 40:.1f} %) have no answer in it"]
    with pytest.raises(ValueError, match=">= 1000 questions \\(--min_answer_count\\)"):
        answer_classes(folder, 1000, lines.append)
    run, _, _ = train.parse_args(["--model", "uniter", "--task", "vqa", "--min_answer_count",
                                  str(min_count)])
    assert run.min_answer_count == min_count


def test_train_refuses_vqa_data_for_another_task_or_a_pixel_model(exported, tmp_path):
    _, out = exported
    spec = f"vqa:{out / 'vqa_questions_test.json'},{out / 'vqa_annotations_test.json'}"
    for args, message in ((["--model", "uniter"], "trains --task vqa"),
                          (["--model", "coca"], "trains --task vqa")):
        run, paper, overrides = train.parse_args(args + ["--data", spec, "--out",
                                                         str(tmp_path / args[1])])
        with pytest.raises(SystemExit, match=message):
            train.train(run, paper, overrides, log=lambda line: None)


def test_a_string_image_id_outside_the_region_folder_is_refused(tmp_path):
    (tmp_path / "regions").mkdir()
    (tmp_path / "secret.npz").write_bytes(b"")
    for image_id in ["../secret", str(tmp_path / "secret")]:
        questions = {"questions": [{"question_id": 1, "image_id": "a", "question": "what?"},
                                   {"question_id": 2, "image_id": image_id, "question": "why?"}]}
        (tmp_path / "q.json").write_text(json.dumps(questions))
        with pytest.raises(ValueError, match=r"q\.json, questions\[1\]: .*secret\.npz' is outside"):
            VQAFolder(tmp_path / "q.json", None, tmp_path / "regions")


def _vqa_files(tmp_path, questions: list[str], answers: list[list], choices: list):
    """A questions file and an annotations file by hand: question k asks questions[k] of image
    k, with the human answers answers[k] and the multiple_choice_answer choices[k]."""
    (tmp_path / "q.json").write_text(json.dumps({"questions": [
        {"question_id": 100 + k, "image_id": k, "question": q} for k, q in enumerate(questions)]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": 100 + k, "image_id": k, "answer_type": "other",
         "multiple_choice_answer": choice, "answers": [{"answer": a} for a in given]}
        for k, (given, choice) in enumerate(zip(answers, choices))]}))
    return tmp_path / "q.json", tmp_path / "a.json"


def test_a_null_answer_is_left_out_counted_and_never_the_class_0(tmp_path):
    files = _vqa_files(tmp_path, ["what?", "which?", "who?"],
                       [["cat", None, "cat"], ["dog"] * 3, ["red", None, None]],
                       ["cat", None, None])
    with pytest.warns(UserWarning) as caught:
        records, _ = read_vqa(*files)
    assert [str(w.message) for w in caught] == [
        f"{files[1]}: 3 human answers and 2 multiple_choice_answer are null (the first in "
        f"question 100); they are left out"]
    assert [r["answers"] for r in records] == [["cat", "cat"], ["dog"] * 3, ["red"]]
    assert [r["multiple_choice_answer"] for r in records] == ["cat", "", ""]
    assert answer_vocabulary(records, min_count=1) == ("cat",)  # not "0", nor "" nor "none"
    index = answer_index(("cat", "0"))
    assert soft_scores(records[0]["answers"], index).tolist() == [1.0, 0.0]
    files = _vqa_files(tmp_path, ["what?"], [[None, None]], ["cat"])
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'answers' must be a non-empty list "
                                         r".*\(every answer is null\)"):
        read_vqa(*files)
    files = _vqa_files(tmp_path, ["what?"], [["cat"]], [3])
    with pytest.raises(ValueError, match=r"annotations\[0\]: 'multiple_choice_answer' must be "
                                         r"a string, got a number"):
        read_vqa(*files)


@pytest.mark.parametrize("blank", ["", "   ", "\t\n", "\ud800?"])
def test_a_blank_question_is_one_line_naming_it_in_training_and_evaluation(exported, tmp_path,
                                                                          blank):
    from shared.benchmarks import check_spec

    _, out = exported
    questions = json.loads((out / "vqa_questions_test.json").read_text())
    questions["questions"][5]["question"] = blank
    qid = questions["questions"][5]["question_id"]
    (tmp_path / "q.json").write_text(json.dumps(questions))
    what = "blank" if blank.strip() == "" else "not valid UTF-8 text"
    message = rf"q\.json, questions\[5\]: question {qid} is {what}"
    with pytest.raises(ValueError, match=message):
        read_vqa(tmp_path / "q.json")
    spec = f"vqa:{tmp_path / 'q.json'},{out / 'vqa_annotations_test.json'},{out / 'regions'}"
    with pytest.raises(ValueError, match=message):  # training reads it so
        VQAFolder.from_spec(spec)
    run, paper, overrides = train.parse_args(["--model", "uniter", "--task", "vqa"])
    with pytest.raises(ValueError, match=message):  # and so does --val_data, at the start
        check_spec(spec, paper, paper.Config(task="vqa"))
