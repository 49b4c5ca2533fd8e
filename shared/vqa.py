"""VQA v2 on disk: the official question and annotation files, the answer vocabulary, the soft
scores the models train on and the accuracy per answer type as the evaluation server reports it
(Goyal et al., CVPR 2017; the accuracy itself, with the server's answer normalisation, is
shared.metrics.vqa_accuracy). UNITER [§4.1] and Oscar [§4] both fine-tune on it.

    v2_OpenEnded_mscoco_<subtype>_questions.json   {"questions": [{"question_id", "image_id",
                                                    "question"}], "data_subtype": "train2014"}
    v2_mscoco_<subtype>_annotations.json           {"annotations": [{"question_id", "image_id",
                                                    "answers": [{"answer"}] * 10, "answer_type",
                                                    "question_type", "multiple_choice_answer"}]}

answer_type is "yes/no", "number" or "other"; the server reports accuracy per answer type.
The region features of an image are one .npz as for --data regions: (shared.folders.RegionFolder),
found by region_file. Predictions are written as the server reads them:
[{"question_id": int, "answer": str}] (results_json).
"""

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from shared.folders import (RegionFolder, _json_type, _list, _need, _note_unreadable,
                            _parse_json, _read_text, _usable, inside, need_region_files)
from shared.metrics import normalize_answer, vqa_accuracy_by_type

ANSWER_TYPES = ("yes/no", "number", "other")
# The papers' vocabulary: every answer that is the most common one ("multiple_choice_answer")
# of at least 9 training questions, 3,129 answers on VQA v2 train + val (UNITER §A.2 and
# Oscar §4 say 3,129 and give no rule; the count 9 is that of the bottom-up attention
# preprocessing both codes took their answer list from). train.py --min_answer_count sets it.
MIN_ANSWER_COUNT = 9


# --- answers: classes, training targets, the vocabulary ---------------------------------------

def answer_index(answers: tuple[str, ...]) -> dict[str, int]:
    """normalised answer -> its class, for soft_scores (answers: a VQA head's classes)."""
    index = {}
    for k, answer in enumerate(answers):
        index.setdefault(normalize_answer(answer), k)
    return index


def soft_scores(answers: list[str], index: dict[str, int]) -> np.ndarray:
    """(A,) float32 training target: for each answer a of the vocabulary (index: normalised
    answer -> position),

        s_a = min(#{annotators who gave a} / min(3, #annotators), 1)

    the paper's min(#humans / 3, 1) [Antol et al. 2015]; the divisor is min(3, n) so a question
    with one reference answer (the synthetic world) has the one-hot target. Answers outside the
    vocabulary are dropped (such a question may have an all-zero target, as in both codes)."""
    scores = np.zeros(len(index), dtype=np.float32)  # (A,)
    counts = Counter(normalize_answer(a) for a in answers)
    for answer, count in counts.items():
        if answer in index:
            scores[index[answer]] = min(count / min(3, len(answers)), 1.0)
    return scores


def answer_vocabulary(records: list[dict], min_count: int = MIN_ANSWER_COUNT) -> tuple[str, ...]:
    """The answers (normalised) that are the most common answer of >= min_count questions,
    most frequent first, ties alphabetical. records: read_vqa's question records."""
    counts = Counter(normalize_answer(r["multiple_choice_answer"]) for r in records)
    return tuple(a for a, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                 if c >= min_count and a)


def world_answers() -> tuple[str, ...]:
    """The synthetic world's answers (shared.world.ANSWERS): the VQA head's classes of a Config
    that names none. Imported here, where read, so that importing a paper file skips the world."""
    from shared.world import ANSWERS
    return ANSWERS


def count_unanswerable(records: list[dict], answers: tuple[str, ...]) -> int:
    """How many questions have none of their human answers in `answers`, normalised as
    soft_scores compares them: their training target is all zero. records: read_vqa's, with
    the annotations."""
    index = answer_index(answers)
    return sum(not any(normalize_answer(a) in index for a in r["answers"]) for r in records)


def accuracy_by_type(predicted: list[str], records: list[dict]) -> dict[str, float]:
    """{"vqa_acc": overall, "vqa_acc_<answer type>": ...} of the predictions (one per record,
    which holds its human answers), as the server reports them (shared.metrics.vqa_accuracy),
    the answer types in ANSWER_TYPES order."""
    metrics = vqa_accuracy_by_type(predicted, [r["answers"] for r in records],
                                   [r["answer_type"].replace("/", "_") for r in records])
    order = ["vqa_acc"] + [f"vqa_acc_{kind.replace('/', '_')}" for kind in ANSWER_TYPES]
    return {key: metrics[key] for key in order if key in metrics}


def results_json(predicted: list[str], records: list[dict]) -> str:
    """The predictions as the evaluation server reads them: [{"question_id", "answer"}]."""
    return json.dumps([{"question_id": r["question_id"], "answer": p}
                       for p, r in zip(predicted, records, strict=True)]) + "\n"


# --- the files --------------------------------------------------------------------------------

