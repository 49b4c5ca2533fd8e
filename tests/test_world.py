"""shared/world.py: the synthetic world is deterministic, true to its scenes, and in real formats.

Answers and truths are recomputed here from the scene's boxes and attributes with code written
independently of the world's own checker, so a bug in one is not hidden by the same bug in the
other.
"""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from shared.metrics import recall_at_k
from shared.world import (ANSWERS, CLASS_NAMES, COLOURS, DETECTOR_CLASSES, PALETTE, SHAPES, SIZES,
                          ClassificationWorld, Obj, Scene, World, WorldConfig, export_split,
                          is_true, parse_caption, relation_margin, render_scene,
                          retrieval_ceilings)

CONFIG = WorldConfig(seed=3, image_size=64, n_val=400, n_test=400, n_train=5000)


@pytest.fixture(scope="module")
def world():
    return World(CONFIG, "val")


@pytest.fixture(scope="module")
def examples(world):
    return [world.example(i, regions=False) for i in range(400)]


# --- independent truth: boxes and attributes only ----------------------------------------------

def holds(a: Obj, b: Obj, rel: str) -> int:
    """Pixels by which `a` is `rel` of `b` (>= 0: it holds): box edges, x2/y2 exclusive."""
    (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) = a.box, b.box
    return {"left": bx1 - ax2, "right": ax1 - bx2, "above": by1 - ay2, "below": ay1 - by2}[rel]


def fits(obj: Obj, size=None, colour=None, shape=None) -> bool:
    return all(v is None or v == getattr(obj, k)
               for k, v in (("size", size), ("colour", colour), ("shape", shape)))


REL_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above",
             "below": "below"}
RELATION = "|".join(REL_WORDS)  # a regex alternative
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]


def answer(question: str, objs: list[Obj]) -> str:
    """The answer of a template question, recomputed from the objects."""
    if m := re.fullmatch(r"what colour is the (?:(small|large) )?(\w+)", question):
        hits = [o for o in objs if fits(o, size=m[1], shape=m[2])]
        assert len(hits) == 1, question
        return hits[0].colour
    if m := re.fullmatch(r"what shape is the (?:(small|large) )?(\w+) object", question):
        hits = [o for o in objs if fits(o, size=m[1], colour=m[2])]
        assert len(hits) == 1, question
        return hits[0].shape
    if m := re.fullmatch(rf"what shape is ({RELATION}) the (\w+) (\w+)", question):
        refs = [o for o in objs if fits(o, colour=m[2], shape=m[3])]
        assert len(refs) == 1, question
        rel = REL_WORDS[m[1]]
        hits = [o for o in objs if o is not refs[0] and holds(o, refs[0], rel) >= 0]
        assert len(hits) == 1, question
        return hits[0].shape
    if question == "how many objects are there":
        return NUMBERS[len(objs)]
    if m := re.fullmatch(r"how many (\w+) objects are there", question):
        return NUMBERS[sum(o.colour == m[1] for o in objs)]
    if m := re.fullmatch(r"how many (\w+)s are there", question):
        return NUMBERS[sum(o.shape == m[1] for o in objs)]
    if m := re.fullmatch(r"is there an? (?:(small|large) )?(?:(\w+) )?(\w+)", question):
        shape = None if m[3] == "object" else m[3]
        return "yes" if any(fits(o, m[1], m[2], shape) for o in objs) else "no"
    raise AssertionError(f"not a template: {question}")


# --- config and determinism --------------------------------------------------------------------

def test_config_and_split_are_validated():
    for bad in [dict(image_size=16), dict(image_size=1024), dict(max_objects=0),
                dict(single_object_prob=1.5), dict(n_regions=0), dict(n_captions=0)]:
        with pytest.raises(ValueError):
            WorldConfig(**bad)
    with pytest.raises(ValueError, match="split"):
        World(WorldConfig(), "dev")
    assert len(World(CONFIG, "train")) == 5000 and len(World(CONFIG, "val")) == 400


