"""shared/folders.py: an image-caption corpus on disk behind the world's interface. The world
exported to COCO format reads back as the same examples and the same training items; every kind
of bad file named in the module docstring is handled as stated; train.py --data trains CoCa and
VirTex from the exported folder. Every file is written by the tests."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from shared.data import ImageTextDataset
from shared.folders import CaptionFolder, load_image
from shared.tokenizer import Tokenizer
from shared.world import World, WorldConfig, export_split

WORLD = WorldConfig(image_size=32, n_test=12)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    world = World(WORLD, "test")
    export_split(world, out, n=12)
    return world, out


def test_the_exported_world_reads_back_as_the_same_examples(exported):
    world, out = exported
    folder = CaptionFolder.coco(out / "captions_test.json", image_size=32)
    assert len(folder) == 12
    for i in range(12):
        ours, theirs = folder.example(i), world.example(i, regions=False)
        assert np.array_equal(ours["image"], theirs["image"])
        assert ours["captions"] == theirs["captions"]


def test_the_same_training_items_from_the_folder_and_the_world(exported):
    world, out = exported
    folder = CaptionFolder.coco(out / "captions_test.json", image_size=32)
    tokenizer = Tokenizer.train(folder.texts(), vocab_size=120)
    a, b = ImageTextDataset(folder, tokenizer, 16), ImageTextDataset(world, tokenizer, 16)
    b.epochs = a.epochs  # the folder's epoch order, read from the world
    for i in range(12):
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["tokens"], b[i]["tokens"])


def test_jsonl_gives_what_coco_gives(exported, tmp_path):
    _, out = exported
    coco = CaptionFolder.coco(out / "captions_test.json", image_size=32)
    lines = [json.dumps({"image": str(path), "captions": captions})
             for path, captions in coco.records]
    # absolute paths under the JSONL file's folder (one outside it is refused)
    (out / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = CaptionFolder.jsonl(out / "corpus.jsonl", image_size=32)
    assert jsonl.records == coco.records


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (40, 30), (200, 30, 60))
    image = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    array = load_image(path, 16)
    assert array.shape == (16, 16, 3) and array.dtype == np.uint8


def test_transparent_pixels_are_laid_on_black(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    image.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", 8).max() == 0


def test_resize_keeps_the_shorter_side_and_crops_the_centre(tmp_path):
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, 20:40] = 255  # a white band in the middle third
    Image.fromarray(image).save(tmp_path / "wide.png")
    array = load_image(tmp_path / "wide.png", 10)  # 20 x 60 -> 10 x 30 -> centre 10 x 10
    assert array.shape == (10, 10, 3) and array.min() > 200


@pytest.mark.parametrize("width, height", [(300, 217), (217, 300), (225, 224), (401, 250)])
def test_preprocessing_equals_open_clip_s_evaluation_transform(tmp_path, width, height):
    """load_image + image_to_tensor with CLIP's statistics against open_clip's own evaluation
    transform (torchvision's Resize(224, bicubic) + CenterCrop(224) + ToTensor + Normalize) on
    non-square photos-like images: a smooth field plus noise, so that an off-by-one resize or
    crop shows in every channel. Sizes where the long side truncates and the crop offset rounds
    half to even (401 x 250: 359.2 -> 359, offset 67.5 -> 68)."""
    import open_clip

    from shared.data import CLIP_MEAN, CLIP_STD, image_to_tensor

    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    field = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 200
    pixels = np.clip(field + rng.normal(0, 25, field.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    transform = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    with Image.open(tmp_path / "photo.png") as image:
        theirs = transform(image)  # (3, 224, 224)
    ours = image_to_tensor(load_image(tmp_path / "photo.png", 224), CLIP_MEAN, CLIP_STD)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()


def test_a_truncated_image_is_skipped_with_a_counted_warning(tmp_path):
    for k, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (16, 16), colour).save(tmp_path / f"{k}.png")
    data = (tmp_path / "0.png").read_bytes()
    (tmp_path / "0.png").write_bytes(data[:len(data) // 2])  # cut in half
    folder = CaptionFolder([(tmp_path / "0.png", ["red"]), (tmp_path / "1.png", ["green"])], 16)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        example = folder.example(0)
    assert example["captions"] == ["green"] and folder.unreadable == 1


def test_missing_keys_are_named_with_the_file(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}]}))
    with pytest.raises(ValueError, match=f"{path}: missing key 'annotations'"):
        CaptionFolder.coco(path)
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"images\[0\]: missing key 'file_name'"):
        CaptionFolder.coco(path)
    (tmp_path / "c.jsonl").write_text(json.dumps({"captions": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="line 1: missing key 'image'"):
        CaptionFolder.jsonl(tmp_path / "c.jsonl")


def test_empty_captions_missing_files_and_captionless_images_are_dropped_and_counted(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    folder = CaptionFolder([(tmp_path / "a.png", ["one", "  ", ""]),  # 2 empty captions
                            (tmp_path / "b.png", [" "]),  # no caption left: image dropped
                            (tmp_path / "gone.png", ["x"])], 8)  # no file: image dropped
    assert len(folder) == 1 and folder.records[0][1] == ["one"]
    assert folder.dropped_captions == 3 and folder.dropped_images == 2


def test_overlong_captions_keep_the_end_token(exported):
    world, _ = exported
    tokenizer = Tokenizer.train(world.example(0, regions=False)["captions"], vocab_size=100)
    tokens = tokenizer.encode(" ".join(["circle"] * 50), max_len=8)
    assert len(tokens) == 8 and tokens[-1] == tokenizer.sep_id


@pytest.mark.parametrize("model", ["coca", "virtex"])
def test_train_from_the_exported_folder(exported, tmp_path, model):
    _, out = exported
    args = ["--model", model, "--data", f"coco:{out / 'captions_test.json'}", "--batch_size", "4",
            "--max_steps", "2", "--warmup_steps", "1", "--num_workers", "0", "--log_every_s",
            "0", "--image_size", "32", "--out", str(tmp_path / model), "--vocab_size", "120"]
    if model == "coca":
        args += ["--vision_width", "32", "--vision_heads", "2", "--vision_layers", "1",
                 "--text_width", "32", "--text_heads", "2", "--unimodal_layers", "1",
                 "--multimodal_layers", "1", "--n_caption_queries", "4", "--embed_dim", "16"]
    lines = []
    run, paper, overrides = train.parse_args(args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unreadable image in the export
        final = train.train(run, paper, overrides, log=lines.append)
    assert final["images"] == 12 and final["step"] == 2 and final["dropped_images"] == 0
    assert any(line.startswith("--data coco:") for line in lines)
    assert (tmp_path / model / "best.pt").exists()


def karpathy_file(exported, tmp_path, splits, dataset="world") -> Path:
    """The exported world as a Karpathy split file: image i gets splits[i]."""
    _, out = exported
    coco = json.loads((out / "captions_test.json").read_text())
    images = [{"filepath": "images", "filename": image["file_name"], "split": split,
               "imgid": k, "sentences": [{"raw": a["caption"], "tokens": a["caption"].split()}
                                         for a in coco["annotations"]
                                         if a["image_id"] == image["id"]]}
              for k, (image, split) in enumerate(zip(coco["images"], splits))]
    (tmp_path / "dataset.json").write_text(json.dumps({"dataset": dataset, "images": images}))
    return tmp_path / "dataset.json"


def test_karpathy_trains_on_train_and_restval_and_counts_every_split(exported, tmp_path):
    from shared.folders import karpathy_count_warning, karpathy_split_counts

    splits = ["train"] * 6 + ["restval"] * 3 + ["val"] * 2 + ["test"]
    file = karpathy_file(exported, tmp_path, splits)
    assert karpathy_split_counts(file) == {"train": 6, "restval": 3, "val": 2, "test": 1}
    folder = CaptionFolder.karpathy(file, exported[1], image_size=32)
    coco = CaptionFolder.coco(exported[1] / "captions_test.json", image_size=32)
    assert folder.records == coco.records[:9]  # train + restval, in file order
    assert folder.notes == [f"{file}: train 6, restval 3, val 2, test 1 images; training on "
                            f"train + restval"]
    test = CaptionFolder.karpathy(file, exported[1], image_size=32, splits=("test",))
    assert test.records == coco.records[11:]
    assert karpathy_count_warning(file) is None  # not a dataset with published counts
    coco_named = karpathy_file(exported, tmp_path, splits, dataset="coco")
    warning = karpathy_count_warning(coco_named)
    assert "holds 9 / 2 / 1 train+restval / val / test images" in warning
    assert "113,287 / 5,000 / 5,000" in warning


def test_karpathy_bad_input_is_one_line_naming_the_file(exported, tmp_path):
    file = karpathy_file(exported, tmp_path, ["train"] * 11 + ["dev"])
    with pytest.raises(ValueError, match="dataset.json: unknown split 'dev'"):
        CaptionFolder.karpathy(file, exported[1], image_size=32)
    file = karpathy_file(exported, tmp_path, ["val"] * 12)
    with pytest.raises(ValueError, match="no image of split train \\+ restval"):
        CaptionFolder.karpathy(file, exported[1], image_size=32)
    (tmp_path / "bad.json").write_text(json.dumps({"images": [{"filename": "a.png",
                                                               "split": "train"}]}))
    with pytest.raises(ValueError, match="bad.json, images\\[0\\]: missing key 'sentences'"):
        CaptionFolder.karpathy(tmp_path / "bad.json")


def test_train_from_a_karpathy_file_logs_and_keeps_the_split_counts(exported, tmp_path):
    file = karpathy_file(exported, tmp_path, ["train"] * 8 + ["restval"] * 2 + ["val", "test"])
    args = ["--model", "virtex", "--data", f"karpathy:{file},{exported[1]}", "--batch_size",
            "4", "--max_steps", "2", "--warmup_steps", "1", "--num_workers", "0",
            "--log_every_s", "0", "--image_size", "32", "--resnet_width", "4", "--hidden_size",
            "32", "--heads", "2", "--feedforward_size", "64", "--out", str(tmp_path / "run"),
            "--vocab_size", "120"]
    lines = []
    run, paper, overrides = train.parse_args(args)
    final = train.train(run, paper, overrides, log=lines.append)
    assert final["images"] == 10
    assert any(line.endswith("train 8, restval 2, val 1, test 1 images; training on train + "
                             "restval") for line in lines)
    assert final["corpus_notes"] == [line for line in lines if "training on" in line]


def test_data_is_refused_for_region_models_and_bad_specs(tmp_path):
    for argv, message in [(["--model", "oscar", "--data", "jsonl:x"], "reads region features"),
                          (["--model", "coca", "--data", "tsv:x"], "must be coco:"),
                          (["--model", "coca", "--data", "jsonl:/nowhere.jsonl"], "no JSON-lines")]:
        run, paper, overrides = train.parse_args(argv + ["--out", str(tmp_path)])
        with pytest.raises(SystemExit, match=message):
            train.train(run, paper, overrides, log=lambda line: None)


# --- region folders (Oscar, UNITER) ------------------------------------------------------------

def test_the_exported_regions_read_back(exported):
    from shared.folders import RegionFolder

    world, out = exported
    folder = RegionFolder.coco(out / "captions_test.json")
    assert len(folder) == 12
    for i in range(12):
        ours, theirs = folder.example(i), world.example(i)
        assert ours["captions"] == theirs["captions"] and ours["tags"] == theirs["tags"]
        assert np.array_equal(ours["boxes"], theirs["boxes"])
        assert np.array_equal(ours["conf"], theirs["conf"])
        # the export stores features and cls_prob as float16
        assert np.allclose(ours["features"], theirs["features"], rtol=1e-3, atol=1e-3)
        assert np.allclose(ours["cls_prob"], theirs["cls_prob"], atol=1e-3)


def test_region_rows_are_sorted_by_confidence_and_bad_files_skipped(tmp_path):
    from shared.folders import RegionFolder

    np.savez(tmp_path / "a.npz", features=np.arange(6.0).reshape(3, 2), conf=np.array([.1, .9, .5]),
             boxes=np.zeros((3, 4)))
    np.savez(tmp_path / "b.npz", features=np.zeros((2, 2)), boxes=np.zeros((2, 4)))  # no conf
    (tmp_path / "c.npz").write_bytes(b"not a zip file")
    folder = RegionFolder([(tmp_path / "a.npz", ["x"]), (tmp_path / "b.npz", ["y"]),
                           (tmp_path / "c.npz", ["z"]), (tmp_path / "gone.npz", ["w"])])
    assert len(folder) == 3 and folder.dropped_images == 1
    a = folder.example(0)
    assert a["conf"].tolist() == pytest.approx([.9, .5, .1])
    assert a["features"][:, 0].tolist() == [2.0, 4.0, 0.0] and a["tags"] == []
    with pytest.warns(UserWarning, match="no 'conf'"):
        assert folder.example(1)["captions"] == ["x"]  # b and c unreadable: wraps to a
    assert folder.unreadable == 2


def test_a_region_folder_without_any_of_the_images_is_named(exported, tmp_path):
    from shared.folders import RegionFolder

    _, out = exported
    captions = out / "captions_test.json"
    absent = tmp_path / "absent"
    with pytest.raises(ValueError) as e:
        RegionFolder.coco(captions, absent)
    assert str(e.value) == (f"{captions}: no region file in {absent}/ for any of its 12 images "
                            f"(expected {absent}/<file_name stem>.npz); there is no folder "
                            f"{absent}")
    with pytest.raises(ValueError, match="for any of its 12 images") as e:
        RegionFolder.coco(captions, out / "images")  # a folder, but of images
    assert "there is no folder" not in str(e.value)
    run, paper, overrides = train.parse_args(["--model", "uniter", "--data",
                                              f"regions:{captions},{absent}",
                                              "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="no region file in .*absent/ for any of its 12"):
        train.train(run, paper, overrides, log=lambda line: None)


@pytest.mark.parametrize("model", ["oscar", "uniter"])
def test_train_from_the_exported_regions(exported, tmp_path, model):
    _, out = exported
    args = ["--model", model, "--data", f"regions:{out / 'captions_test.json'}",
            "--batch_size", "4", "--max_steps", "2", "--warmup_steps", "1", "--num_workers", "0",
            "--log_every_s", "0", "--out", str(tmp_path / model), "--hidden_size", "32",
            "--layers", "1", "--heads", "2", "--intermediate_size", "64", "--image_size", "32"]
    if model == "uniter":
        args += ["--ipot_iters", "2"]
    lines = []
    run, paper, overrides = train.parse_args(args)
    final = train.train(run, paper, overrides, log=lines.append)
    assert final["images"] == 12 and final["step"] == 2
    run, paper, overrides = train.parse_args(["--model", model, "--data", "coco:x.json",
                                              "--out", str(tmp_path / "no")])
    with pytest.raises(SystemExit, match="reads region features"):
        train.train(run, paper, overrides, log=lines.append)


def test_a_run_reports_the_unreadable_images_its_workers_skipped(exported, tmp_path):
    _, out = exported
    copy = tmp_path / "copy"
    (copy / "images").mkdir(parents=True)
    for png in (out / "images").glob("*.png"):
        (copy / "images" / png.name).write_bytes(png.read_bytes())
    (copy / "captions_test.json").write_text((out / "captions_test.json").read_text())
    bad = copy / "images" / "000000000003.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    args = ["--model", "coca", "--data", f"coco:{copy / 'captions_test.json'}", "--batch_size",
            "4", "--max_steps", "3", "--warmup_steps", "1", "--num_workers", "1",
            "--log_every_s", "0", "--image_size", "32", "--out", str(tmp_path / "run"),
            "--vocab_size", "120", "--vision_width", "32", "--vision_heads", "2",
            "--vision_layers", "1", "--text_width", "32", "--text_heads", "2",
            "--unimodal_layers", "1", "--multimodal_layers", "1", "--n_caption_queries", "4",
            "--embed_dim", "16"]
    run, paper, overrides = train.parse_args(args)
    final = train.train(run, paper, overrides, log=lambda line: None)  # image 3 is in step 0
    assert final["unreadable_files"] == 1
    logged = (tmp_path / "run" / "unreadable.txt").read_text().split()
    assert set(logged) == {str(bad)}  # once per read of it, by the worker


def region_copy(out: Path, dest: Path, change) -> Path:
    """The exported captions and region files in `dest`, each file's arrays through change(i,
    arrays); returns the captions file."""
    (dest / "regions").mkdir(parents=True)
    for i, npz in enumerate(sorted((out / "regions").glob("*.npz"))):
        with np.load(npz) as f:
            np.savez(dest / "regions" / npz.name, **change(i, dict(f)))
    (dest / "captions_test.json").write_text((out / "captions_test.json").read_text())
    return dest / "captions_test.json"


TINY_REGION_MODEL = ["--batch_size", "4", "--warmup_steps", "1", "--log_every_s", "0",
                     "--hidden_size", "32", "--layers", "1", "--heads", "2",
                     "--intermediate_size", "64", "--ipot_iters", "2"]


def test_uniter_fine_tunes_on_regions_without_class_scores_and_says_what_mrc_needs(exported,
                                                                                tmp_path):
    _, out = exported  # grid features or a detector without class scores: no cls_prob
    captions = region_copy(out, tmp_path / "data", lambda i, a: {k: v for k, v in a.items()
                                                                 if k != "cls_prob"})
    common = ["--model", "uniter", "--data", f"regions:{captions}", "--max_steps", "2",
              "--num_workers", "0", *TINY_REGION_MODEL]
    for task in ("retrieval", "pretrain"):
        extra = ["--mix_mrc", "0", "--mix_mrc_kl", "0"] if task == "pretrain" else []
        run, paper, overrides = train.parse_args(
            [*common, "--task", task, *extra, "--out", str(tmp_path / task)])
        assert train.train(run, paper, overrides, log=lambda line: None)["step"] == 2
    run, paper, overrides = train.parse_args([*common, "--out", str(tmp_path / "mrc")])
    with pytest.raises(SystemExit, match="needs each region file's cls_prob"):
        train.train(run, paper, overrides, log=lambda line: None)


@pytest.mark.parametrize("model", ["oscar", "uniter"])
def test_a_run_on_region_files_is_evaluated_with_the_statistics_it_trained_with(exported,
                                                                                tmp_path, model):
    # features far from the world's (x 10 + 5): standardise_features must use the corpus's mean
    # and std in training and in every evaluation of the checkpoint, not the world's
    import infer

    from shared.folders import RegionFolder

    _, out = exported
    captions = region_copy(out, tmp_path / "data", lambda i, a: {
        **a, "features": (a["features"].astype(np.float32) * 10 + 5).astype(np.float16)})
    extra = ["--ipot_iters", "2"] if model == "uniter" else []
    args = ["--model", model, "--task", "retrieval", "--data", f"regions:{captions}",
            "--max_steps", "2", "--num_workers", "0", *TINY_REGION_MODEL[:-2], *extra,
            "--out", str(tmp_path / "run")]
    train.train(*train.parse_args(args), log=lambda line: None)
    paper, _, _, config, run = infer.load(tmp_path / "run" / "latest.pt")
    corpus = RegionFolder.coco(captions, tmp_path / "data" / "regions")
    mean, std = corpus.feature_statistics()
    assert config.standardise_features
    np.testing.assert_allclose(config.feature_mean, mean.numpy())
    np.testing.assert_allclose(config.feature_std, std.numpy())
    examples = [corpus.example(i) for i in range(3)]
    world_config = train.make_world_config(paper, config, run["seed"])
    if model == "uniter":
        got = paper.region_batch(examples, config, world_config, torch.device("cpu"))[0]
        expected = [paper.region_inputs(ex, config, (mean, std))["features"] for ex in examples]
    else:
        got = paper.region_batch(examples, config, world_config, torch.device("cpu"))[0]
        expected = [paper.region_inputs(ex, config, (mean, std)) for ex in examples]
    for b, rows in enumerate(expected):
        torch.testing.assert_close(got[b, :len(rows)], rows)
    # and a fine-tuning run from it keeps them
    tuned = ["--model", model, "--task", "retrieval", "--init", str(tmp_path / "run" / "latest.pt"),
             "--data", f"regions:{out / 'captions_test.json'}", "--max_steps", "1",
             "--num_workers", "0", *TINY_REGION_MODEL[:-2], *extra, "--out", str(tmp_path / "ft")]
    train.train(*train.parse_args(tuned), log=lambda line: None)
    assert infer.load(tmp_path / "ft" / "latest.pt")[3].feature_mean == config.feature_mean


def test_a_near_constant_dimension_is_standardised_to_bounded_values(tmp_path):
    # dimension 7 is 0 on the first 5 images (a ReLU channel they never light up), 2 later: with
    # std floored at 1e-6 its z-score there was 2e6
    from shared.folders import STD_FLOOR, RegionFolder, floored_std

    rng = np.random.default_rng(0)
    records = []
    for i in range(10):
        features = rng.normal(size=(3, 8)).astype(np.float32)  # (N, F)
        features[:, 7] = 0.0 if i < 5 else 2.0
        np.savez(tmp_path / f"{i}.npz", features=features, boxes=np.zeros((3, 4)),
                 conf=np.ones(3))
        records.append((tmp_path / f"{i}.npz", ["x"]))
    folder = RegionFolder(records)
    mean, std = folder.feature_statistics(n=5)
    z = (folder.example(7)["features"] - mean.numpy()) / std.numpy()  # (3, 8)
    assert np.abs(z).max() < 100
    raw = np.concatenate([folder.example(i)["features"] for i in range(5)]).std(0)  # (8,)
    floor = STD_FLOOR * np.median(raw)
    assert folder.near_constant == (1, pytest.approx(floor))
    np.testing.assert_allclose(std.numpy(), np.maximum(raw, floor), rtol=1e-6)  # the rest as is
    assert folder.most_regions(n=5) == 3
    # over half the dimensions constant: the floor is a tenth of the mean std; all: 0.1
    assert floored_std(np.array([0.0, 0.0, 0.0, 2.0]))[1] == pytest.approx(0.05)
    assert floored_std(np.zeros(4))[1] == pytest.approx(0.1)


def test_a_run_names_near_constant_dimensions_and_regions_its_model_drops(exported, tmp_path):
    import re

    _, out = exported
    captions = region_copy(out, tmp_path / "data", lambda i, a: {  # dimension 63 constant
        **a, "features": np.concatenate([a["features"][:, :63],
                                         np.zeros_like(a["features"][:, :1])], 1)})
    args = ["--model", "oscar", "--task", "retrieval", "--data", f"regions:{captions}",
            "--n_regions", "6", "--max_steps", "1", "--num_workers", "0",
            *TINY_REGION_MODEL[:-2], "--out", str(tmp_path / "run")]
    lines = []
    train.train(*train.parse_args(args), log=lines.append)
    assert ("the region files hold up to 10 regions (first 12 files); the model keeps n_regions "
            "= 6: raise --n_regions to use them all") in lines
    floored = [line for line in lines if line.startswith("feature standardisation")]
    assert len(floored) == 1 and re.fullmatch(
        r"feature standardisation: 1 of 64 dimensions near-constant \(std < (\S+)\) on the first "
        r"12 images; their std is floored at \1", floored[0]), floored


@pytest.mark.parametrize("standardise", ["true", "false"])
def test_a_region_file_that_does_not_fit_stops_the_run_in_one_line(exported, tmp_path,
                                                                  standardise):
    # files 1.. have 16-d features, file 0 64-d ones. With standardise_features the statistics
    # read them before training; without, a loader worker reads one in step 1 (the dataset
    # checks file 0 only), and the run must end with the worker's message, not its traceback,
    # and not hang at exit waiting for it.
    _, out = exported
    captions = region_copy(out, tmp_path / "data", lambda i, a: {
        **a, "features": a["features"][:, :16]} if i >= 1 else a)
    args = ["--model", "uniter", "--task", "retrieval", "--data", f"regions:{captions}",
            "--max_steps", "3", "--num_workers", "1", "--standardise_features", standardise,
            *TINY_REGION_MODEL, "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "train.py", *args], cwd=Path(train.__file__).parent,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    if standardise == "true":
        assert last == (f"error: --data: {tmp_path / 'data' / 'regions' / '000000000001.npz'} "
                        f"has 16-d features, the files before it 64-d; one corpus, one feature "
                        f"size")
    else:
        assert last == ("error: a training batch: the regions have 16-d features but "
                        "feature_dim is 64")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("model", ["oscar", "uniter"])
def test_the_same_region_items_from_the_folder_and_the_world(exported, model):
    import importlib

    from shared.folders import RegionFolder

    world, out = exported
    paper = importlib.import_module(model)
    folder = RegionFolder.coco(out / "captions_test.json")
    tokenizer = Tokenizer.train([c for _, cs in folder.records for c in cs], vocab_size=120)
    config = paper.Config(hidden_size=32, layers=1, heads=2, intermediate_size=64,
                          feature_dim=64, n_regions=10, batch_size=4, image_size=32,
                          n_region_classes=7, grad_accum_steps=1) \
        if model == "uniter" else paper.Config(hidden_size=32, layers=1, heads=2,
                                               intermediate_size=64, feature_dim=64,
                                               n_regions=10, batch_size=4, image_size=32)
    a = paper.train_dataset(folder, tokenizer, config)
    b = paper.train_dataset(world, tokenizer, config)
    b.epochs = a.epochs  # the folder's epoch order, read from the world
    for i in range(8):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]) and x[key].is_floating_point():
                assert torch.allclose(x[key], y[key], atol=2e-3), key  # float16 in the export
            elif torch.is_tensor(x[key]):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


@pytest.mark.parametrize("model", ["oscar", "uniter"])
def test_cross_encoder_retrieval_on_val_data_is_capped_at_eval_pairs(exported, tmp_path, model):
    # every image with every caption is n · 5n forward passes (5M for 1,000 images): training
    # evaluates among the first eval_pairs images, and says so
    _, out = exported
    spec = f"regions:{out / 'captions_test.json'}"
    extra = ["--ipot_iters", "2"] if model == "uniter" else []
    args = ["--model", model, "--task", "retrieval", "--data", spec, "--val_data", spec,
            "--eval_pairs", "4", "--max_steps", "1", "--num_workers", "0",
            *TINY_REGION_MODEL[:-2], *extra, "--out", str(tmp_path / "run")]
    final = train.train(*train.parse_args(args), log=lambda line: None)
    assert final["retrieval_images"] == 4
    assert final["pairs_scored"] == 4 * 4 * 5  # 4 images x their 20 captions


def _png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


def test_inside_keeps_names_under_the_root_and_refuses_the_rest(tmp_path):
    from shared.folders import inside
    assert inside(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"
    assert inside(tmp_path, str(tmp_path / "c.png")) == tmp_path / "c.png"
    assert inside(tmp_path, "a/../c.png") == tmp_path / "a/../c.png"
    for name in ["../x.png", "a/../../x.png", "/etc/passwd", str(tmp_path) + "-other/x.png"]:
        with pytest.raises(ValueError, match="where: .* is outside"):
            inside(tmp_path, name, "where")


def test_a_coco_file_name_outside_the_image_folder_is_refused(tmp_path):
    _png(tmp_path / "secret.png")
    _png(tmp_path / "data" / "images" / "a.png")
    for name in ["../secret.png", str(tmp_path / "secret.png")]:
        (tmp_path / "data" / "c.json").write_text(json.dumps(
            {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": name}],
             "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}]}))
        with pytest.raises(ValueError, match=r"c\.json, images\[1\]: .*secret\.png.* is outside"):
            CaptionFolder.coco(tmp_path / "data" / "c.json", image_size=8)


def test_a_coco_file_name_outside_is_refused_for_region_files_too(tmp_path):
    from shared.folders import RegionFolder
    (tmp_path / "regions").mkdir()
    (tmp_path / "regions" / "x.npz").write_bytes(b"")
    (tmp_path / "c.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "../x.jpg"}],
         "annotations": [{"image_id": 1, "caption": "y"}]}))
    with pytest.raises(ValueError, match=r"images\[0\]: '\.\./x\.jpg' is outside"):
        RegionFolder.coco(tmp_path / "c.json")


def test_a_jsonl_image_outside_its_folder_is_refused(tmp_path):
    _png(tmp_path / "secret.png")
    _png(tmp_path / "data" / "a.png")
    for name in ["../secret.png", str(tmp_path / "secret.png")]:
        (tmp_path / "data" / "c.jsonl").write_text(
            json.dumps({"image": "a.png", "captions": ["x"]}) + "\n"
            + json.dumps({"image": name, "captions": ["y"]}) + "\n")
        with pytest.raises(ValueError, match=r"c\.jsonl, line 2: .* is outside"):
            CaptionFolder.jsonl(tmp_path / "data" / "c.jsonl", image_size=8)


def test_a_karpathy_path_outside_the_image_root_is_refused(tmp_path):
    from shared.folders import karpathy_split
    _png(tmp_path / "secret.png")
    _png(tmp_path / "data" / "val" / "a.png")
    for record in [{"filepath": "..", "filename": "secret.png"},
                   {"filepath": "val", "filename": "../../secret.png"},
                   {"filename": str(tmp_path / "secret.png")}]:
        images = [{"filepath": "val", "filename": "a.png"}, record]
        for image in images:
            image.update(split="train", sentences=[{"raw": "a dog"}])
        (tmp_path / "data" / "k.json").write_text(json.dumps({"images": images}))
        with pytest.raises(ValueError, match=r"k\.json, images\[1\]: .* is outside"):
            CaptionFolder.karpathy(tmp_path / "data" / "k.json", image_size=8)
        with pytest.raises(ValueError, match=r"k\.json, images\[1\]: .* is outside"):
            karpathy_split(tmp_path / "data" / "k.json", None, "train")


def _bomb_png(path: Path, width: int = 30000, height: int = 30000) -> Path:
    """A real PNG of width x height 1-bit pixels, all black: a few KB on disk, width x height x 3
    bytes once decoded as RGB."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    compress = zlib.compressobj(9)
    data = b"".join(compress.compress(row * 1000) for _ in range(height // 1000))
    data += compress.compress(row * (height % 1000)) + compress.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))
    return path