def _id(value, at: str, key: str):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{at}: {key!r} must be an integer or a string, got {_json_type(value)}")
    return value


def read_vqa(questions_file: str | Path, annotations_file: str | Path | None = None
             ) -> tuple[list[dict], str]:
    """(question records, data_subtype) of a VQA v2 questions file and, if given, its annotations:
    each record {"question_id", "image_id", "question"} plus, with annotations, "answers" (the
    human answers), "answer_type", "question_type", "multiple_choice_answer". A missing file,
    key or annotation is a ValueError (FileNotFoundError) naming the file and the record, and
    so is a question that is blank or not valid UTF-8 (a lone surrogate): training and
    evaluation read the same records, and a question dropped in one would be answered in the
    other.

    A null answer says nothing: str(None) would be "None", which normalize_answer reads as the
    number word "none", i.e. the class "0". A human answer that is null is left out of its
    question's answers, and a null multiple_choice_answer becomes "" (answer_vocabulary skips
    it, so it is never a class); one warning per file counts them. A question whose every
    human answer is null, or an answer of another type (a number, a list), is a ValueError."""
    questions_file = Path(questions_file)
    if not questions_file.is_file():
        raise FileNotFoundError(f"no VQA questions file {questions_file}")
    where = str(questions_file)
    data = _parse_json(_read_text(questions_file), where)
    records = []
    for k, q in enumerate(_list(_need(data, "questions", where), f"{where}, 'questions'")):
        at = f"{where}, questions[{k}]"
        text = _need(q, "question", at)
        if not isinstance(text, str):
            raise ValueError(f"{at}: 'question' must be a string, got {_json_type(text)}")
        question_id = _id(_need(q, "question_id", at), at, "question_id")
        if not _usable(text):  # VQAFolder's captions would drop it, and with it its image
            raise ValueError(f"{at}: question {question_id!r} is "
                             f"{'blank' if not text.strip() else 'not valid UTF-8 text'}")
        records.append({"question_id": question_id,
                        "image_id": _id(_need(q, "image_id", at), at, "image_id"),
                        "question": text})
    subtype = data.get("data_subtype", "") if isinstance(data, dict) else ""
    if annotations_file is None:
        return records, str(subtype)
    annotations_file = Path(annotations_file)
    if not annotations_file.is_file():
        raise FileNotFoundError(f"no VQA annotations file {annotations_file}")
    where = str(annotations_file)
    data = _parse_json(_read_text(annotations_file), where)
    notes, null_answers, null_choices, first_null = {}, 0, 0, None
    for k, a in enumerate(_list(_need(data, "annotations", where), f"{where}, 'annotations'")):
        at = f"{where}, annotations[{k}]"
        given = [_need(x, "answer", f"{at}, answers") for x in
                 _list(_need(a, "answers", at), f"{at}, 'answers'")]
        answers = [x for x in given if x is not None]
        if not answers or not all(isinstance(x, str) for x in answers):
            raise ValueError(f"{at}: 'answers' must be a non-empty list of {{\"answer\": str}}"
                             f"{' (every answer is null)' if given and not answers else ''}")
        kind = _need(a, "answer_type", at)
        if kind not in ANSWER_TYPES:
            raise ValueError(f"{at}: answer_type must be one of {ANSWER_TYPES}, got {kind!r}")
        choice = _need(a, "multiple_choice_answer", at)
        if choice is not None and not isinstance(choice, str):
            raise ValueError(f"{at}: 'multiple_choice_answer' must be a string, got "
                             f"{_json_type(choice)}")
        question_id = _id(_need(a, "question_id", at), at, "question_id")
        if len(answers) < len(given) or choice is None:
            null_answers += len(given) - len(answers)
            null_choices += choice is None
            first_null = question_id if first_null is None else first_null
        notes[question_id] = {
            "answers": answers, "answer_type": kind,
            "question_type": str(a.get("question_type", "")),
            "multiple_choice_answer": "" if choice is None else choice}
    if first_null is not None:
        warnings.warn(f"{where}: {null_answers} human answers and {null_choices} "
                      f"multiple_choice_answer are null (the first in question {first_null}); "
                      f"they are left out")
    for r in records:
        if r["question_id"] not in notes:
            raise ValueError(f"{where}: no annotation for question {r['question_id']} of "
                             f"{questions_file}")
        r.update(notes[r["question_id"]])
    return records, str(subtype)


def region_file(region_dir: Path, image_id, subtype: str = "") -> Path:
    """The .npz of an image: <region_dir>/<image_id:012d>.npz (what shared.world.export_split
    writes), else COCO_<subtype>_<image_id:012d>.npz (the COCO file name of the image, as
    shared.convert names it), else <image_id>.npz; the first that exists, or the first name."""
    names = [f"{image_id:012d}.npz" if isinstance(image_id, int) else f"{image_id}.npz"]
    if isinstance(image_id, int) and subtype:
        names.append(f"COCO_{subtype}_{image_id:012d}.npz")
    names.append(f"{image_id}.npz")
    for name in names:
        if (region_dir / name).is_file():
            return region_dir / name
    return region_dir / names[0]


