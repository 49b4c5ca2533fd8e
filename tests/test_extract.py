"""shared/roi.py and extract.py: RoIAlign against a one-sample-at-a-time loop of its definition,
hand-worked values and (where it imports) torchvision.ops.roi_align; the torchvision ResNet-50
name map; region files from the exported world read back by RegionFolder."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import extract
import virtex
from shared.folders import RegionFolder
from shared.roi import box_features, roi_align, roi_align_loop
from shared.world import World, WorldConfig, export_split
from tests.filesystems import tmpfs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The images are small: one thread is fastest, and on a busy machine two OpenMP threads
    can spin against another process for 10x the time of a ResNet-50 pass at 32 x 32."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _torchvision():
    """torchvision if it imports beside this torch (a wheel built for another torch fails to
    import with a RuntimeError, not an ImportError), else None."""
    try:
        import torchvision
        return torchvision
    except Exception:
        return None


def random_boxes(K: int, n_images: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    """(K, 5) boxes in pixels, some beyond the image, some tiny, one empty."""
    g = torch.Generator().manual_seed(seed)
    corners = torch.rand(K, 4, generator=g) * torch.tensor([W, H, W, H]) * 1.4 - 0.2 * torch.tensor(
        [W, H, W, H])
    x1, x2 = corners[:, 0].minimum(corners[:, 2]), corners[:, 0].maximum(corners[:, 2])
    y1, y2 = corners[:, 1].minimum(corners[:, 3]), corners[:, 1].maximum(corners[:, 3])
    boxes = torch.stack([torch.randint(0, n_images, (K,), generator=g).float(), x1, y1, x2, y2], 1)
    boxes[0, 3:] = boxes[0, 1:3]  # an empty box
    boxes[1, 3:] = boxes[1, 1:3] + 0.3  # a tiny one
    return boxes


# --- RoIAlign ----------------------------------------------------------------------------------

@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_roi_align_equals_the_loop_of_its_definition(aligned, sampling_ratio):
    x = torch.randn(3, 4, 9, 13, dtype=torch.float64)
    boxes = random_boxes(30, 3, 9 * 4, 13 * 4).double()  # pixels of a 4x larger image
    out = roi_align(x, boxes, (3, 5), 0.25, sampling_ratio, aligned)
    assert out.shape == (30, 4, 3, 5) and out.dtype == torch.float64
    torch.testing.assert_close(out, roi_align_loop(x, boxes, (3, 5), 0.25, sampling_ratio,
                                                   aligned), rtol=0, atol=1e-12)


def test_roi_align_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)
    box = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])  # the whole 2x2 image
    # aligned: the box spans -0.5 .. 1.5 in cell coordinates; one sample at its centre (0.5, 0.5)
    # is the mean of the four cells
    assert roi_align(x, box, 1, 1.0, 1, aligned=True).item() == pytest.approx(1.5)
    # 2x2 bins, one sample each at the cell centres 0 and 1: the map itself
    torch.testing.assert_close(roi_align(x, box, 2, 1.0, 1, aligned=True), x)
    # not aligned: the box spans 0 .. 2; bin centres 0.5 and 1.5; 1.5 is past the last cell,
    # which then counts alone: rows (0.5 -> 1, 1.5 -> 2) columns likewise
    expected = torch.tensor([[[[1.5, 2.0], [2.5, 3.0]]]])
    torch.testing.assert_close(roi_align(x, box, 2, 1.0, 1, aligned=False), expected)
    # a sample more than one cell outside the map is 0
    far = torch.tensor([[0.0, -10.0, -10.0, -8.0, -8.0]])
    assert roi_align(x, far, 1, 1.0, 1, aligned=True).item() == 0.0


def test_roi_align_refuses_boxes_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"\(K, 5\) rows of \(batch index"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(3, 4), 2)


@pytest.mark.skipif(_torchvision() is None, reason="torchvision does not import beside this torch")
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_equals_torchvision(aligned, sampling_ratio):
    tv = _torchvision()
    x = torch.randn(2, 8, 14, 11)
    boxes = random_boxes(50, 2, 14 * 16, 11 * 16, seed=1)
    ours = roi_align(x, boxes, 7, 1 / 16, sampling_ratio, aligned)
    theirs = tv.ops.roi_align(x, boxes, 7, 1 / 16, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_box_features_average_the_roi_aligned_bins():
    grid = torch.randn(2, 6, 4, 4)
    boxes = [torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.5, 0.75, 1.0]]),
             torch.tensor([[0.1, 0.1, 0.4, 0.3]])]
    feats = box_features(grid, boxes, image_size=128)
    assert [f.shape for f in feats] == [(2, 6), (1, 6)]
    rows = torch.tensor([[1, 0.1 * 128, 0.1 * 128, 0.4 * 128, 0.3 * 128]])
    expected = roi_align_loop(grid, rows, 7, 4 / 128, -1, True).mean((2, 3)).float()
    torch.testing.assert_close(feats[1], expected, rtol=0, atol=1e-5)


# --- The backbone ------------------------------------------------------------------------------

def test_torchvision_names_load_with_fc_dropped_and_module_prefix_stripped():
    source = virtex.ResNet(virtex.Config.paper())
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["module.fc.weight"], state["module.fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    loaded = extract.resnet_from_torchvision(state)
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_state_dict_of_another_network_is_named_in_one_line():
    state = virtex.ResNet(virtex.Config.paper()).state_dict()
    del state["layer4.2.conv3.weight"]
    with pytest.raises(ValueError, match=r"1 keys missing \(e.g. \['layer4.2.conv3.weight'\]\)"):
        extract.resnet_from_torchvision(state)
    state = virtex.ResNet(virtex.Config.paper()).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)  # a 3x3 stem: same names, another shape
    with pytest.raises(ValueError, match="not a ResNet-50: conv1.weight is"):
        extract.resnet_from_torchvision(state)


@pytest.mark.skipif(_torchvision() is None, reason="torchvision does not import beside this torch")
def test_torchvision_resnet50_weights_give_torchvision_layer4():
    tv = _torchvision()
    torch.manual_seed(0)
    reference = tv.models.resnet50().eval()
    for m in reference.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            torch.nn.init.normal_(m.weight, 1, 0.1)
    ours = extract.resnet_from_torchvision(reference.state_dict()).eval().double()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)
    body = torch.nn.Sequential(*list(reference.children())[:-2]).double()  # up to layer4
    with torch.no_grad():  # in float64, so that only a wrong weight could differ
        torch.testing.assert_close(ours(x), body(x), rtol=1e-9, atol=1e-9)


def test_no_weights_stops_and_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(SystemExit, match="nothing is downloaded"):
        extract.load_backbone("", "", False)
    with pytest.raises(SystemExit, match="only one of"):
        extract.load_backbone("w.pth", "", True)
    (tmp_path / "bad.pth").write_bytes(b"not torch")
    with pytest.raises(SystemExit, match="--backbone_weights .*bad.pth"):
        extract.load_backbone(str(tmp_path / "bad.pth"), "", False)


# --- The command on the exported world ---------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    export_split(World(WorldConfig(image_size=64), "test"), out, 12)
    return out


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    """A torchvision-format weights file of a random ResNet-50 (the tests never download)."""
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.manual_seed(0)
    torch.save(virtex.ResNet(virtex.Config.paper()).state_dict(), path)
    return path


def test_grid_regions_are_read_back_and_equal_the_backbone_features(exported, tiny_backbone,
                                                                     tmp_path):
    out = tmp_path / "grid"
    summary = extract.extract_regions(exported / "captions_test.json", out, "grid:2",
                                      backbone_weights=str(tiny_backbone), image_size=64,
                                      batch_size=5)
    assert (summary["written"], summary["feature_dim"], summary["unreadable"]) == (12, 2048, 0)
    assert json.loads((out / "extract.json").read_text())["written"] == 12
    corpus = RegionFolder.coco(exported / "captions_test.json", out)
    assert len(corpus) == 12
    ex = corpus.example(3)
    assert ex["features"].shape == (5, 2048) and ex["tags"] == [] and "cls_prob" not in ex
    np.testing.assert_allclose(ex["boxes"][:2], [[0, 0, 1, 1], [0, 0, 0.5, 0.5]])
    # the stored features are the ResNet's grid RoIAligned in those boxes (to float16)
    resnet = extract.resnet_from_torchvision(torch.load(tiny_backbone)).eval()
    x, hw, _ = extract.read_image(exported / "images" / "000000000003.png", 64)
    assert hw == (64, 64)
    with torch.no_grad():
        expected = box_features(resnet(x[None]), [torch.from_numpy(ex["boxes"])], 64)[0]
    np.testing.assert_allclose(ex["features"], expected.numpy(), rtol=2e-3, atol=2e-3)
    assert not list(out.glob("*.tmp"))


def test_instance_boxes_give_tags_and_one_hot_classes(exported, tiny_backbone, tmp_path):
    out = tmp_path / "gt"
    extract.extract_regions(exported / "captions_test.json", out,
                            f"instances:{exported / 'instances_test.json'}",
                            backbone_weights=str(tiny_backbone), image_size=64)
    world = World(WorldConfig(image_size=64), "test")
    for i in range(12):
        z = np.load(out / f"{i:012d}.npz")
        objects = world.scene(i).objects
        assert list(z["tags"]) == [o.shape for o in objects]
        np.testing.assert_allclose(z["boxes"][:-1] * 64, [o.box for o in objects])
        assert z["conf"].tolist() == [1.0] * len(objects) + [0.0]
        categories = [c["name"] for c in json.loads(
            (exported / "instances_test.json").read_text())["categories"]]
        assert [categories[c - 1] for c in z["cls_prob"].argmax(1)[:-1]] == list(z["tags"])
        assert z["cls_prob"][-1].tolist() == [1.0] + [0.0] * len(categories)


def test_json_boxes_resume_and_unreadable_images(exported, tiny_backbone, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes((exported / "images" / f"{i:012d}.png").read_bytes())
    (images / "broken.jpg").write_bytes(b"not an image")
    detections = {"0.png": [{"box": [0, 0, 32, 32], "score": 0.4, "label": "circle"},
                            {"box": [16, 16, 64, 70], "score": 0.9, "label": "star"}],
                  "1.png": [{"box": [8, 8, 40, 40]}], "2.png": []}
    (tmp_path / "det.json").write_text(json.dumps(detections))
    out = tmp_path / "regions"
    summary = extract.extract_regions(images, out, f"json:{tmp_path / 'det.json'}",
                                      backbone_weights=str(tiny_backbone), image_size=64)
    assert (summary["written"], summary["no_boxes"], summary["unreadable"]) == (2, 2, 1)
    assert "broken.jpg" in (out / "unreadable.txt").read_text()
    z = np.load(out / "0.npz")
    assert z["conf"].tolist() == pytest.approx([0.9, 0.4]) and list(z["tags"]) == ["star", "circle"]
    np.testing.assert_allclose(z["boxes"][0], [0.25, 0.25, 1.0, 1.0])  # clipped to the image
    assert np.load(out / "1.npz")["conf"].tolist() == [1.0]
    before = (out / "0.npz").stat().st_mtime_ns
    again = extract.extract_regions(images, out, f"json:{tmp_path / 'det.json'}",
                                    backbone_weights=str(tiny_backbone), image_size=64)
    assert (again["written"], again["already_written"]) == (0, 2)
    assert (out / "0.npz").stat().st_mtime_ns == before


def test_bad_command_lines_are_one_line_errors(exported, tmp_path):
    for boxes, message in [("grid:0", "grid side S >= 1"), ("boxes", "grid:S, instances:FILE"),
                           (f"instances:{exported / 'captions_test.json'}", "not a COCO instances"),
                           (f"json:{tmp_path / 'none.json'}", "--boxes json:")]:
        with pytest.raises(SystemExit, match=message):
            extract.extract_regions(exported / "captions_test.json", tmp_path / "o", boxes,
                                    random_weights=True)
    with pytest.raises(SystemExit, match="no such folder or file"):
        extract.extract_regions(tmp_path / "nowhere", tmp_path / "o", random_weights=True)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").mkdir()
    for name in ("a/x.png", "a/x/x.jpg"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SystemExit, match="would both write x.npz"):
        extract.extract_regions(tmp_path / "a", tmp_path / "o", random_weights=True)


def test_random_weights_take_a_seed_and_leave_the_callers_generator_alone(exported, tmp_path):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seed3 = extract.weights_sha256(extract.load_backbone("", "", 3)[0])
    assert torch.equal(torch.get_rng_state(), state)
    assert extract.weights_sha256(extract.load_backbone("", "", 3)[0]) == seed3  # one network
    seed0 = extract.weights_sha256(extract.load_backbone("", "", True)[0])
    assert seed0 != seed3 and len(seed0) == 16
    assert extract.random_seed(0) == extract.random_seed(True) == 0
    assert extract.random_seed(False) is extract.random_seed(None) is None
    source = str(exported / "captions_test.json")
    for flags, seed, weights in [(["--random_weights"], 0, seed0),
                                 (["--random_weights", "3"], 3, seed3)]:
        out = tmp_path / f"seed{seed}"
        extract.main(["regions", source, str(out), *flags, "--boxes", "grid:1", "--image_size",
                      "32", "--n", "1"])
        record = json.loads((out / "extract.json").read_text())
        assert (record["random_weights"], record["weights_sha256"]) == (seed, weights)
        assert (record["boxes"], record["image_size"], record["written"]) == ("grid:1", 32, 1)


def test_a_folder_of_another_extraction_is_refused_before_anything_is_written(
        exported, tmp_path, monkeypatch):
    source, out = exported / "captions_test.json", tmp_path / "regions"

    def run(n=2, **kwargs):
        return extract.extract_regions(source, out, **{"boxes": "grid:1", "random_weights": 0,
                                                       "image_size": 32, "n": n, **kwargs})

    def snapshot():
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}

    first = run()
    assert first["written"] == 2 and first["boxes"] == "grid:1"
    before = snapshot()
    for kwargs, differ in [(dict(random_weights=1), "weights_sha256"), (dict(boxes="grid:2"),
                           "boxes grid:1; this run uses boxes grid:2"),
                           (dict(image_size=64), "image_size 32; this run uses image_size 64")]:
        with pytest.raises(SystemExit, match=f"^error: {out} was extracted with {differ}.*: use "
                                             f"another folder or delete it$"):
            run(n=4, **kwargs)
        assert snapshot() == before
    again = run(n=3)  # the same settings: resumes
    assert (again["written"], again["already_written"]) == (1, 2)
    # an interrupted run left its settings: a resume with other weights is refused
    calls = []

    def interrupted(path, arrays):
        calls.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "write_npz_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract.extract_regions(source, tmp_path / "cut", "grid:1", random_weights=5,
                                image_size=32, n=2)
    monkeypatch.undo()
    (tmp_path / "cut" / "000000000000.npz").write_bytes((out / "000000000000.npz").read_bytes())
    with pytest.raises(SystemExit, match="weights_sha256"):
        extract.extract_regions(source, tmp_path / "cut", "grid:1", random_weights=6,
                                image_size=32, n=2)
    # .npz files with no extract.json: unknown settings, refused; a folder without any: free
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.npz").write_bytes((out / "000000000000.npz").read_bytes())
    with pytest.raises(SystemExit, match=r"holds \.npz files but no extract\.json"):
        extract.extract_regions(source, foreign, "grid:1", random_weights=0, image_size=32, n=1)
    assert sorted(p.name for p in foreign.iterdir()) == ["x.npz"]
    (foreign / "x.npz").unlink()
    assert extract.extract_regions(source, foreign, "grid:1", random_weights=0, image_size=32,
                                   n=1)["written"] == 1


def test_a_folder_is_listed_in_natural_order(tmp_path):
    for name in ("img10.png", "img2.png", "img1.png", "img02.png", "a/img3.png", "a/img20.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    _, names = extract.list_images(tmp_path, "")
    assert names == ["a/img3.png", "a/img20.png", "img1.png", "img02.png", "img2.png",
                     "img10.png"]


def test_a_virtex_checkpoint_gives_its_backbone_and_image_size(exported, tmp_path):
    import infer
    import train

    args = ["--model", "virtex", "--batch_size", "4", "--image_size", "32", "--final_n", "4",
            "--max_steps", "2", "--warmup_steps", "1", "--num_workers", "0", "--log_every_s", "0",
            "--tokenizer_texts", "50", "--out", str(tmp_path / "run")]
    train.train(*train.parse_args(args), log=lambda line: None)
    checkpoint = tmp_path / "run" / "best.pt"
    summary = extract.extract_regions(exported / "captions_test.json", tmp_path / "r", "grid:2",
                                      virtex_checkpoint=str(checkpoint), n=3)
    _, model, _, config, _ = infer.load(checkpoint)
    assert (summary["image_size"], summary["feature_dim"]) == (32, config.visual_dim)
    z = np.load(tmp_path / "r" / "000000000001.npz")
    x, _, _ = extract.read_image(exported / "images" / "000000000001.png", 32)
    with torch.no_grad():
        expected = box_features(model.visual(x[None]), [torch.from_numpy(z["boxes"])], 32)[0]
    np.testing.assert_allclose(z["features"], expected.numpy(), rtol=2e-3, atol=2e-3)
    with pytest.raises(SystemExit, match="no checkpoint"):
        extract.load_backbone("", str(tmp_path / "none.pt"), False)
    with pytest.raises(SystemExit, match="without image and text embeddings"):  # as tagger
        extract.extract_regions(exported / "captions_test.json", tmp_path / "t",
                                random_weights=True, n=1, tag_model=str(checkpoint),
                                tag_vocab=str(exported / "captions_test.json"))


# --- Zero-shot tags from a CoCa checkpoint -----------------------------------------------------

@pytest.fixture(scope="module")
def coca_checkpoint(tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("coca")
    args = ["--model", "coca", "--batch_size", "4", "--image_size", "32", "--final_n", "4",
            "--max_steps", "2", "--warmup_steps", "1", "--num_workers", "0", "--log_every_s", "0",
            "--tokenizer_texts", "50", "--vision_width", "32", "--vision_heads", "2",
            "--vision_layers", "1", "--text_width", "32", "--text_heads", "2",
            "--unimodal_layers", "1", "--multimodal_layers", "1", "--n_caption_queries", "4",
            "--embed_dim", "16", "--out", str(out)]
    train.train(*train.parse_args(args), log=lambda line: None)
    return out / "best.pt"


def test_zero_shot_tags_are_the_softmax_of_crop_and_prompt_embeddings(exported, coca_checkpoint,
                                                                      tmp_path):
    import infer
    from PIL import Image

    from shared.evaluate import PROMPT_TEMPLATES, class_embeddings

    detections = {"000000000000.png": [{"box": [0, 0, 64, 64], "score": 0.9},
                                       {"box": [8, 16, 40, 32], "score": 0.7}],
                  "000000000001.png": [{"box": [32, 0, 64, 48], "score": 0.8, "label": "x"}]}
    # each box widened by half its width / height on every side, clipped to the 64 x 64 image
    widened = {"000000000000.png": [(0, 0, 64, 64), (0, 8, 56, 40)],
               "000000000001.png": [(16, 0, 64, 64)]}
    (tmp_path / "det.json").write_text(json.dumps(detections))
    vocab = ["circle", "square", "star"]
    (tmp_path / "tags.txt").write_text("\n".join(vocab) + "\n\n")
    out = tmp_path / "regions"
    summary = extract.extract_regions(exported / "captions_test.json", out,
                                      f"json:{tmp_path / 'det.json'}", random_weights=True,
                                      image_size=64, n=2, tag_model=str(coca_checkpoint),
                                      tag_vocab=str(tmp_path / "tags.txt"), tag_threshold=0.0)
    assert (summary["written"], summary["tags"]) == (2, 3)
    paper, model, tokenizer, config, _ = infer.load(coca_checkpoint)
    with torch.no_grad():
        class_emb = class_embeddings(
            lambda t: paper.embed_text_strings(model, tokenizer, config, t), vocab,
            PROMPT_TEMPLATES)  # (3, E)
    for name, found in detections.items():
        z = np.load(out / name.replace(".png", ".npz"))
        assert z["conf"].tolist() == pytest.approx([d["score"] for d in found])
        image = Image.open(exported / "images" / name).convert("RGB")
        crops = [np.asarray(image.crop(box).resize((32, 32), Image.BICUBIC))
                 for box in widened[name]]
        with torch.no_grad():
            logits = model.logit_scale.exp() * paper.embed_image_arrays(model, crops) @ class_emb.T
        expected = logits.softmax(-1).numpy()  # (N, 3)
        assert z["cls_prob"].shape == (len(found), 4)
        assert (z["cls_prob"][:, 0] == 0).all()  # no background class in zero-shot
        np.testing.assert_allclose(z["cls_prob"][:, 1:], expected, rtol=1e-5, atol=1e-6)
        assert list(z["tags"]) == [vocab[k] for k in expected.argmax(1)]  # threshold 0: all
    strict = extract.extract_regions(exported / "captions_test.json", tmp_path / "strict",
                                     "grid:1", random_weights=True, image_size=64, n=1,
                                     tag_model=str(coca_checkpoint),
                                     tag_vocab=str(tmp_path / "tags.txt"), tag_threshold=1.0)
    assert strict["written"] == 1
    assert len(np.load(tmp_path / "strict" / "000000000000.npz")["tags"]) == 0


def test_zero_shot_tag_options_are_checked_in_one_line(exported, coca_checkpoint, tmp_path):
    vocab = tmp_path / "tags.txt"
    vocab.write_text("circle\nstar\ncircle\n")
    good = tmp_path / "good.txt"
    good.write_text("circle\nstar\n")
    source = exported / "captions_test.json"
    for kwargs, message in [
            (dict(tag_model=str(coca_checkpoint)), "need both --tag_model CKPT and --tag_vocab"),
            (dict(tag_model=str(coca_checkpoint), tag_vocab=str(tmp_path / "none.txt")),
             "no such file"),
            (dict(tag_model=str(coca_checkpoint), tag_vocab=str(vocab)), "'circle' is there twice"),
            (dict(tag_model=str(tmp_path / "none.pt"), tag_vocab=str(good)), "no checkpoint"),
            (dict(tag_model=str(coca_checkpoint), tag_vocab=str(good), tag_threshold=1.5),
             "a probability"),
            (dict(tag_model=str(coca_checkpoint), tag_vocab=str(good), tag_context=-0.1),
             "--tag_context must be >= 0")]:
        with pytest.raises(SystemExit, match=message):
            extract.extract_regions(source, tmp_path / "o", random_weights=True, n=1, **kwargs)


def test_a_checkpoint_without_a_resnet_is_no_backbone(coca_checkpoint):
    with pytest.raises(SystemExit, match="not one with a ResNet backbone"):
        extract.load_backbone("", str(coca_checkpoint), False)


def test_a_folder_tagged_with_other_settings_is_refused(exported, coca_checkpoint, tmp_path):
    (tmp_path / "tags.txt").write_text("circle\nstar\n")
    (tmp_path / "more.txt").write_text("circle\nstar\nsquare\n")
    tags = dict(tag_model=str(coca_checkpoint), tag_vocab=str(tmp_path / "tags.txt"))
    source, out = exported / "captions_test.json", tmp_path / "o"
    first = extract.extract_regions(source, out, "grid:1", random_weights=True, image_size=32,
                                    n=1, **tags)
    assert len(first["tag_weights_sha256"]) == len(first["tag_vocab_sha256"]) == 16
    for kwargs, differ in [({}, "tag_weights_sha256 [0-9a-f]+, tag_vocab_sha256"),
                           ({**tags, "tag_vocab": str(tmp_path / "more.txt")}, "tag_vocab_sha256"),
                           ({**tags, "tag_threshold": 0.3}, "tag_threshold 0.5; this run uses "
                                                            "tag_threshold 0.3"),
                           ({**tags, "tag_context": 0.0}, "tag_context 0.5; this run uses")]:
        with pytest.raises(SystemExit, match=f"was extracted with {differ}"):
            extract.extract_regions(source, out, "grid:1", random_weights=True, image_size=32,
                                    n=2, **kwargs)
    assert extract.extract_regions(source, out, "grid:1", random_weights=True, image_size=32,
                                   n=2, **tags)["written"] == 1


# --- Hostile inputs: each ends in one line naming the flag or file, or in a counted skip --------

def one_line_error(excinfo, *names: str) -> str:
    """The message of a SystemExit: one line, beginning with "error:", naming every one of
    `names`."""
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


@pytest.fixture
def four_images(exported, tmp_path):
    """tmp_path/images/0.png .. 3.png: four 64 x 64 world images."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes((exported / "images" / f"{i:012d}.png").read_bytes())
    return images


