"""infer.py on checkpoints that train.py writes here (2 steps each, tiny sizes): captions
for image files (CoCa, VirTex; also from a prompt) and region files (Oscar), CoCa zero-shot
classification and text-to-image ranking, as lines and as JSON, and one-line errors for misuse."""

import json
import shutil

import numpy as np
import pytest
import torch

import train
import infer
from shared.world import NUMBER_WORDS, World, WorldConfig, export_split

COCA = ["--model", "coca", "--batch_size", "4", "--vision_width", "32", "--vision_heads", "2",
        "--vision_layers", "1", "--text_width", "32", "--text_heads", "2", "--unimodal_layers",
        "1", "--multimodal_layers", "1", "--n_caption_queries", "4", "--embed_dim", "16",
        "--image_size", "32", "--final_n", "8"]
VIRTEX = ["--model", "virtex", "--batch_size", "4", "--image_size", "32", "--final_n", "8"]
OSCAR = ["--model", "oscar", "--task", "caption", "--batch_size", "4", "--hidden_size", "32",
         "--layers", "1", "--heads", "2", "--intermediate_size", "64", "--final_n", "8",
         "--max_gen_len", "6", "--beam_size", "2"]
SMALL_BERT = ["--batch_size", "4", "--hidden_size", "32", "--layers", "1", "--heads", "2",
              "--intermediate_size", "64", "--final_n", "8", "--task", "vqa"]