def test_examples_are_pure_functions_of_seed_split_and_index(world):
    a = world.example(7)
    for i in (3, 100, 8):  # fetching other examples first changes nothing
        world.example(i)
    b = World(CONFIG, "val").example(7)  # nor does a fresh world
    for key in ("image", "features", "boxes", "conf", "cls_prob"):
        assert np.array_equal(a[key], b[key]), key
    assert a["captions"] == b["captions"] and a["questions"] == b["questions"]
    assert a["tags"] == b["tags"] and a["scene"] == b["scene"] == world.scene(7)
    # regions=False gives the same image, captions and questions
    c = world.example(7, regions=False)
    assert np.array_equal(c["image"], a["image"]) and c["captions"] == a["captions"]
    assert c["questions"] == a["questions"] and "features" not in c
    assert np.array_equal(world[7]["image"], a["image"])


def test_splits_and_seeds_give_different_examples():
    images = {(split, seed): World(WorldConfig(seed=seed), split).render(0)
              for split in ("train", "val", "test") for seed in (0, 1)}
    keys = list(images)
    for j in range(len(keys)):
        for k in range(j + 1, len(keys)):
            assert not np.array_equal(images[keys[j]], images[keys[k]]), (keys[j], keys[k])


# --- shapes, dtypes and ranges ----------------------------------------------------------------

@pytest.mark.parametrize("n_regions, feature_dim, max_objects", [(10, 64, 4), (2, 16, 4),
                                                                  (36, 2048, 6)])
def test_every_key_has_its_shape_dtype_and_range(n_regions, feature_dim, max_objects):
    config = WorldConfig(image_size=48, n_regions=n_regions, feature_dim=feature_dim,
                         max_objects=max_objects, n_captions=3, n_questions=5)
    world = World(config, "test")
    for i in range(20):
        ex = world.example(i)
        N = n_regions
        assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
        assert len(ex["captions"]) == 3 and len(ex["questions"]) == 5
        assert 1 <= len(ex["scene"].objects) <= max_objects
        assert ex["boxes"].shape == (N, 4) and ex["boxes"].dtype == np.float32
        assert ex["boxes"].min() >= 0 and ex["boxes"].max() <= 1
        assert (ex["boxes"][:, 2:] > ex["boxes"][:, :2]).all()  # x1 < x2, y1 < y2
        assert ex["features"].shape == (N, feature_dim) and ex["features"].dtype == np.float32
        assert ex["conf"].shape == (N,) and ex["conf"].dtype == np.float32
        assert (np.diff(ex["conf"]) <= 0).all()  # sorted by conf, descending
        assert ex["cls_prob"].shape == (N, len(DETECTOR_CLASSES))
        assert ex["cls_prob"].dtype == np.float32 and (ex["cls_prob"] >= 0).all()
        assert np.allclose(ex["cls_prob"].sum(1), 1, atol=1e-5)
        assert np.allclose(ex["conf"], 1 - ex["cls_prob"][:, 0], atol=1e-6)
        # tags: the best foreground class of each confident region, in conf order
        confident = ex["conf"] > 0.5
        best = [DETECTOR_CLASSES[1 + k] for k in ex["cls_prob"][confident, 1:].argmax(1)]
        assert ex["tags"] == best and set(ex["tags"]) <= set(SHAPES)
        for obj in ex["scene"].objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= 48 and 0 <= y1 < y2 <= 48


def test_vocabularies():
    assert len(SHAPES) == 6 and len(COLOURS) == 6 and SIZES == ("small", "large")
    assert len(CLASS_NAMES) == 36 and CLASS_NAMES[0] == "red circle"
    assert CLASS_NAMES[1] == "red square" and CLASS_NAMES[6] == "green circle"  # colour-major
    assert DETECTOR_CLASSES[0] == "background" and DETECTOR_CLASSES[1:] == SHAPES
    assert {"yes", "no", "zero", "four"} | set(COLOURS) | set(SHAPES) <= set(ANSWERS)
    assert len(set(ANSWERS)) == len(ANSWERS)


# --- images ------------------------------------------------------------------------------------

def test_background_is_not_flat(world):
    scene = Scene([], 64, background=(120, 110, 100), gradient=(30.0, -20.0), noise_offset=(5, 9))
    image = render_scene(scene, world.noise).astype(float)
    assert image.std(axis=(0, 1)).min() > 4  # noise and gradient
    assert image[:, -8:].mean() - image[:, :8].mean() > 15  # gradient across x
    empty = world.example(0)["image"]
    assert len(np.unique(empty.reshape(-1, 3), axis=0)) > 500