def test_json_boxes_not_finite_or_empty_are_dropped_and_counted(four_images, tmp_path, capsys):
    nan, inf = float("nan"), float("inf")
    detections = {  # json.dumps writes NaN and Infinity, which json.loads reads back
        "0.png": [{"box": [8, 8, 40, 40], "score": 0.5, "label": "kept"},
                  {"box": [nan, 0, 10, 10], "label": "nan corner"},
                  {"box": [0, 0, inf, 10], "label": "inf corner"},
                  {"box": [30, 30, 10, 10], "label": "inverted"},
                  {"box": [5, 5, 5, 20], "label": "no width"},
                  {"box": [70, 70, 90, 90], "label": "outside the 64 x 64 image"},
                  {"box": [0, 0, 10, 10], "score": nan, "label": "nan score"},
                  {"box": [0, 0, 10, 10], "score": -inf, "label": "inf score"},
                  {"box": [0, 0, 10, 10], "score": 1e300, "label": "inf as float32"},
                  {"box": [0, 0, 10**400, 10], "label": "an integer beyond a float"},
                  {"box": [-10, 60, 16, 80], "score": 0.9, "label": "clipped, kept"}],
        "1.png": [{"box": [nan, nan, nan, nan]}, {"box": [10, 10, 10, 10]}],  # none usable
        "2.png": [{"box": [0, 0, 64, 64], "score": 0.7}]}
    (tmp_path / "det.json").write_text(json.dumps(detections))
    out = tmp_path / "regions"
    extract.main(["regions", str(four_images), str(out), "--boxes", f"json:{tmp_path / 'det.json'}",
                  "--random_weights", "--image_size", "32"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 without boxes" in last and "11 boxes dropped" in last
    record = json.loads((out / "extract.json").read_text())
    assert (record["written"], record["no_boxes"], record["bad_boxes"]) == (2, 2, 11)
    z = np.load(out / "0.npz")
    assert list(z["tags"]) == ["clipped, kept", "kept"]
    assert z["conf"].tolist() == pytest.approx([0.9, 0.5])
    np.testing.assert_allclose(z["boxes"], [[0, 60 / 64, 0.25, 1], [0.125, 0.125, 0.625, 0.625]])
    assert not (out / "1.npz").exists()
    for name in ("0", "2"):
        z = np.load(out / f"{name}.npz")
        assert np.isfinite(z["boxes"]).all() and np.isfinite(z["conf"]).all()
        assert (z["boxes"][:, 2:] > z["boxes"][:, :2]).all()


def test_instance_boxes_not_finite_or_empty_are_dropped_and_counted(exported, tmp_path):
    data = json.loads((exported / "instances_test.json").read_text())
    data["images"] = data["images"][:2]
    data["annotations"] = [
        {"image_id": 0, "category_id": 1, "bbox": [4, 4, 20, 10]},  # kept
        {"image_id": 0, "category_id": 1, "bbox": [4, 4, 0, 10]},  # w = 0
        {"image_id": 0, "category_id": 1, "bbox": [4, 4, 10, -3]},  # h < 0
        {"image_id": 0, "category_id": 1, "bbox": [float("nan"), 4, 10, 10]},
        {"image_id": 1, "category_id": 2, "bbox": [4, 4, float("inf"), 10]},
        {"image_id": 1, "category_id": 2, "bbox": [100, 100, 10, 10]}]  # outside the image
    (tmp_path / "instances.json").write_text(json.dumps(data))
    summary = extract.extract_regions(exported / "captions_test.json", tmp_path / "o",
                                      f"instances:{tmp_path / 'instances.json'}",
                                      random_weights=0, image_size=32, n=2)
    assert (summary["written"], summary["bad_boxes"], summary["no_boxes"]) == (2, 5, 0)
    z = np.load(tmp_path / "o" / "000000000000.npz")
    np.testing.assert_allclose(z["boxes"], [[4 / 64, 4 / 64, 24 / 64, 14 / 64], [0, 0, 1, 1]])
    assert list(z["tags"]) == [data["categories"][0]["name"]] and z["conf"].tolist() == [1, 0]
    z = np.load(tmp_path / "o" / "000000000001.npz")  # the whole image alone
    assert z["boxes"].tolist() == [[0, 0, 1, 1]] and len(z["tags"]) == 0
    assert z["cls_prob"].tolist() == [[1.0] + [0.0] * len(data["categories"])]


@pytest.mark.parametrize("kind", ["json", "instances"])
@pytest.mark.parametrize("box", [[1, 2, 3], [1, 2, 3, 4, 5], ["2", "10", "5", "5"],
                                 [True, 0, 5, 5], "0 0 5 5", None, [[1, 2], [3, 4]]])
def test_a_box_of_the_wrong_form_is_one_line_naming_the_file_and_image(exported, tmp_path, kind,
                                                                       box):
    """Strings of digits are not numbers: a COCO x + w of two strings would be their
    concatenation. Refused when the file is read, before anything is written."""
    name = "000000000001.png"
    if kind == "json":
        data = {"000000000000.png": [{"box": [0, 0, 5, 5]}], name: [{"box": box}]}
    else:
        data = json.loads((exported / "instances_test.json").read_text())
        data["annotations"][1]["bbox"] = box
        assert data["images"][data["annotations"][1]["image_id"]]["file_name"] == name
    (tmp_path / "boxes.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        extract.extract_regions(exported / "captions_test.json", tmp_path / "o",
                                f"{kind}:{tmp_path / 'boxes.json'}", random_weights=0)
    one_line_error(e, f"--boxes {kind}:{tmp_path / 'boxes.json'}", repr(name), "not 4 numbers")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("detection, message", [
    ({"box": [0, 0, 5, 5], "score": "0.9"}, 'score "0.9" is not a number'),
    ({"box": [0, 0, 5, 5], "score": None}, "score null is not a number"),
    ({"box": [0, 0, 5, 5], "score": True}, "score true is not a number"),
    ({"box": [0, 0, 5, 5], "label": {"name": "dog"}}, "neither a string nor an integer"),
    ({"bbox": [0, 0, 5, 5]}, 'detection 0 is {"bbox"'),
    ([0, 0, 5, 5], "detection 0 is [0, 0, 5, 5]")])
def test_a_detection_of_the_wrong_form_is_one_line(exported, tmp_path, detection, message):
    (tmp_path / "det.json").write_text(json.dumps({"000000000002.png": [detection]}))
    with pytest.raises(SystemExit) as e:
        extract.extract_regions(exported / "captions_test.json", tmp_path / "o",
                                f"json:{tmp_path / 'det.json'}", random_weights=0)
    one_line_error(e, str(tmp_path / "det.json"), "'000000000002.png'", message)
    (tmp_path / "det.json").write_text(json.dumps({"000000000002.png": {"box": [0, 0, 5, 5]}}))
    with pytest.raises(SystemExit, match="is not a list of detections"):
        extract.extract_regions(exported / "captions_test.json", tmp_path / "o",
                                f"json:{tmp_path / 'det.json'}", random_weights=0)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(image_id=99), "annotations[0]: image_id 99 is none"),
    (lambda d: d["annotations"][0].update(category_id="x"), 'category_id "x" is none'),
    (lambda d: d["images"].append(dict(d["images"][0])), "id 0 is there twice"),
    (lambda d: d["categories"][1].update(id=d["categories"][0]["id"]), "is there twice"),
    (lambda d: d["categories"][0].update(name=7), "categories[0]: name 7 is not a string"),
    (lambda d: d["images"][0].update(file_name=None), "file_name null is not a string")])
