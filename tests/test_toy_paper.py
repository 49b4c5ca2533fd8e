"""A forker's guarantee: a sixth paper file (tests/toy_paper.py, a dual encoder in a few dozen
lines) that defines the README's contract runs through the unchanged train.py (on the world and
on --data), --val_data, --eval_only, infer.py and extract.py's zero-shot tagger, registered by
the one line a forker adds to train.import_paper (here a monkeypatch). Any script that chose by
a model name would give it nothing, and this test fails."""

import json

import pytest

import extract
import infer
import train
from shared.world import World, WorldConfig, export_split
from tests import toy_paper


@pytest.fixture()
def registered(monkeypatch):
    real = train.import_paper
    monkeypatch.setattr(train, "import_paper",
                        lambda name: toy_paper if name == "toy" else real(name))
    monkeypatch.setitem(train.CHOICES, "model", (*train.MODELS, "toy"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    export_split(World(WorldConfig(image_size=32, n_test=24), "test"), out, n=24)
    (out / "shapes.txt").write_text("circle\nsquare\ntriangle\n")
    classes = out / "classes"
    for name in ("circle", "square"):  # an image folder: root/<class>/<image>
        (classes / name).mkdir(parents=True)
        for i in range(3):
            (classes / name / f"{i}.png").write_bytes((out / "images" / f"{i:012d}.png")
                                                      .read_bytes())
    return out


COMMON = ["--model", "toy", "--num_workers", "0", "--log_every_s", "0", "--final_n", "8",
          "--tokenizer_texts", "40"]


def test_a_sixth_paper_trains_evaluates_and_infers_everywhere(registered, corpus, tmp_path):
    lines = []
    world = train.train(*train.parse_args([*COMMON, "--out", str(tmp_path / "world")]),
                        log=lines.append)
    assert "r1_mean" in world and any(line.startswith("training data:") for line in lines)

    captions = str(corpus / "captions_test.json")
    spec = f"karpathy:{corpus / 'dataset_test.json'}"
    on_disk = train.train(*train.parse_args([*COMMON, "--data", f"coco:{captions}",
                                             "--val_data", spec, "--out", str(tmp_path / "d")]),
                          log=lines.append)
    assert {"i2t_r1_all", "t2i_r1_all", "r1_mean"} <= set(on_disk)
    checkpoint = tmp_path / "d" / "best.pt"
    again = train.train(*train.parse_args([*COMMON, "--eval_only", "--init", str(checkpoint),
                                           "--val_data", spec, "--out", str(tmp_path / "e")]),
                        log=lines.append)
    assert again["r1_mean"] == pytest.approx(on_disk["r1_mean"])

    karpathy = infer.karpathy(checkpoint, spec)
    assert karpathy["images"] == 24 and karpathy["r1_mean"] == pytest.approx(on_disk["r1_mean"])
    image = corpus / "images" / f"{0:012d}.png"
    assert len(infer.classify(checkpoint, image, ["circle", "square"])) == 2
    assert len(infer.rank(checkpoint, "a red circle", corpus / "images", top=3)) == 3
    assert infer.zeroshot(checkpoint, corpus / "classes")["images"] == 6
    assert infer.probe(checkpoint, corpus / "classes", corpus / "classes")["val_images"] == 6
    with pytest.raises(SystemExit, match="needs a checkpoint that writes captions; this toy"):
        infer.caption(checkpoint, [image], [])
    with pytest.raises(SystemExit, match="not one with a ResNet backbone"):
        extract.load_backbone("", str(checkpoint), False)
    summary = extract.extract_regions(corpus / "captions_test.json", tmp_path / "regions",
                                      "grid:1", random_weights=0, image_size=32, n=2,
                                      tag_model=str(checkpoint),
                                      tag_vocab=str(corpus / "shapes.txt"))
    assert summary["written"] == 2 and summary["tags"] == 3
    assert json.loads((tmp_path / "d" / "final.json").read_text())["r1_mean"] == \
        pytest.approx(on_disk["r1_mean"])