def _damaged_header_png(path: Path) -> Path:
    """A valid PNG whose IHDR declares a width of 0: Pillow raises SyntaxError on it."""
    Image.new("RGB", (16, 16), (10, 20, 30)).save(path)
    data = bytearray(path.read_bytes())
    data[16:20] = bytes(4)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("size", [(30000, 30000), (10000, 9000)])
def test_a_decompression_bomb_is_an_os_error_naming_the_file(tmp_path, size):
    """30,000 x 30,000 is beyond twice Pillow's limit (DecompressionBombError, no OSError);
    10,000 x 9,000 is between the limit and twice it, where Pillow only warns."""
    bomb = _bomb_png(tmp_path / "bomb.png", *size)
    assert bomb.stat().st_size < 200_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does a DecompressionBombWarning escape
        with pytest.raises(OSError, match=f"cannot read {bomb}"):
            load_image(bomb, 32)
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's global is left alone


def test_a_damaged_header_is_an_os_error_naming_the_file(tmp_path):
    damaged = _damaged_header_png(tmp_path / "damaged.png")
    with pytest.raises(OSError, match=f"cannot read {damaged}"):
        load_image(damaged, 32)


def test_bombs_and_damaged_headers_are_skipped_and_counted_by_the_folders(tmp_path):
    from shared.folders import ImageFolder

    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "good.png")
    bad = [_bomb_png(tmp_path / "bomb.png"), _damaged_header_png(tmp_path / "damaged.png")]
    folder = CaptionFolder([(bad[0], ["bomb"]), (bad[1], ["damaged"]),
                            (tmp_path / "good.png", ["green"])], 16)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        example = folder.example(0)
    assert example["captions"] == ["green"] and folder.unreadable == 2
    for k, path in enumerate(bad):
        (tmp_path / "classes" / f"c{k}").mkdir(parents=True)
        path.rename(tmp_path / "classes" / f"c{k}" / path.name)
        images = ImageFolder(tmp_path / "classes", 16)
    for i, (path, _) in enumerate(images.items):
        with pytest.raises(OSError, match=f"cannot read {path}"):
            images.item(i)