def test_an_instances_file_with_a_wrong_entry_is_one_line(exported, tmp_path, change, message):
    data = json.loads((exported / "instances_test.json").read_text())
    change(data)
    (tmp_path / "instances.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        extract.extract_regions(exported / "captions_test.json", tmp_path / "o",
                                f"instances:{tmp_path / 'instances.json'}", random_weights=0)
    one_line_error(e, f"--boxes instances:{tmp_path / 'instances.json'}", message)


def test_a_boxes_file_of_other_images_is_refused_and_one_missing_some_warns(exported, tmp_path,
                                                                            capsys):
    data = json.loads((exported / "instances_test.json").read_text())
    source, file = exported / "captions_test.json", tmp_path / "instances.json"
    for image in data["images"]:
        image["file_name"] = "train2017/" + image["file_name"]  # another layout: no name matches
    file.write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        extract.extract_regions(source, tmp_path / "o", f"instances:{file}", random_weights=0)
    one_line_error(e, f"--boxes instances:{file}", "no entry for any of the 12 images",
                   "'000000000000.png'", "'train2017/000000000000.png'")
    assert not (tmp_path / "o").exists()
    data = json.loads((exported / "instances_test.json").read_text())
    dropped = {image["id"] for image in data["images"][:3]}
    data["images"] = data["images"][3:]  # the file knows 9 of the 12 images
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in dropped]
    file.write_text(json.dumps(data))
    summary = extract.extract_regions(source, tmp_path / "o", f"instances:{file}",
                                      random_weights=0, image_size=32, n=4)
    assert f"warning: --boxes instances:{file} has no entry for 3 of 4 images" in \
        capsys.readouterr().err
    assert (summary["written"], summary["not_in_boxes_file"]) == (4, 3)
    assert json.loads((tmp_path / "o" / "extract.json").read_text())["not_in_boxes_file"] == 3
    assert np.load(tmp_path / "o" / "000000000000.npz")["boxes"].tolist() == [[0, 0, 1, 1]]
    (tmp_path / "det.json").write_text(json.dumps({"elsewhere.png": [{"box": [0, 0, 5, 5]}]}))
    with pytest.raises(SystemExit, match="no entry for any of the 2 images"):
        extract.extract_regions(source, tmp_path / "j", f"json:{tmp_path / 'det.json'}",
                                random_weights=0, n=2)