COMMON = ["--max_steps", "2", "--warmup_steps", "1", "--num_workers", "0", "--log_every_s", "0",
          "--tokenizer_texts", "50"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, args in (("coca", COCA), ("virtex", VIRTEX), ("oscar", OSCAR),
                       ("uniter_vqa", ["--model", "uniter", *SMALL_BERT]),
                       ("oscar_vqa", ["--model", "oscar", *SMALL_BERT]),
                       ("uniter", ["--model", "uniter", *SMALL_BERT[:-1], "retrieval",
                                   "--eval_pairs", "8"])):
        run, paper, overrides = train.parse_args(args + COMMON + ["--out", str(root / name)])
        train.train(run, paper, overrides, log=lambda line: None)
        out[name] = root / name / "best.pt"
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    out = tmp_path_factory.mktemp("files")
    export_split(World(WorldConfig(image_size=32, n_test=6), "test"), out, n=6)
    return out


def test_caption_image_files_with_coca_and_virtex(checkpoints, files, capsys):
    images = sorted((files / "images").glob("*.png"))[:3]
    for name in ("coca", "virtex"):
        results = infer.caption(checkpoints[name], images, [])
        assert [r["file"] for r in results] == [str(p) for p in images]
        assert all(isinstance(r["caption"], str) for r in results)
    infer.main(["caption", str(checkpoints["coca"]), *map(str, images), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert len(document["caption"]) == 3


def test_caption_continues_a_prompt(checkpoints, files, capsys):
    images = sorted((files / "images").glob("*.png"))[:2]
    for name in ("coca", "virtex"):
        results = infer.caption(checkpoints[name], images, [], prompt="one object")
        assert all(r["caption"].startswith("one object") for r in results), (name, results)
    infer.main(["caption", str(checkpoints["virtex"]), *map(str, images), "--prompt",
                "one object"])
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith(f"{images[0]}: one object")
    with pytest.raises(SystemExit, match="--prompt continues the caption of an image file"):
        infer.caption(checkpoints["oscar"], [], [images[0]], prompt="one object")


def test_caption_region_files_with_oscar(checkpoints, files, capsys):
    regions = sorted((files / "regions").glob("*.npz"))[:2]
    infer.main(["caption", str(checkpoints["oscar"]), "--regions", *map(str, regions)])
    lines = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == 2 and lines[0].startswith(f"{regions[0]}: ")
    with pytest.raises(SystemExit, match="give --regions"):
        infer.caption(checkpoints["oscar"], [regions[0]], [])


def test_classify_is_a_softmax_over_the_given_classes_best_first(checkpoints, files):
    image = sorted((files / "images").glob("*.png"))[0]
    classes = ["red circle", "blue star", "green square"]
    results = infer.classify(checkpoints["coca"], image, classes)
    assert sorted(r["class"] for r in results) == sorted(classes)
    probabilities = [r["probability"] for r in results]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_rank_orders_the_folder_by_similarity(checkpoints, files):
    paper, model, tokenizer, config, _ = infer.load(checkpoints["coca"])
    paths = sorted((files / "images").glob("*.png"))
    results = infer.rank(checkpoints["coca"], "a red circle", files / "images", top=4)
    assert len(results) == 4
    with torch.no_grad():  # the same scores computed directly
        image_emb = paper.embed_image_arrays(model, infer._images(paths, config.image_size))
        text_emb = model.embed_texts(tokenizer.encode_batch(["a red circle"], config.max_text_len))
    expected = (image_emb @ text_emb.T)[:, 0].argsort(descending=True)[:4].tolist()
    assert [r["file"] for r in results] == [str(paths[k]) for k in expected]


def test_misuse_gets_one_line(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match="needs image and text embeddings"):
        infer.classify(checkpoints["virtex"], tmp_path / "x.png", ["a"])
    with pytest.raises(SystemExit, match="no image file"):
        infer.caption(checkpoints["coca"], [tmp_path / "nothing.png"], [])
    with pytest.raises(SystemExit, match="no checkpoint"):
        infer.load(tmp_path / "none.pt")
    with pytest.raises(SystemExit, match="no folder"):
        infer.rank(checkpoints["coca"], "x", tmp_path / "missing", top=1)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("not an image")
    with pytest.raises(SystemExit, match="no image"):
        infer.rank(checkpoints["coca"], "x", tmp_path / "texts", top=1)


def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(checkpoints, tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    state = torch.load(checkpoints["coca"], weights_only=True)
    torch.save({**state, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="holds Python objects .*was not loaded"):
        infer.load(tmp_path / "evil.pt")
    assert not (tmp_path / "ran").exists()


def test_zeroshot_on_the_exported_classification_view_equals_the_world_evaluation(
        checkpoints, tmp_path, capsys):
    """The world's single-object images written as an image folder and read back: with the
    world's one template "a {}", infer.py zeroshot scores exactly what coca.zero_shot_accuracy
    scores in memory (PNG is lossless); the default ensemble gives its own top-1 and a top-5."""
    import coca
    from shared.world import CLASS_NAMES, export_classification

    paper, model, tokenizer, config, run = infer.load(checkpoints["coca"])
    world_config = train.make_world_config(paper, config, run["seed"])
    n = 300  # enough that every one of the 36 classes has an image (checked below)
    export_classification(world_config, "test", tmp_path / "folder", n)
    assert len(list((tmp_path / "folder").iterdir())) == len(CLASS_NAMES)
    ours = infer.zeroshot(checkpoints["coca"], tmp_path / "folder", ("a {}",))
    expected = coca.zero_shot_accuracy(model, tokenizer, config, world_config, "test", n)
    assert ours["images"] == n and ours["classes"] == 36
    assert ours["top1"] == pytest.approx(expected, abs=1e-9)
    assert ours["top1"] <= ours["top5"] <= 1
    infer.main(["zeroshot", str(checkpoints["coca"]), str(tmp_path / "folder"), "--json"])
    ensemble = json.loads(capsys.readouterr().out)["zeroshot"]
    assert ensemble["images"] == n and 0 <= ensemble["top1"] <= ensemble["top5"] <= 1
    (tmp_path / "folder" / "empty_class").mkdir()
    with pytest.raises(SystemExit, match="class folder 'empty_class' holds no image"):
        infer.zeroshot(checkpoints["coca"], tmp_path / "folder")
    with pytest.raises(SystemExit, match="needs image and text embeddings"):
        infer.zeroshot(checkpoints["virtex"], tmp_path / "folder")


def test_karpathy_on_the_exported_world_equals_the_world_evaluation(checkpoints, tmp_path):
    """The world's test split written as a Karpathy file and read back: the same captions and
    the same BLEU-4 / CIDEr-D / ROUGE-L as shared.evaluate.caption_metrics computes in memory
    with whole references (the world's captions are lower-case words without punctuation, so
    the COCO tokenisation leaves them as they are), the same retrieval recalls, and the COCO
    results JSON."""
    import coca
    from shared.evaluate import caption_metrics, grouped_retrieval, world_examples

    paper, model, tokenizer, config, run = infer.load(checkpoints["coca"])
    world_config = train.make_world_config(paper, config, run["seed"])
    n = 20
    export_split(World(world_config, "test"), tmp_path, n=n)
    ours = infer.karpathy(checkpoints["coca"], f"karpathy:{tmp_path / 'dataset_test.json'}",
                          results=tmp_path / "results.json")
    examples = world_examples(world_config, "test", n, regions=False)
    with torch.no_grad():
        captions = coca.caption_images(model, tokenizer, config, [ex["image"] for ex in examples])
        expected = caption_metrics(captions, examples, tokenizer, 10**6)
        recalls = grouped_retrieval(lambda a: coca.embed_image_arrays(model, a),
                                    lambda t: coca.embed_text_strings(model, tokenizer, config, t),
                                    examples, group=n)
    assert ours["images"] == n
    for key in ("bleu4", "cider", "rouge_l"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    for key, value in recalls.items():
        assert ours[f"{key}_all"] == pytest.approx(value, abs=1e-9) == ours[f"{key}_1k"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["image_id"] for r in saved] == list(range(n))
    assert [r["caption"] for r in saved] == captions
    virtex = infer.karpathy(checkpoints["virtex"], str(tmp_path / "dataset_test.json"), n=5)
    assert virtex["images"] == 5 and "cider" in virtex and "i2t_r1_all" not in virtex
    with pytest.raises(SystemExit, match="no image of split 'val'"):
        infer.karpathy(checkpoints["coca"], str(tmp_path / "dataset_test.json"), split="val")
    with pytest.raises(SystemExit, match="this oscar checkpoint is --task vqa"):
        infer.karpathy(checkpoints["oscar_vqa"], str(tmp_path / "dataset_test.json"))


@pytest.mark.parametrize("name", ["uniter_vqa", "oscar_vqa"])
def test_vqa_on_the_exported_world_equals_the_world_evaluation(checkpoints, tmp_path, name):
    """The world's test questions written as VQA v2 files (every answer given by 10
    annotators) and read back: the same predicted answers as the model gives in memory on the
    same regions (rounded to the export's float16), the same accuracy as the world evaluation
    (exact match = the server's accuracy with 10 equal answers), per answer type, and the
    results JSON."""
    from shared.evaluate import world_examples
    from shared.metrics import vqa_accuracy

    paper, model, tokenizer, config, run = infer.load(checkpoints[name])
    world_config = train.make_world_config(paper, config, run["seed"])
    n = 12
    export_split(World(world_config, "test"), tmp_path, n=n)
    spec = f"{tmp_path / 'vqa_questions_test.json'},{tmp_path / 'vqa_annotations_test.json'}"
    ours = infer.vqa(checkpoints[name], spec, results=tmp_path / "results.json", chunk=5)
    examples = world_examples(world_config, "test", n)
    for ex in examples:
        ex["features"] = ex["features"].astype(np.float16).astype(np.float32)
    with torch.no_grad():
        predicted = paper.answer_questions(model, tokenizer, config, examples, world_config)
    truth = [a for ex in examples for _, a in ex["questions"]]
    assert ours["questions"] == len(truth) == len(predicted) and ours["images"] == n
    assert ours["vqa_acc"] == pytest.approx(vqa_accuracy(predicted, [[a] * 10 for a in truth]))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["answer"] for r in saved] == predicted
    assert [r["question_id"] for r in saved] == list(range(len(truth)))
    kinds = {"yes/no": ("yes", "no"), "number": NUMBER_WORDS}
    for key, answers in kinds.items():
        rows = [k for k, a in enumerate(truth) if a in answers]
        if rows:
            assert ours[f"vqa_acc_{key.replace('/', '_')}"] == pytest.approx(
                vqa_accuracy([predicted[k] for k in rows], [[truth[k]] * 10 for k in rows]))


def test_vqa_errors_name_the_problem(checkpoints, tmp_path):
    export_split(World(WorldConfig(image_size=32, n_test=4), "test"), tmp_path, n=4)
    spec = f"{tmp_path / 'vqa_questions_test.json'},{tmp_path / 'vqa_annotations_test.json'}"
    (tmp_path / "regions" / f"{2:012d}.npz").unlink()
    with pytest.raises(SystemExit, match=f"its image has no region file .*{2:012d}.npz"):
        infer.vqa(checkpoints["uniter_vqa"], spec)
    with pytest.raises(SystemExit, match="needs a checkpoint that answers questions, not oscar "
                                         "--task caption"):
        infer.vqa(checkpoints["oscar"], spec)
    with pytest.raises(SystemExit, match="no VQA questions file"):
        infer.vqa(checkpoints["uniter_vqa"], str(tmp_path / "absent.json"))


@pytest.mark.parametrize("model", ["uniter", "oscar"])
def test_train_on_vqa_files_takes_the_answer_vocabulary_from_them(tmp_path, model):
    """train.py --data vqa:... --task vqa: the head's classes are the training answers (the
    most common answer of >= 9 questions), and infer.py vqa evaluates the checkpoint."""
    from shared.vqa import VQAFolder

    export_split(World(WorldConfig(image_size=32, n_test=40), "test"), tmp_path, n=40)
    spec = f"{tmp_path / 'vqa_questions_test.json'},{tmp_path / 'vqa_annotations_test.json'}"
    args = ["--model", model, *SMALL_BERT, *COMMON, "--data", f"vqa:{spec}",
            "--out", str(tmp_path / "run")]
    run, paper, overrides = train.parse_args(args)
    lines = []
    train.train(run, paper, overrides, log=lines.append)
    expected = VQAFolder.from_spec(f"vqa:{spec}").answers()
    assert 0 < len(expected) < 25  # fewer than the world's answers: a real cut
    _, model_, _, config, _ = infer.load(tmp_path / "run" / "best.pt")
    assert tuple(config.answers) == expected
    assert model_.heads["vqa"](torch.zeros(1, 32)).shape == (1, len(expected))
    assert any(f"answer vocabulary: {len(expected)} answers" in line for line in lines)
    metrics = infer.vqa(tmp_path / "run" / "best.pt", spec, n=5)
    assert metrics["images"] == 5 and 0 <= metrics["vqa_acc"] <= 1


def test_karpathy_with_region_models_equals_the_world_evaluation(checkpoints, tmp_path):
    """Oscar captions and UNITER cross-encoder retrieval on the exported world read back as a
    Karpathy file with its region files: the same captions and scores as in memory on the same
    regions (rounded to the export's float16); folds of 1,000 (COCO 1K) as the mean over groups;
    a missing region file named in one line."""
    import oscar
    import uniter
    from shared.evaluate import caption_metrics, world_examples
    from shared.metrics import recall_at_k

    n = 10
    _, _, _, config, run = infer.load(checkpoints["oscar"])
    world_config = train.make_world_config(oscar, config, run["seed"])
    export_split(World(world_config, "test"), tmp_path, n=n)
    examples = world_examples(world_config, "test", n)
    for ex in examples:
        ex["features"] = ex["features"].astype(np.float16).astype(np.float32)
    split = str(tmp_path / "dataset_test.json")
    ours = infer.karpathy(checkpoints["oscar"], split, results=tmp_path / "r.json")
    paper, model, tokenizer, config, _ = infer.load(checkpoints["oscar"])
    with torch.no_grad():
        captions = oscar.caption(model, tokenizer, config, examples, world_config)
    expected = caption_metrics(captions, examples, tokenizer, 10**6)
    for key in ("bleu4", "cider", "rouge_l"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    assert [r["caption"] for r in json.loads((tmp_path / "r.json").read_text())] == captions
    assert "i2t_r1_all" not in ours  # a caption checkpoint: no retrieval head
    ours = infer.karpathy(checkpoints["uniter"], split, group=4)
    paper, model, tokenizer, config, run = infer.load(checkpoints["uniter"])
    world_config = train.make_world_config(paper, config, run["seed"])
    texts = [c for ex in examples for c in ex["captions"][:5]]
    text_image = torch.tensor([k for k, ex in enumerate(examples) for _ in ex["captions"][:5]])
    with torch.no_grad():
        scores = uniter.retrieval_scores(model, tokenizer, config, examples, world_config, texts)
        folds = [recall_at_k(uniter.retrieval_scores(
            model, tokenizer, config, examples[s:s + 4], world_config, texts[5 * s:5 * s + 20]),
            torch.arange(min(4, n - s)).repeat_interleave(5)) for s in range(0, n, 4)]
    one_by_one = infer.karpathy(checkpoints["uniter"], split, group=4, pairs=1)  # an image a call
    for key, value in recall_at_k(scores, text_image).items():
        assert ours[f"{key}_all"] == pytest.approx(value, abs=1e-9), key
        assert one_by_one[f"{key}_all"] == pytest.approx(value, abs=1e-9), key
        assert ours[f"{key}_1k"] == pytest.approx(sum(f[key] for f in folds) / 3, abs=1e-9)
    assert ours["pairs_scored"] == n * 5 * n + (4 * 20 + 4 * 20 + 2 * 10)
    (tmp_path / "regions" / f"{3:012d}.npz").unlink()
    with pytest.raises(SystemExit, match=f"no region file .*{3:012d}.npz"):
        infer.karpathy(checkpoints["uniter"], split)


@pytest.mark.parametrize("name", ["coca", "virtex"])
def test_probe_on_image_folders_fits_the_frozen_features(checkpoints, tmp_path, name):
    """infer.py probe = shared.probe.probe_accuracy on the checkpoint's features of the folders'
    images (training rows in the seeded random order); images spread over the folder with
    --n_train; a validation class the training folder lacks is named in one line."""
    from shared.evaluate import image_batch
    from shared.folders import ImageFolder
    from shared.probe import probe_accuracy
    from shared.world import export_classification

    paper, model, tokenizer, config, run = infer.load(checkpoints[name])
    world_config = train.make_world_config(paper, config, run["seed"])
    export_classification(world_config, "train", tmp_path / "train", 400)
    export_classification(world_config, "test", tmp_path / "val", 30)
    ours = infer.probe(checkpoints[name], tmp_path / "train", tmp_path / "val")
    folders = [ImageFolder(tmp_path / s, config.image_size) for s in ("train", "val")]
    with torch.no_grad():
        embed = ((lambda ims: paper.embed_image_arrays(model, ims)) if name == "coca"
                 else (lambda ims: model.pooled_features(image_batch(ims, "cpu"))))
        x = [embed([f.item(i)[0] for i in range(len(f))]) for f in folders]
    y = [torch.tensor([folders[0].classes.index(f.classes[f.item(i)[1]]) for i in range(len(f))])
         for f in folders]
    order = torch.randperm(len(y[0]), generator=torch.Generator().manual_seed(0))
    expected = probe_accuracy(x[0][order], y[0][order], x[1], y[1], len(folders[0].classes))
    assert ours == {"train_images": 400, "val_images": 30, "classes": len(folders[0].classes),
                    "unreadable": 0, "top1": pytest.approx(expected, abs=1e-12)}
    assert infer.probe(checkpoints[name], tmp_path / "train", tmp_path / "val",
                       n_train=20, n=10)["train_images"] == 20
    (tmp_path / "val" / "purple_moon").mkdir()
    shutil.copy(next((tmp_path / "val").glob("*/*.png")), tmp_path / "val" / "purple_moon")
    with pytest.raises(SystemExit, match="class folder 'purple moon' is not a class of"):
        infer.probe(checkpoints[name], tmp_path / "train", tmp_path / "val")


def karpathy_file(tmp_path, world_config) -> str:
    """A Karpathy split file over two exports of the world: 12 train, 4 val, 6 test images."""
    images = []
    for part, n in (("train", 12), ("test", 10)):
        export_split(World(world_config, part), tmp_path / part, n=n)
        for k, image in enumerate(json.loads(
                (tmp_path / part / f"dataset_{part}.json").read_text())["images"]):
            image["filepath"] = f"{part}/images"
            image["split"] = "train" if part == "train" else ("val" if k < 4 else "test")
            images.append(image)
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": "world", "images": images}))
    return str(tmp_path / "dataset.json")


def test_train_on_a_karpathy_file_evaluates_on_val_then_test_and_eval_only_agrees(tmp_path):
    """--data karpathy: trains on train + restval, --eval_every evaluates on the val split, the
    final evaluation on the whole test split (captions and retrieval, as infer.py karpathy);
    --eval_only --init on the same file gives the same test metrics."""
    split = karpathy_file(tmp_path, WorldConfig(image_size=32))
    out = tmp_path / "run"
    run, paper, overrides = train.parse_args(COCA + COMMON + [
        "--data", f"karpathy:{split}", "--eval_every", "1", "--eval_n", "3", "--out", str(out)])
    train.train(run, paper, overrides, log=lambda line: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "val"), (2, "test")]
    assert {"cider", "bleu4", "rouge_l", "r1_mean", "i2t_r1_all"} <= set(rows[0])
    final = json.loads((out / "final.json").read_text())
    assert final["split"] == "test" and final["val_data"] == f"karpathy:{split}"
    direct = infer.karpathy(out / "latest.pt", split)
    assert direct["images"] == 6
    for key in ("cider", "bleu4", "rouge_l", "i2t_r1_all", "t2i_r5_all"):
        assert final[key] == pytest.approx(direct[key], abs=1e-9), key
    run, paper, overrides = train.parse_args(COCA + COMMON + [
        "--eval_only", "--init", str(out / "latest.pt"), "--val_data", f"karpathy:{split}"])
    train.train(run, paper, overrides, log=lambda line: None)
    again = json.loads((out / "eval" / "final.json").read_text())
    assert again["cider"] == pytest.approx(final["cider"], abs=1e-9)
    assert again["init"] == str(out / "latest.pt")


def test_train_on_vqa_files_evaluates_on_held_out_questions(tmp_path):
    """--data vqa: (training questions) with --val_data vqa: (held-out ones): periodic and final
    VQA accuracy per answer type, best.pt kept by vqa_acc."""
    world_config = WorldConfig(image_size=32)
    for part, n in (("train", 30), ("test", 6)):
        export_split(World(world_config, part), tmp_path / part, n=n)
    spec = lambda part: (f"vqa:{tmp_path / part / f'vqa_questions_{part}.json'},"
                         f"{tmp_path / part / f'vqa_annotations_{part}.json'}")
    out = tmp_path / "run"
    run, paper, overrides = train.parse_args(["--model", "oscar", *SMALL_BERT, *COMMON,
                                              "--data", spec("train"), "--val_data",
                                              spec("test"), "--eval_every", "1", "--out",
                                              str(out)])
    train.train(run, paper, overrides, log=lambda line: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] == ["val", "test"]
    assert "vqa_acc" in rows[0] and rows[1]["questions"] == 24
    assert json.loads((out / "final.json").read_text())["vqa_acc"] == rows[1]["vqa_acc"]
    assert (out / "best.pt").is_file()


@pytest.mark.parametrize("command, data", [("karpathy", "dataset.json"),
                                           ("vqa", "q.json,a.json,regions")])
def test_results_into_a_missing_folder_is_refused_before_the_evaluation(tmp_path, capsys,
                                                                        command, data):
    """--results is checked when the command starts: a path whose folder is missing (or a
    folder) must not cost a whole evaluation first. The checkpoint is never read."""
    for out, message in ((tmp_path / "no" / "r.json", "does not exist or is not writable"),
                         (tmp_path, "a folder, not a file")):
        with pytest.raises(SystemExit):
            infer.main([command, str(tmp_path / "missing.pt"), data, "--results", str(out)])
        assert message in capsys.readouterr().err


def test_caption_of_an_unreadable_or_missing_region_file_names_it(checkpoints, files, tmp_path):
    """A region file given by name is captioned itself or reported: a damaged one is one line
    naming it (not the next file's caption under its name, exit 0), a missing one too."""
    good = sorted((files / "regions").glob("*.npz"))[0]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(SystemExit, match=f"error: .*{bad}"):
        infer.caption(checkpoints["oscar"], [], [bad, good])
    with pytest.raises(SystemExit, match=f"error: no region file {tmp_path / 'none.npz'}"):
        infer.caption(checkpoints["oscar"], [], [good, tmp_path / "none.npz"])
    alone = infer.caption(checkpoints["oscar"], [], [good])
    assert infer.caption(checkpoints["oscar"], [], [good, good])[1] == alone[0]


@pytest.mark.parametrize("top", [0, -1])
def test_rank_refuses_a_top_below_1_before_reading_anything(tmp_path, capsys, top):
    # [:0] listed nothing and [:-1] dropped the last image without a word
    with pytest.raises(SystemExit, match=f"^error: --top must be at least 1, got {top}$"):
        infer.rank(tmp_path / "missing.pt", "x", tmp_path, top)
    with pytest.raises(SystemExit, match="--top must be at least 1"):
        infer.main(["rank", str(tmp_path / "missing.pt"), "x", str(tmp_path), "--top", str(top)])


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:60])  # the PNG header and part of IHDR


def _in_a_shared_class(root):
    """An image of a class folder that holds more than one: without it the class remains."""
    return next(images[0] for folder in sorted(root.iterdir())
                if len(images := sorted(folder.glob("*.png"))) > 1)


def test_zeroshot_skips_an_unreadable_image_names_it_and_counts_it(checkpoints, tmp_path,
                                                                   capsys):
    from shared.world import export_classification

    paper, model, tokenizer, config, run = infer.load(checkpoints["coca"])
    world_config = train.make_world_config(paper, config, run["seed"])
    export_classification(world_config, "test", tmp_path / "folder", 40)
    bad = _in_a_shared_class(tmp_path / "folder")
    shutil.copytree(tmp_path / "folder", tmp_path / "without")
    (tmp_path / "without" / bad.parent.name / bad.name).unlink()
    _truncate(bad)
    with pytest.warns(UserWarning, match=f"skipping an unreadable image \\(cannot read {bad}: "
                                         f".*\\); 1 skipped so far"):
        ours = infer.zeroshot(checkpoints["coca"], tmp_path / "folder", ("a {}",))
    expected = infer.zeroshot(checkpoints["coca"], tmp_path / "without", ("a {}",))
    assert ours == {**expected, "unreadable": 1} and ours["images"] == 39
    assert expected["unreadable"] == 0
    with pytest.warns(UserWarning, match=str(bad)):
        infer.main(["zeroshot", str(checkpoints["coca"]), str(tmp_path / "folder"), "--templates",
                    "a {}"])
    assert capsys.readouterr().out.strip().endswith(
        "; 1 unreadable images skipped (named in the warnings)")
    for image in (tmp_path / "without").glob("*/*.png"):
        _truncate(image)
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="none of its 39 images can "
                                                                   "be read"):
        infer.zeroshot(checkpoints["coca"], tmp_path / "without", ("a {}",))


def test_probe_skips_an_unreadable_image_names_it_and_counts_it(checkpoints, tmp_path, capsys,
                                                               monkeypatch):
    """With an unreadable image in each folder, the probe is fitted on exactly the features of
    the images it can read (probe_accuracy's inputs are recorded: the fit itself is tested
    above), and the count is in the result and its line."""
    from shared.world import export_classification

    fitted = []  # probe_accuracy's arguments, call by call
    monkeypatch.setattr("shared.probe.probe_accuracy",
                        lambda *args: fitted.append(args) or 0.5)
    paper, model, tokenizer, config, run = infer.load(checkpoints["virtex"])
    world_config = train.make_world_config(paper, config, run["seed"])
    export_classification(world_config, "train", tmp_path / "train", 200)
    export_classification(world_config, "test", tmp_path / "val", 60)
    for folder in (tmp_path / "val").iterdir():  # classes the training images lack: refused
        if not (tmp_path / "train" / folder.name).is_dir():
            shutil.rmtree(folder)
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-without")
    without = tmp_path.parent / f"{tmp_path.name}-without"
    bad = [_in_a_shared_class(tmp_path / part) for part in ("train", "val")]
    n_val = len(list((tmp_path / "val").glob("*/*.png")))
    for path in bad:
        (without / path.relative_to(tmp_path)).unlink()
        _truncate(path)
    with pytest.warns(UserWarning) as caught:
        ours = infer.probe(checkpoints["virtex"], tmp_path / "train", tmp_path / "val")
    named = [str(w.message) for w in caught if "skipping an unreadable image" in str(w.message)]
    assert len(named) == 2 and all(str(path) in line for path, line in zip(bad, named))
    expected = infer.probe(checkpoints["virtex"], without / "train", without / "val")
    assert ours == {**expected, "unreadable": 2}
    assert (ours["train_images"], ours["val_images"]) == (199, n_val - 1)
    for a, b in zip(fitted[0][:4], fitted[1][:4]):  # the same rows, in the same order
        assert torch.equal(a, b)
    with pytest.warns(UserWarning):
        infer.main(["probe", str(checkpoints["virtex"]), str(tmp_path / "train"),
                    str(tmp_path / "val")])
    assert capsys.readouterr().out.strip().endswith(
        "; 2 unreadable images skipped (named in the warnings)")


def test_a_fifo_given_by_name_is_one_line_not_a_hang(checkpoints, tmp_path):
    import os
    import signal

    def stop(*_):
        raise TimeoutError("blocked for 20 s: a FIFO was opened for reading")
    os.mkfifo(tmp_path / "x.png")
    os.mkfifo(tmp_path / "x.npz")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    try:
        with pytest.raises(SystemExit, match=f"^error: cannot read {tmp_path / 'x.png'}: not a "
                                             f"regular file \\(a FIFO\\)$"):
            infer._images([tmp_path / "x.png"], 32)
        with pytest.raises(SystemExit, match=f"^error: {tmp_path / 'x.npz'}: cannot be opened "
                                             f"\\(not a regular file \\(a FIFO\\)\\)$"):
            infer.caption(checkpoints["oscar"], [], [tmp_path / "x.npz"])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_rank_and_caption_skip_an_unreadable_image_naming_it(checkpoints, files, tmp_path):
    """Among several images, a damaged one (or a FIFO) is left out with a warning naming it;
    the others are ranked or captioned. One image alone that cannot be read is one line."""
    import os
    import shutil

    folder = tmp_path / "photos"
    shutil.copytree(files / "images", folder)
    bad = sorted(folder.glob("*.png"))[1]
    _truncate(bad)
    os.mkfifo(folder / "pipe.png")
    good = sorted(p for p in folder.glob("*.png") if p not in (bad, folder / "pipe.png"))
    with pytest.warns(UserWarning, match="skipping an unreadable image") as caught:
        results = infer.rank(checkpoints["coca"], "a red circle", folder, top=100)
    named = " ".join(str(w.message) for w in caught)
    assert str(bad) in named and str(folder / "pipe.png") in named
    assert sorted(r["file"] for r in results) == [str(p) for p in good]
    with pytest.warns(UserWarning, match=str(bad)):
        results = infer.caption(checkpoints["coca"], [good[0], bad, good[1]], [])
    assert [r["file"] for r in results] == [str(good[0]), str(good[1])]
    with pytest.raises(SystemExit, match=f"error: cannot read {bad}"):
        infer.caption(checkpoints["coca"], [bad], [])