def test_extract_and_infer_name_a_bomb_or_a_damaged_header_and_a_resume_goes_on(tmp_path):
    import extract
    import infer

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(images / "a.png")
    _bomb_png(images / "b.png")
    _damaged_header_png(images / "c.png")
    out = tmp_path / "regions"
    for run in range(2):  # the second run resumes: the skipped files are skipped again
        summary = extract.extract_regions(images, out, "grid:1", random_weights=0, image_size=64)
        assert (summary["written"] + summary["already_written"], summary["unreadable"]) == (1, 2)
        named = (out / "unreadable.txt").read_text().splitlines()
        assert {line.split("\t")[0] for line in named} == {str(images / "b.png"),
                                                           str(images / "c.png")}
    for name in ("b.png", "c.png"):
        with pytest.raises(SystemExit, match=f"error: cannot read {images / name}"):
            infer._images([images / "a.png", images / name], 32)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_greyscale_is_converted_by_its_range(tmp_path, mode):
    gradient = (np.arange(256, dtype=np.uint32) * 257).reshape(1, 256).repeat(256, axis=0)
    if mode == "I":
        image = Image.fromarray(gradient.astype(np.int32), mode="I")
    else:
        dtype = "<u2" if mode == "I;16" else ">u2"
        image = Image.frombuffer(mode, (256, 256), gradient.astype(dtype).tobytes(), "raw", mode,
                                 0, 1)
    from shared.folders import to_rgb

    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (256, 256, 3)
    assert (rgb == np.arange(256, dtype=np.uint8)[None, :, None]).all()  # value >> 8
    if mode == "I;16":
        image.save(tmp_path / "g16.png")
        with Image.open(tmp_path / "g16.png") as saved:
            assert saved.mode.startswith("I")
        row = load_image(tmp_path / "g16.png", 8)[4, :, 0].astype(int)
        assert (np.diff(row) > 0).all() and row[0] < 32 and row[-1] > 223  # follows the ramp