@pytest.mark.parametrize("file_name", [12, None, "", ".", ["a.png"], "../outside.png",
                                       "/etc/passwd", "a\x00.png", "\ud800.png"])
def test_a_coco_file_name_that_names_no_file_under_image_dir_is_refused(exported, tmp_path,
                                                                       file_name):
    data = json.loads((exported / "captions_test.json").read_text())
    data["images"][2]["file_name"] = file_name
    (tmp_path / "captions.json").write_text(json.dumps(data))
    with pytest.raises(SystemExit) as e:
        extract.extract_regions(tmp_path / "captions.json", tmp_path / "o", "grid:1",
                                image_dir=str(exported / "images"), random_weights=0)
    one_line_error(e, "images[2]")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "--batch_size must be >= 1, not 0"),
    (dict(batch_size=-1), "--batch_size must be >= 1, not -1"),
    (dict(n=-3), "--n is a number of images"),
    (dict(image_size=-5), "--image_size is 0 .* or at least 32 .*, not -5"),
    (dict(image_size=1), "--image_size .*, not 1"),
    (dict(image_size=31), "--image_size .*, not 31"),
    (dict(device="bogus"), "--device is auto, cpu, cuda, cuda:K or mps, not 'bogus'"),
    (dict(device="cuda:99"), "--device cuda:99: "),
    (dict(tag_context=float("nan")), "--tag_context must be >= 0 and finite, not nan"),
    (dict(tag_context=float("inf")), "--tag_context must be >= 0 and finite, not inf"),
    (dict(tag_threshold=float("nan")), "--tag_threshold is a probability, not nan"),
    (dict(random_weights=-1), "--random_weights takes a seed in 0 .. 2\\*\\*64 - 1, not -1"),
    (dict(random_weights=2**70), "--random_weights takes a seed")])