class VQAFolder(RegionFolder):
    """VQA v2 questions (and annotations) with one region .npz per image, behind the world's
    interface: example(i) -> the RegionFolder example of image i with "questions" [(question,
    answers)] and "records" (read_vqa's, same order). "captions" holds the question texts (what a
    tokenizer trained on the corpus reads). Images without a region file are dropped and
    counted (`missing`: the question ids, for evaluation to refuse). A string image_id whose
    file would lie outside the region folder ("../x", an absolute path) is a ValueError at
    start naming the question (shared.folders.inside)."""

    def __init__(self, questions_file: str | Path, annotations_file: str | Path | None = None,
                 region_dir: str | Path | None = None):
        questions_file = Path(questions_file)
        region_dir = questions_file.parent / "regions" if region_dir is None else Path(region_dir)
        records, subtype = read_vqa(questions_file, annotations_file)
        for k, r in enumerate(records):
            # an integer id only ever names <region_dir>/<digits>.npz; a string one is a name
            if isinstance(r["image_id"], str):
                inside(region_dir, f"{r['image_id']}.npz", f"{questions_file}, questions[{k}]")
        by_image: dict = {}
        for r in records:
            by_image.setdefault(r["image_id"], []).append(r)
        paths = {image_id: region_file(region_dir, image_id, subtype) for image_id in by_image}
        coco = f", COCO_{subtype}_<image_id:012d>.npz" if subtype else ""
        need_region_files(questions_file, region_dir, list(paths.values()),
                          f"{region_dir}/<image_id:012d>.npz{coco} or <image_id>.npz")
        self.missing = [(r["question_id"], paths[r["image_id"]]) for r in records
                        if not paths[r["image_id"]].is_file()]
        super().__init__([(paths[i], [r["question"] for r in rs]) for i, rs in by_image.items()],
                         questions_file)
        by_path = {paths[i]: rs for i, rs in by_image.items()}
        self.questions = [by_path[path] for path, _ in self.records]  # per kept image
        self.n_questions = sum(len(rs) for rs in self.questions)

    @classmethod
    def from_spec(cls, spec: str) -> "VQAFolder":
        """'vqa:QUESTIONS_JSON[,ANNOTATIONS_JSON[,REGION_DIR]]' (an empty ANNOTATIONS_JSON:
        questions only, for writing predictions of a test split)."""
        kind, _, rest = spec.partition(":")
        if kind != "vqa" or not rest:
            raise ValueError(f"VQA data is vqa:QUESTIONS_JSON[,ANNOTATIONS_JSON[,REGION_DIR]], "
                             f"not {spec!r}")
        questions, _, rest = rest.partition(",")
        annotations, _, region_dir = rest.partition(",")
        return cls(questions, annotations or None, region_dir or None)

    def answers(self, min_count: int = MIN_ANSWER_COUNT) -> tuple[str, ...]:
        """The answer vocabulary of these questions (answer_vocabulary)."""
        records = [r for rs in self.questions for r in rs]
        if "multiple_choice_answer" not in records[0]:
            raise ValueError("training on VQA needs the annotations file: "
                             "vqa:QUESTIONS_JSON,ANNOTATIONS_JSON[,REGION_DIR]")
        return answer_vocabulary(records, min_count)

    def text_counts(self) -> list[int]:
        """The questions of each image: VQA trains on (image, question) pairs, one unit of
        shared.data.Epochs each, in the order of example(i)["questions"]."""
        return [len(records) for records in self.questions]

    def example(self, i: int, regions: bool = True) -> dict:
        for k in range(len(self.records)):
            j = (i + k) % len(self.records)
            path, texts = self.records[j]
            try:
                arrays = self._read(path)
            except ValueError as e:  # _read's messages name the file
                _note_unreadable(self, path, f"region file {e}")
                continue
            records = self.questions[j]
            return {**arrays, "captions": texts, "records": records,
                    "questions": [(r["question"], r.get("answers", [])) for r in records]}
        raise RuntimeError("no region file of the corpus can be read")


def answer_classes(corpus, min_count: int, log) -> tuple[str, ...]:
    """The VQA head's classes of a VQAFolder: every answer that is the most common one of
    >= min_count training questions (train.py's --min_answer_count). The log also counts the
    questions none of whose human answers is a class: their soft-score target is all zero.
    A ValueError when no answer is common enough."""
    answers = corpus.answers(min_count)
    if not answers:
        raise ValueError(f"no answer is the most common one of >= {min_count} questions "
                         f"(--min_answer_count)")
    records = [r for rs in corpus.questions for r in rs]
    missed = count_unanswerable(records, answers)
    log(f"answer vocabulary: {len(answers):,} answers (the most common answer of >= {min_count} "
        f"questions); {missed:,} of {len(records):,} training questions "
        f"({100 * missed / len(records):.1f} %) have no answer in it")
    return answers