def _peak_rss_of_loading(path: Path, size: int) -> int:
    """Bytes the peak resident set grows by while load_image reads `path`, in a fresh process."""
    code = ("import resource, sys; from shared.folders import load_image; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            f"load_image({str(path)!r}, {size}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[1])
    return int(done.stdout) * 1024  # ru_maxrss is in KiB on Linux


def test_an_extreme_aspect_ratio_costs_about_the_output(tmp_path):
    Image.new("RGB", (4000, 1), (0, 255, 0)).save(tmp_path / "line.png")
    assert _peak_rss_of_loading(tmp_path / "line.png", 224) < 50 * 2**20  # was ~600 MB
    assert (load_image(tmp_path / "line.png", 224) == (0, 255, 0)).all()


@pytest.mark.parametrize("width, height", [(2000, 37), (37, 2000)])
def test_an_extreme_aspect_ratio_gives_nearly_torchvision_s_pixels(tmp_path, width, height):
    y, x = np.mgrid[0:height, 0:width]
    field = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 250
    Image.fromarray(field.astype(np.uint8)).save(tmp_path / "long.png")
    with Image.open(tmp_path / "long.png") as image:
        longer = int(224 * max(width, height) / min(width, height))
        resized = np.asarray(image.resize((224, longer) if width < height else (longer, 224),
                                          Image.BICUBIC)).astype(int)
    start = int(round((longer - 224) / 2.0))
    theirs = resized[start:start + 224] if width < height else resized[:, start:start + 224]
    assert np.abs(load_image(tmp_path / "long.png", 224).astype(int) - theirs).max() <= 2


# --- hostile names and values: FIFOs, captions of the wrong type --------------------------------

@pytest.fixture
def deadline():
    """A test that could block (open() of a FIFO waits for a writer) fails after 20 s instead
    of hanging: SIGALRM raises TimeoutError in the blocked call."""
    import signal

    def stop(*_):
        raise TimeoutError("blocked for 20 s: a FIFO was opened for reading")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_fifo_is_refused_unopened_wherever_images_and_region_files_are_read(tmp_path,
                                                                            deadline):
    import os

    from shared.folders import ImageFolder, RegionFolder

    _png(tmp_path / "classes" / "red" / "a.png")
    fifo = tmp_path / "classes" / "red" / "b.png"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match=f"cannot read {fifo}: not a regular file \\(a FIFO\\)"):
        load_image(fifo, 8)
    images = ImageFolder(tmp_path / "classes", 8)
    assert [p.name for p, _ in images.items] == ["a.png", "b.png"]
    with pytest.raises(OSError, match=f"^cannot read {fifo}: not a regular file"):
        images.item(1)
    os.mkfifo(tmp_path / "r.npz")
    with pytest.raises(ValueError, match=f"{tmp_path / 'r.npz'}: cannot be opened \\(not a "
                                         f"regular file \\(a FIFO\\)\\)"):
        RegionFolder([(tmp_path / "classes" / "red" / "a.png", ["x"])]).read(tmp_path / "r.npz")
    # a COCO file naming a FIFO: no file, dropped at the start; one put there later (the
    # folder was listed before) is an unreadable image, skipped and counted
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "images" / "c.png")
    os.mkfifo(tmp_path / "images" / "b.png")
    (tmp_path / "c.json").write_text(json.dumps(
        {"images": [{"id": k, "file_name": f"{name}.png"} for k, name in enumerate("abc")],
         "annotations": [{"image_id": k, "caption": "x"} for k in range(3)]}))
    folder = CaptionFolder.coco(tmp_path / "c.json", image_size=8)
    assert len(folder) == 2 and folder.dropped_images == 1
    (tmp_path / "images" / "c.png").unlink()
    os.mkfifo(tmp_path / "images" / "c.png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*c.png .*not a regular file"):
        assert folder.example(1)["captions"] == ["x"]  # c is skipped: a is read instead
    assert folder.unreadable == 1


