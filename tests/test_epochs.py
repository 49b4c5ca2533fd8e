"""A corpus on disk is read epoch after epoch (shared.data.Epochs): every example once an epoch,
in a new order each epoch, every random choice drawn afresh at each visit, and still a pure
function of (seed, step).

The corpus: 8 images with 5 captions each (CoCa, VirTex), and the same 8 images with 5 VQA
questions each (UNITER, Oscar --task vqa). Every text names its image ("red two"), so a batch
says which (image, text) pairs it read; the batches come through each paper's train_dataset
and collate_fn and shared.data.train_loader, as train.py makes them, with a batch of 4.
"""

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from shared.data import Epochs, train_loader
from shared.folders import CaptionFolder, RegionFolder
from shared.tokenizer import Tokenizer
from shared.vqa import VQAFolder
from shared.world import World, WorldConfig

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
NUMBERS = ("one", "two", "three", "four", "five")
PAIRS = {f"{c} {n}" for c in COLOURS for n in NUMBERS}  # the 40 (image, text) pairs
BATCH, EPOCHS = 4, 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """captions.json + images/ + regions/ (COCO layout) and VQA v2 question/annotation files."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "images").mkdir()
    (root / "regions").mkdir()
    rng = np.random.default_rng(0)
    images, annotations, questions, answers = [], [], [], []
    for i, colour in enumerate(COLOURS):
        name = f"{i:012d}.png"
        Image.fromarray(np.full((64, 64, 3), 20 + 25 * i, np.uint8)).save(root / "images" / name)
        np.savez(root / "regions" / f"{i:012d}.npz",
                 features=rng.normal(size=(10, 64)).astype(np.float32) + i,
                 boxes=np.tile(np.array([0.1, 0.1, 0.9, 0.9], np.float32), (10, 1)),
                 conf=np.linspace(1, 0.5, 10).astype(np.float32),
                 tags=np.array([colour], dtype=np.str_))
        images.append({"id": i, "file_name": name})
        for j, number in enumerate(NUMBERS):
            k = 5 * i + j
            annotations.append({"image_id": i, "caption": f"{colour} {number}", "id": k})
            questions.append({"question_id": k, "image_id": i, "question": f"{colour} {number}"})
            answers.append({"question_id": k, "image_id": i, "answer_type": "yes/no",
                            "multiple_choice_answer": "yes",
                            "answers": [{"answer": "yes"}] * 10})
    (root / "captions.json").write_text(json.dumps({"images": images,
                                                    "annotations": annotations}))
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": answers}))
    return root


def setting(model: str, root):
    """(paper, config, source, tokenizer) of a tiny model on the corpus."""
    paper = importlib.import_module(model)
    if model in ("coca", "virtex"):
        source = CaptionFolder.coco(root / "captions.json", image_size=64)
        config = dataclasses.replace(paper.Config.tiny(), batch_size=BATCH, grad_accum_steps=1)
    else:
        source = VQAFolder(root / "questions.json", root / "annotations.json", root / "regions")
        config = paper.Config.tiny()
        config = dataclasses.replace(config, task="vqa", answers=("yes", "no"),
                                     batch_size=BATCH, grad_accum_steps=1,
                                     feature_mean=(0.0,) * 64, feature_std=(1.0,) * 64)
    tokenizer = Tokenizer.train(sorted(PAIRS), vocab_size=120)
    return paper, dataclasses.replace(config, vocab_size=tokenizer.vocab_size), source, tokenizer


def read_stream(paper, config, source, tokenizer, steps: int, start: int = 0, seed: int = 0,
                workers: int = 0) -> list[list[str]]:
    """The (image, text) pair of every row of batches start .. start + steps - 1, as its text."""
    dataset = paper.train_dataset(source, tokenizer, config, seed=seed)
    batches = iter(train_loader(dataset, BATCH, start, paper.collate_fn, num_workers=workers))
    out = []
    for _ in range(steps):
        tokens = next(batches)["tokens"]  # (B, T): Oscar [CLS] question [SEP] tags [SEP]
        out.append([tokenizer.decode(row) for row in tokens])
    return out


UNITS = {"coca": 8, "virtex": 8, "uniter": 40, "oscar": 40}  # an image / an (image, question)


@pytest.mark.parametrize("model", ["coca", "virtex", "uniter", "oscar"])
def test_ten_epochs_of_a_small_corpus_draw_its_pairs_in_new_orders(corpus, model):
    paper, config, source, tokenizer = setting(model, corpus)
    per_epoch = UNITS[model] // BATCH  # batches an epoch
    stream = read_stream(paper, config, source, tokenizer, EPOCHS * per_epoch)
    rows = [text for batch in stream for text in batch]
    assert set(rows) <= PAIRS, set(rows) - PAIRS
    assert len(set(rows)) >= 0.7 * len(PAIRS)  # at least 70 % of the 40 pairs are read
    colour = lambda text: text.split()[0]  # noqa: E731  the image a text names
    for e in range(EPOCHS):  # every unit once an epoch
        epoch = rows[e * UNITS[model]:(e + 1) * UNITS[model]]
        units = [colour(t) for t in epoch] if UNITS[model] == 8 else epoch
        assert sorted(units) == sorted(COLOURS if UNITS[model] == 8 else PAIRS), e
    first = {tuple(sorted(colour(t) for t in stream[e * per_epoch])) for e in range(EPOCHS)}
    assert len(first) > 1  # the first batch of an epoch is not always the same images
    k = 7
    assert read_stream(paper, config, source, tokenizer, 3, start=k) == stream[k:k + 3]
    other_seed = read_stream(paper, config, source, tokenizer, per_epoch, seed=1)
    assert other_seed != stream[:per_epoch]  # the run's seed orders the epochs


def test_the_stream_is_the_same_in_a_loader_worker(corpus):
    paper, config, source, tokenizer = setting("uniter", corpus)
    here = read_stream(paper, config, source, tokenizer, 12)
    assert read_stream(paper, config, source, tokenizer, 12, workers=1) == here


def test_every_visit_of_an_image_draws_its_augmentation_afresh(corpus):
    import virtex

    paper, config, source, tokenizer = setting("virtex", corpus)
    config = dataclasses.replace(config, crop_scale_min=0.2, jitter_prob=1.0)
    dataset = virtex.train_dataset(source, tokenizer, config)
    index, _ = dataset.epochs(0)
    later = next(p for p in range(8, 80) if dataset.epochs(p)[0] == index)  # another epoch's
    assert not torch.equal(dataset[0]["image"], dataset[later]["image"])


def test_uniter_pretraining_draws_its_task_and_masks_afresh_each_epoch(tmp_path):
    # a region corpus of 8 images x 5 captions: the same pair's items in two epochs differ
    import uniter

    from shared.world import export_split

    world = World(WorldConfig(image_size=64, n_regions=10, feature_dim=64), "test")
    export_split(world, tmp_path, n=8)
    source = RegionFolder.coco(tmp_path / "captions_test.json")
    tokenizer = Tokenizer.train([c for _, cs in source.records for c in cs], vocab_size=200)
    config = dataclasses.replace(uniter.Config.tiny(), batch_size=4, grad_accum_steps=1,
                                 vocab_size=tokenizer.vocab_size)
    dataset = uniter.train_dataset(source, tokenizer, config)
    assert len(dataset) == 40
    visits = {}
    for p in range(400):
        visits.setdefault(dataset.epochs(p), []).append(p)
    assert len(visits) == 40 and all(len(v) == 10 for v in visits.values())
    p, q = visits[(0, 0)][:2]
    items = [dataset[p], dataset[q], *(dataset[r] for r in visits[(0, 0)][2:])]
    drawn = {(it["task"], tuple(it.get("mlm_labels", torch.tensor([])).tolist()),
              tuple(it.get("region_masked", torch.tensor([])).tolist())) for it in items}
    assert len(drawn) > 3  # ten visits of one pair: tasks and masks drawn anew


def test_epochs_is_a_permutation_of_the_units_seeded_by_the_epoch(corpus):
    source = RegionFolder.coco(corpus / "captions.json", corpus / "regions")
    epochs = Epochs(source, seed=3, per_text=True)
    assert len(epochs) == 40
    first = [epochs(p) for p in range(40)]
    assert sorted(first) == [(i, j) for i in range(8) for j in range(5)]
    second = [epochs(p) for p in range(40, 80)]
    assert sorted(second) == sorted(first) and second != first
    assert [Epochs(source, seed=3, per_text=True)(p) for p in range(40, 80)] == second  # pure
    per_image = Epochs(source, seed=3)
    assert len(per_image) == 8 and sorted(per_image(p) for p in range(8, 16)) == \
        [(i, None) for i in range(8)]
    assert "40 (image, text) pairs of 8 images" in epochs.describe()
    world = World(WorldConfig(image_size=32), "train")
    in_order = Epochs(world, seed=3, per_text=True)  # the world: i.i.d. examples, in order
    assert [in_order(p) for p in (0, 1, 5, len(world) + 2)] == [(0, None), (1, None),
                                                                (5, None), (2, None)]


def test_uniter_retrieval_never_takes_a_pair_of_the_same_image_for_a_negative():
    import uniter

    world = World(WorldConfig(image_size=64, n_regions=10, feature_dim=64), "train")
    tokenizer = Tokenizer.train([c for i in range(50) for c in world.example(i)["captions"]],
                                vocab_size=300)
    config = dataclasses.replace(uniter.Config.tiny(), task="retrieval", hard_negatives=3,
                                 hidden_size=32, layers=1, heads=2, intermediate_size=64,
                                 vocab_size=tokenizer.vocab_size, batch_size=4)
    dataset = uniter.train_dataset(world, tokenizer, config)
    batch = uniter.collate_fn([dataset[p] for p in range(4)])
    batch["image_ids"] = torch.tensor([0, 0, 1, 2])  # rows 0 and 1: two captions of one image
    torch.manual_seed(0)
    model = uniter.build_model(config)
    with torch.no_grad():
        model.heads["itm"].weight.mul_(50)  # spread the scores so that the top-k is clear
    out = model(batch)
    with torch.no_grad():  # S[i, t] = score of (image i, text t), one image at a time
        S = torch.stack([model.match_score(
            batch["tokens"], batch["features"][i:i + 1].expand(4, -1, -1),
            batch["locations"][i:i + 1].expand(4, -1, -1),
            batch["region_mask"][i:i + 1].expand(4, -1)) for i in range(4)])  # (4, 4)
    ids, sigmoid = batch["image_ids"].tolist(), torch.sigmoid
    terms = []
    for b in range(4):
        wrong = [i for i in range(4) if ids[i] != ids[b]]  # rows 0, 1: only 2 of k = 3
        images = sorted(wrong, key=lambda i: -S[i, b])[:3]
        texts = sorted(wrong, key=lambda t: -S[b, t])[:3]
        negatives = [S[i, b] for i in images] + [S[b, t] for t in texts]
        terms += [max(0.0, (config.rank_margin + sigmoid(n) - sigmoid(S[b, b])).item())
                  for n in negatives]
    assert len(terms) == 20 and out["loss"].item() == pytest.approx(sum(terms) / len(terms),
                                                                    rel=1e-4)


def test_train_logs_the_epoch_and_how_many_the_run_makes(corpus, tmp_path):
    import train

    args = ["--model", "coca", "--data", f"coco:{corpus / 'captions.json'}", "--max_steps", "3",
            "--batch_size", "4", "--warmup_steps", "1", "--num_workers", "0", "--log_every_s", "0",
            "--out", str(tmp_path / "run")]
    lines = []
    train.train(*train.parse_args(args), log=lines.append)
    assert ("training data: 8 images an epoch, in a new order each epoch (a caption drawn at "
            "each visit); 3 steps of 4 items make 1.50 epochs") in lines