def test_a_bad_option_is_one_line_at_the_start(exported, tmp_path, kwargs, message):
    with pytest.raises(SystemExit, match=f"^error: {message}") as e:
        extract.extract_regions(exported / "captions_test.json", tmp_path / "o", "grid:1",
                                **{"random_weights": 0, **kwargs})
    one_line_error(e)
    assert not (tmp_path / "o").exists()


def test_cuda_where_there_is_none_and_a_vocabulary_that_is_not_utf8_are_one_line(
        exported, tmp_path, monkeypatch, capsys):
    source, out = str(exported / "captions_test.json"), str(tmp_path / "o")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(SystemExit) as e:
            extract.main(["regions", source, out, "--random_weights", "--device", device])
        one_line_error(e, f"--device {device}", "no CUDA device")
    assert extract.pick_device("auto") == torch.device("cpu")
    (tmp_path / "tags.txt").write_bytes(b"circle\n\xff\xfestar\n")
    with pytest.raises(SystemExit) as e:
        extract.main(["regions", source, out, "--random_weights", "--image_size", "32",
                      "--tag_model", str(tmp_path / "none.pt"), "--tag_vocab",
                      str(tmp_path / "tags.txt")])
    one_line_error(e, f"--tag_vocab {tmp_path / 'tags.txt'}", "UTF-8")
    assert "Traceback" not in capsys.readouterr().err


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one can write into: as root (who writes into a chmod 555 folder) a read-only
    tmpfs mounted for the test, skipped where mounting is not possible; else chmod 555."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=1m"):  # root ignores a folder's permissions
        yield folder