@pytest.mark.parametrize("raw", [12, None, ["a dog"]])
def test_a_karpathy_sentence_that_is_not_a_string_is_one_line_at_the_start(exported, tmp_path,
                                                                          raw):
    from shared.folders import karpathy_split

    file = karpathy_file(exported, tmp_path, ["train"] * 6 + ["test"] * 6)
    data = json.loads(file.read_text())
    data["images"][7]["sentences"][1]["raw"] = raw
    file.write_text(json.dumps(data))
    name = data["images"][7]["filename"]
    message = (f"{file}, images\\[7\\] \\({name}\\), sentences\\[1\\]: 'raw' must be a string, "
               f"got ")
    with pytest.raises(ValueError, match=message):
        CaptionFolder.karpathy(file, exported[1], image_size=32)
    with pytest.raises(ValueError, match=message):
        karpathy_split(file, exported[1], "test")
    run, paper, overrides = train.parse_args(
        ["--model", "virtex", "--val_data", f"karpathy:{file},{exported[1]}", "--image_size",
         "32", "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit, match="--val_data: .*'raw' must be a string"):
        train.train(run, paper, overrides, log=lambda line: None)


@pytest.mark.parametrize("caption", [12, None, ["x"], {"text": "x"}])
def test_a_caption_that_is_not_a_string_is_one_line_naming_its_record(tmp_path, caption):
    _png(tmp_path / "images" / "a.png")
    (tmp_path / "c.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png"}],
         "annotations": [{"image_id": 1, "caption": "a dog"},
                         {"image_id": 1, "caption": caption}]}))
    with pytest.raises(ValueError, match=r"c\.json, annotations\[1\]: 'caption' must be a "
                                         r"string, got "):
        CaptionFolder.coco(tmp_path / "c.json", image_size=8)
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "images/a.png",
                                                  "captions": ["a dog", caption]}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl, line 1: 'captions' must be a list of "
                                         r"strings, item 1 is "):
        CaptionFolder.jsonl(tmp_path / "c.jsonl", image_size=8)
    (tmp_path / "c.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": None}], "annotations": []}))
    with pytest.raises(ValueError, match=r"c\.json, images\[0\]: 'file_name' must be a string, "
                                         r"got null"):
        CaptionFolder.coco(tmp_path / "c.json", image_size=8)


def test_the_evaluation_reader_calls_a_fifo_not_a_regular_file_and_never_opens_it(tmp_path):
    import os

    from shared.benchmarks import _read_examples

    fifo = tmp_path / "a.png"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=f"not a regular file {fifo}"):
        _read_examples([{"path": fifo, "captions": ["x"]}], regions=False, image_size=32)
    with pytest.raises(ValueError, match="no image file"):
        _read_examples([{"path": tmp_path / "b.png", "captions": ["x"]}], False, 32)