def test_objects_have_their_colour_and_sizes_differ(examples):
    palette = np.array([PALETTE[c] for c in COLOURS], float)  # (6, 3)
    right = total = 0
    extents = {"small": [], "large": []}
    for ex in examples[:200]:
        for obj in ex["scene"].objects:
            x1, y1, x2, y2 = obj.box
            cx, cy = (x1 + x2) // 2, (y1 + y2) // 2  # inside every shape
            pixel = ex["image"][cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(0)
            right += COLOURS[((palette - pixel) ** 2).sum(1).argmin()] == obj.colour
            total += 1
            extents[obj.size].append(max(x2 - x1, y2 - y1))
    assert right / total > 0.98
    assert max(extents["small"]) < 0.8 * min(extents["large"])  # sizes never overlap


def test_single_object_prob_one_makes_single_object_train_scenes_only():
    config = WorldConfig(single_object_prob=1.0)
    train, val = World(config, "train"), World(config, "val")
    assert all(len(train.scene(i).objects) == 1 for i in range(200))
    counts = [len(val.scene(i).objects) for i in range(200)]
    assert set(counts) == {1, 2, 3, 4}  # evaluation keeps the uniform mix


# --- captions ----------------------------------------------------------------------------------

def test_generated_captions_are_true_and_plain_words():
    for config in (WorldConfig(seed=1, image_size=32), WorldConfig(seed=2, max_objects=6)):
        world = World(config, "train")
        for i in range(1500):
            ex = world.example(i, regions=False)
            for caption in ex["captions"]:
                assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
                assert is_true(caption, ex["scene"]), (caption, ex["scene"].objects)


def test_captions_vary(examples):
    captions = [c for ex in examples for c in ex["captions"]]
    assert len(set(captions)) > 0.6 * len(captions)
    for pattern in [r" (to the left of|to the right of|above|below) ", r"^(two|three|four) \w+s",
                    r" and ", r"objects an? ", r"\b(small|large)\b", r"^there (is|are) "]:
        assert any(re.search(pattern, c) for c in captions), pattern


def test_stated_relations_clear_the_margin(examples):
    margin = relation_margin(CONFIG.image_size)
    seen = 0
    for ex in examples:
        objs = ex["scene"].objects
        for caption in ex["captions"]:
            for claim in parse_caption(caption):
                if claim[0] == "rel":
                    _, np_a, rel, np_b = claim
                    seen += 1
                    assert any(a is not b and fits(a, *np_a) and fits(b, *np_b)
                               and holds(a, b, rel) >= margin for a in objs for b in objs), caption
    assert seen > 50


def _swap(caption: str, old: str, new: str) -> str:
    return re.sub(rf"\b{old}\b", new, caption, count=1)


def test_perturbed_captions_are_false(examples):
    flips = {"to the left of": "to the right of", "to the right of": "to the left of",
             "above": "below", "below": "above"}
    checked = {"colour": 0, "shape": 0, "count": 0, "relation": 0}
    for ex in examples:
        objs = ex["scene"].objects
        absent_colours = [c for c in COLOURS if all(o.colour != c for o in objs)]
        absent_shapes = [s for s in SHAPES if all(o.shape != s for o in objs)]
        for caption in ex["captions"]:
            words = caption.split()
            if "no" not in words:  # an absent attribute makes any positive claim false
                colour = next((w for w in words if w in COLOURS), None)
                if colour and absent_colours:
                    assert not is_true(_swap(caption, colour, absent_colours[0]), ex["scene"])
                    checked["colour"] += 1
                shape = next((w for w in words if w.rstrip("s") in SHAPES), None)
                if shape and absent_shapes:
                    new = absent_shapes[0] + ("s" if shape.endswith("s") else "")
                    assert not is_true(_swap(caption, shape, new), ex["scene"]), caption
                    checked["shape"] += 1
            number = next((w for w in words if w in NUMBERS[2:]), None)
            if number:  # counts are exact
                other = NUMBERS[NUMBERS.index(number) + 1 if number != "six" else 5]
                assert not is_true(_swap(caption, number, other), ex["scene"]), caption
                checked["count"] += 1
            claims = parse_caption(caption)
            if len(claims) == 1 and claims[0][0] == "rel":
                _, np_a, rel, np_b = claims[0]
                unique = [sum(fits(o, *np_) for o in objs) == 1 for np_ in (np_a, np_b)]
                if all(unique):
                    words_rel = next(w for w in flips if f" {w} " in caption)
                    flipped = caption.replace(f" {words_rel} ", f" {flips[words_rel]} ")
                    assert not is_true(flipped, ex["scene"]), flipped
                    checked["relation"] += 1
    assert min(checked.values()) > 20, checked


def test_is_true_by_hand():
    objs = [Obj("circle", "red", "large", (2, 2, 20, 20)),
            Obj("star", "blue", "small", (40, 5, 50, 15)),
            Obj("star", "green", "small", (10, 40, 20, 50))]
    scene = Scene(objs, 64)
    for text in ["a red circle", "a large red circle", "there is a blue star", "an object",
                 "a red circle to the left of a blue star", "a red circle is above a green star",
                 "a blue star to the right of a circle", "two stars", "two small objects",
                 "no squares and a red circle",
                 "three objects a red circle a star and a green star",
                 "a star and a star", "one circle", "there are three objects", "no orange objects"]:
        assert is_true(text, scene), text
    for text in ["a blue circle", "a small red circle", "a red square", "three stars",
                 "a green star to the left of a red circle", "a blue star above a red circle",
                 "two objects a red circle and a star", "a circle and a circle", "no stars",
                 "three objects a red circle a star and a blue star and a star", "one star"]:
        assert not is_true(text, scene), text


@pytest.mark.parametrize("text", ["", "   ", "a", "a red", "red circle", "a red circle.",
                                  "a red circle and", "a a red circle", "a circle red",
                                  "a large small circle", "two circle", "one circles",
                                  "a red circle to the left of", "a red circle is", "objects",
                                  "there is", "the red circle", "a red circle near a blue star",
                                  "three objects", "a red circle!", "a 🐱", "\x00\n\t", None, 42])
def test_is_true_is_false_on_garbage(text):
    scene = Scene([Obj("circle", "red", "large", (2, 2, 20, 20))], 64)
    assert is_true(text, scene) is False  # ("three objects" parses, but the scene has one)


def test_is_true_never_raises_on_random_word_salad():
    rng = np.random.default_rng(0)
    vocab = (["a", "an", "and", "is", "there", "are", "no", "to", "the", "left", "right", "of",
              "above", "below", "object", "objects", "x", ""] + list(COLOURS) + list(SHAPES)
             + [s + "s" for s in SHAPES] + list(SIZES) + NUMBERS)
    scene = Scene([Obj("circle", "red", "large", (2, 2, 20, 20)),
                   Obj("star", "blue", "small", (30, 30, 40, 40))], 64)
    for _ in range(3000):
        words = rng.choice(vocab, size=rng.integers(0, 14))
        assert isinstance(is_true(" ".join(words), scene), bool)


# --- VQA ---------------------------------------------------------------------------------------

def test_vqa_answers_are_correct_and_in_the_vocabulary(examples):
    margin = relation_margin(CONFIG.image_size)
    kinds = {"colour": 0, "shape": 0, "relation": 0, "count": 0, "exists": 0}
    yes = zeros = 0
    for ex in examples:
        objs = ex["scene"].objects
        for question, given in ex["questions"]:
            assert given in ANSWERS and re.fullmatch(r"[a-z]+( [a-z]+)*", question)
            assert answer(question, objs) == given, (question, given, objs)
            if question.startswith("is there"):
                kinds["exists"] += 1
                yes += given == "yes"
            elif question.startswith("how many"):
                kinds["count"] += 1
                zeros += given == "zero"
            elif m := re.fullmatch(rf"what shape is ({RELATION}) the (\w+) (\w+)", question):
                kinds["relation"] += 1  # never borderline: clear answer, clear non-answers
                ref = next(o for o in objs if fits(o, colour=m[2], shape=m[3]))
                for o in objs:
                    if o is not ref:
                        assert abs(holds(o, ref, REL_WORDS[m[1]])) >= margin, question
            else:
                kinds["colour" if question.startswith("what colour") else "shape"] += 1
    assert min(kinds.values()) > 30, kinds
    assert 0.4 < yes / kinds["exists"] < 0.6  # existence is balanced
    assert zeros > 20  # counts include zero


# --- detector: boxes, features from pixels, a classifier that is right most of the time -------

def test_region_features_come_from_the_pixels(world):
    detector = world.detector
    scene = world.scene(0)
    image = world.render(scene)
    boxes = np.array([[2, 2, 20, 20], [40, 40, 60, 60]], np.float32)
    before = detector.features(image, boxes)  # (2, F)
    changed = image.copy()
    changed[5:15, 5:15] = (255, 0, 255)  # paint inside the first box only
    after = detector.features(changed, boxes)
    assert not np.allclose(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_classifier_finds_shapes_well_above_chance_but_not_always(world):
    right = total = 0
    for i in range(300):
        scene = world.scene(i)
        image = world.render(scene)
        rng = np.random.default_rng(i)
        boxes = world.detector.proposals(scene, rng, 10)  # the first rows: jittered object boxes
        cls_prob = world.detector.classify(world.detector.features(image, boxes))
        assert np.allclose(cls_prob.sum(1), 1, atol=1e-5) and (cls_prob >= 0).all()
        for k, obj in enumerate(scene.objects):
            right += DETECTOR_CLASSES[cls_prob[k].argmax()] == obj.shape
            total += 1
    accuracy = right / total
    assert 0.5 < accuracy < 0.97, accuracy  # chance is 1/6


def test_object_boxes_are_confident_and_background_boxes_are_not(world):
    confident = []
    for i in range(100):
        scene = world.scene(i)
        boxes = world.detector.proposals(scene, np.random.default_rng(i), 10)
        features = world.detector.features(world.render(scene), boxes)
        conf = 1 - world.detector.classify(features)[:, 0]
        confident += conf[:len(scene.objects)].tolist()
    assert np.median(confident) > 0.9
    empty = Scene([], 64, background=(100, 100, 100), gradient=(10.0, 5.0))
    image = render_scene(empty, world.noise)
    boxes = np.array([[0, 0, 20, 20], [30, 10, 60, 40], [5, 30, 25, 60]], np.float32)
    conf = 1 - world.detector.classify(world.detector.features(image, boxes))[:, 0]
    assert (conf < 0.5).all()


# --- classification view -----------------------------------------------------------------------

def test_classification_view_labels_match_the_rendered_object():
    cw = ClassificationWorld(CONFIG, "val")
    assert len(cw) == 400
    palette = np.array([PALETTE[c] for c in COLOURS], float)
    labels = []
    for i in range(400):
        image, label = cw.item(i)
        obj = cw.scene(i).objects[0]
        assert len(cw.scene(i).objects) == 1 and CLASS_NAMES[label] == f"{obj.colour} {obj.shape}"
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        x1, y1, x2, y2 = obj.box
        pixel = image[(y1 + y2) // 2, (x1 + x2) // 2].astype(float)
        assert COLOURS[((palette - pixel) ** 2).sum(1).argmin()] == obj.colour
        labels.append(label)
    assert set(labels) == set(range(36))
    again, label = ClassificationWorld(CONFIG, "val").item(17)
    assert np.array_equal(again, cw.item(17)[0]) and label == labels[17]
    world = World(CONFIG, "val")  # disjoint from the captioned examples
    assert all(not np.array_equal(cw.item(i)[0], world.render(i)) for i in range(20))


# --- export ------------------------------------------------------------------------------------

def test_export_round_trip(tmp_path):
    config = WorldConfig(image_size=32, n_regions=7, feature_dim=24, n_val=10)
    world = World(config, "val")
    out = export_split(world, tmp_path / "coco", n=4)
    data = json.loads((out / "captions_val.json").read_text())
    assert {"images", "annotations"} <= set(data)
    assert [im["id"] for im in data["images"]] == [0, 1, 2, 3]
    assert len(data["annotations"]) == 4 * config.n_captions
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for image_info in data["images"]:
        i = image_info["id"]
        assert {"id", "file_name", "height", "width"} <= set(image_info)
        assert image_info["file_name"] == f"{i:012d}.png"
        ex = world.example(i)
        png = np.asarray(Image.open(out / "images" / image_info["file_name"]).convert("RGB"))
        assert np.array_equal(png, ex["image"])
        captions = [a["caption"] for a in data["annotations"] if a["image_id"] == i]
        assert captions == ex["captions"]
        with np.load(out / "regions" / f"{i:012d}.npz") as npz:
            assert set(npz.files) == {"features", "boxes", "conf", "cls_prob", "tags", "image_hw"}
            assert npz["features"].dtype == np.float16 and npz["features"].shape == (7, 24)
            assert npz["boxes"].dtype == np.float32 and npz["boxes"].shape == (7, 4)
            assert npz["conf"].dtype == np.float32 and (np.diff(npz["conf"]) <= 0).all()
            assert npz["cls_prob"].dtype == np.float16 and npz["cls_prob"].shape == (7, 7)
            assert npz["tags"].dtype.kind == "U" and list(npz["tags"]) == ex["tags"]
            assert npz["image_hw"].dtype == np.int32 and npz["image_hw"].tolist() == [32, 32]
            assert np.allclose(npz["features"], ex["features"], rtol=1e-2, atol=1e-2)


# --- retrieval_ceilings ----------------------------------------------------------------------

def test_retrieval_ceilings_by_hand():
    # caption 0 fits images 0, 1; caption 1 only image 1: k = [2, 1], m = [1, 2]
    c = retrieval_ceilings([[True, True], [False, True]])
    assert c["t2i_truth_only"] == pytest.approx((1 / 2 + 1) / 2)
    assert c["i2t_truth_only"] == pytest.approx((1 + 1 / 2) / 2)
    assert c["i2t_specific"] == 1.0  # image 1 picks caption 1 (k 1) over caption 0 (k 2)
    assert c["t2i_specific"] == 1.0  # caption 0 picks image 0 (m 1) over image 1 (m 2)
    # everything true of everything: every candidate ties, both scorers guess among 3
    c = retrieval_ceilings(np.ones((3, 3), bool))
    assert all(v == pytest.approx(1 / 3) for v in c.values())
    # caption 0 fits every image: k = [3, 1, 1] and m = [1, 2, 2] differ, so t2i != i2t
    c = retrieval_ceilings([[1, 1, 1], [0, 1, 0], [0, 0, 1]])
    assert c["t2i_truth_only"] == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert c["i2t_truth_only"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert c["t2i_specific"] == 1.0 and c["i2t_specific"] == 1.0
    # k = [2, 1, 2], m = [2, 2, 1]: caption 0 ties between images 0 and 1 (m 2 each), image 0
    # between captions 0 and 2 (k 2 each); every other query has one best candidate, its own
    c = retrieval_ceilings([[1, 1, 0], [0, 1, 0], [1, 0, 1]])
    assert c["t2i_specific"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert c["i2t_specific"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    assert c["t2i_truth_only"] == pytest.approx(2 / 3)


def test_truth_only_ceiling_is_what_a_random_tie_breaking_scorer_gets_from_recall_at_k():
    """Scores = truth + small noise rank the true candidates first in random order; averaged over
    many draws, recall_at_k's R@1 of that scorer is the truth-only expectation."""
    rng = np.random.default_rng(0)
    truth = rng.random((12, 12)) < 0.3
    np.fill_diagonal(truth, True)
    expected = retrieval_ceilings(truth)
    draws = [recall_at_k(torch.tensor(truth.T + 0.5 * rng.random((12, 12))), torch.arange(12))
             for _ in range(4000)]  # scores (images, texts) = truth transposed
    assert np.mean([d["t2i_r1"] for d in draws]) == pytest.approx(expected["t2i_truth_only"],
                                                                  abs=0.01)
    assert np.mean([d["i2t_r1"] for d in draws]) == pytest.approx(expected["i2t_truth_only"],
                                                                  abs=0.01)


@pytest.mark.parametrize("truth, message", [
    ([[True, False], [False, False]], "diagonal must be True"),
    ([[True, True]], "square"),
    (np.zeros((0, 0), bool), "square"),
])
def test_retrieval_ceilings_refuses_a_bad_table(truth, message):
    with pytest.raises(ValueError, match=message):
        retrieval_ceilings(truth)