def test_an_out_dir_that_is_a_file_or_read_only_is_one_line(exported, tmp_path,
                                                            read_only_folder):
    source = exported / "captions_test.json"
    (tmp_path / "file").write_text("x")
    for out, message in [(tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "sub", "cannot write there"),
                         (read_only_folder, "cannot write there"),
                         (read_only_folder / "sub", "cannot write there")]:
        with pytest.raises(SystemExit) as e:
            extract.extract_regions(source, out, "grid:1", random_weights=0, image_size=32, n=1)
        one_line_error(e, f"OUT_DIR {out}", message)
    assert (tmp_path / "file").read_text() == "x"


def check_a_stop_on_a_full_disk(excinfo, out: Path, first: str) -> None:
    """One line naming the file that could not be written; no temporary file; the files written
    before it intact (they load, and equal a fresh extraction's)."""
    message = one_line_error(excinfo, "No space left on device", "rerun resumes")
    assert message.startswith(f"error: could not write {out}{os.sep}")
    assert not list(out.glob("*.tmp"))
    written = sorted(out.glob("*.npz"))
    assert written and written[0].name == first
    for path in written:
        with np.load(path) as z:
            assert z["features"].shape == (2, 2048)


def test_a_full_disk_stops_in_one_line_and_keeps_the_written_files(exported, tmp_path,
                                                                   monkeypatch):
    source, out = exported / "captions_test.json", tmp_path / "regions"
    savez, calls = np.savez, []

    def fills_up(file, **arrays):
        calls.append(1)
        if len(calls) > 2:
            file.write(b"part of a file")
            raise OSError(28, "No space left on device")
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", fills_up)
    with pytest.raises(SystemExit) as e:
        extract.extract_regions(source, out, "grid:1", random_weights=0, image_size=32, n=5)
    check_a_stop_on_a_full_disk(e, out, "000000000000.npz")
    assert "000000000002.npz" in str(e.value) and len(list(out.glob("*.npz"))) == 2
    monkeypatch.undo()
    again = extract.extract_regions(source, out, "grid:1", random_weights=0, image_size=32, n=5)
    assert (again["written"], again["already_written"]) == (3, 2)


def test_a_really_full_disk_stops_in_one_line_and_keeps_the_written_files(exported, tmp_path):
    """A tmpfs of 64 KiB: extract.json and a few region files (about 9 KB each) fit."""
    with tmpfs(tmp_path / "small", "size=64k") as out:
        with pytest.raises(SystemExit) as e:
            extract.extract_regions(exported / "captions_test.json", out, "grid:1",
                                    random_weights=0, image_size=32)
        check_a_stop_on_a_full_disk(e, out, "000000000000.npz")
        assert 1 <= len(list(out.glob("*.npz"))) < 12


def test_a_resume_lists_an_unreadable_image_once_and_drops_it_once_written(four_images,
                                                                           tmp_path):
    (four_images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "regions"
    for _ in range(2):  # the second run tries it again
        summary = extract.extract_regions(four_images, out, "grid:1", random_weights=0,
                                          image_size=32)
        assert summary["unreadable"] == 1
        lines = (out / "unreadable.txt").read_text().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{four_images / 'broken.png'}\t")
    (four_images / "broken.png").write_bytes((four_images / "0.png").read_bytes())  # repaired
    summary = extract.extract_regions(four_images, out, "grid:1", random_weights=0, image_size=32)
    assert (summary["written"], summary["unreadable"]) == (1, 0)
    assert (out / "unreadable.txt").read_text() == ""
