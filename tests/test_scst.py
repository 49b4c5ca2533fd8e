"""Self-critical sequence training (SCST) for Oscar's captioner [Oscar §5.1; Rennie et al. 2017]:
the reward (CIDEr-D with the training references' document frequencies, shared.evaluate), one
batch's losses against the pieces computed by hand, that SCST steps raise the expected reward of
a fixed batch, and train.py --scst on the world and on a corpus on disk. The loss itself is
tested against a loop from its equation in tests/test_losses.py."""

import dataclasses

import pytest
import torch

import oscar
from shared.evaluate import ScstReward, scst_sentence
from shared.metrics import CiderD
from tests.region_world import WORLD_CONFIG, one_thread, tokenizer, world  # noqa: F401


def scst_config(tokenizer, **overrides) -> oscar.Config:
    base = dict(hidden_size=32, layers=2, heads=2, intermediate_size=64, dropout=0.0,
                vocab_size=tokenizer.vocab_size, max_caption_len=24, max_tag_len=12,
                n_regions=10, feature_dim=16, batch_size=4, max_gen_len=12,
                standardise_features=True, image_size=64, init_std=0.1, task="caption",
                scst=True, scst_samples=5, scst_df_images=100)
    return oscar.Config(**{**base, **overrides})


def test_scst_sentence_and_the_reward_of_a_caption_against_its_references(world, tokenizer):
    assert scst_sentence(" a red circle . ") == "a red circle <eos>"
    assert scst_sentence("a red circle") == "a red circle <eos>"
    reward = ScstReward.from_source(world, tokenizer, 20, 100)
    assert len(reward.cider.document_frequency) > 0 and reward.cider.log_num_images > 4
    example = world.example(0, regions=False)
    references = reward.references(example["captions"])
    assert all(r.endswith(" <eos>") for r in references)
    own = torch.tensor([tokenizer.encode(example["captions"][0])])  # [CLS] .. [SEP]
    other = torch.tensor([tokenizer.encode("four objects an orange diamond")])
    cut = torch.nn.functional.pad(own[:, :3], (0, own.shape[1] - 3))  # [PAD] = 0 after
    scores = reward(torch.cat([own, cut]), [references, references])
    assert scores.shape == (2,) and scores[0] > scores[1] >= 0  # whole beats cut
    assert reward(other, [references])[0] < scores[0]
    direct = CiderD([reward.references(world.example(i, regions=False)["captions"])
                     for i in range(100)]).scores([references[0]], [references])
    assert scores[0].item() == pytest.approx(direct[0], rel=1e-6)


def test_an_scst_batch_is_one_image_a_unit_with_its_references(world, tokenizer):
    config = scst_config(tokenizer)
    dataset = oscar.train_dataset(world, tokenizer, config)
    batch = oscar.collate_fn([dataset[i] for i in range(4)])
    assert batch["scst_reward"] is dataset.scst_reward
    assert [len(r) for r in batch["references"]] == [5] * 4  # every caption of the image
    ce = oscar.train_dataset(world, tokenizer, dataclasses.replace(config, scst=False))
    assert not hasattr(oscar.collate_fn([ce[0]]), "references") and "references" not in \
        oscar.collate_fn([ce[0]])
    with pytest.raises(ValueError, match="scst trains a captioner"):
        dataclasses.replace(config, task="vqa")


def test_the_scst_losses_of_a_batch(world, tokenizer):
    """reward: the mean CIDEr-D of the samples; greedy_reward: of the eval-mode greedy
    captions (oscar.caption with beam 1 writes the same); the loss has a gradient."""
    config = scst_config(tokenizer)
    dataset = oscar.train_dataset(world, tokenizer, config)
    batch = oscar.collate_fn([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    model = oscar.build_model(config).train()
    losses = model(batch)
    assert set(losses) == {"loss", "scst", "reward", "greedy_reward"} and model.training
    losses["loss"].backward()
    assert sum(p.grad.abs().sum() for p in model.parameters() if p.grad is not None) > 0
    examples = [world.example(i) for i in range(4)]
    greedy = oscar.caption(model, tokenizer, config, examples, WORLD_CONFIG, beam_size=1)
    model.train()
    expected = CiderD([dataset.scst_reward.references(world.example(i, regions=False)[
        "captions"]) for i in range(100)]).scores([scst_sentence(g) for g in greedy],
                                                  batch["references"])
    assert losses["greedy_reward"].item() == pytest.approx(sum(expected) / 4, rel=1e-5)


def expected_reward(model, batch, n: int = 64) -> float:
    """The mean CIDEr-D of n samples an image of the batch, without gradients."""
    model.config.scst_samples, saved = n, model.config.scst_samples
    with torch.no_grad():
        reward = model.scst_losses(batch)["reward"].item()
    model.config.scst_samples = saved
    return reward


def test_scst_steps_raise_the_expected_reward_of_a_fixed_batch(world, tokenizer):
    config = scst_config(tokenizer)
    dataset = oscar.train_dataset(world, tokenizer, config)
    batch = oscar.collate_fn([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    model = oscar.build_model(config).train()
    before = expected_reward(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    after = expected_reward(model, batch)
    assert after > 2 * before, (before, after)  # measured: 0.015 -> 0.050


SMALL = ["--model", "oscar", "--task", "caption", "--hidden_size", "32", "--layers", "1",
         "--heads", "2", "--intermediate_size", "64", "--batch_size", "4", "--num_workers", "0",
         "--log_every_s", "0", "--tokenizer_texts", "40", "--vocab_size", "150", "--final_n", "4",
         "--warmup_steps", "0", "--max_gen_len", "10"]


def test_train_py_scst_from_a_cross_entropy_checkpoint_on_a_corpus_on_disk(tmp_path):
    """--scst fine-tunes a captioning checkpoint (--init) on region files read epoch after
    epoch: 12 images a corpus, batch 4, 15 SCST updates (5 epochs); the reward terms are
    logged, the checkpoint written, and the corpus counts reach final.json."""
    import json

    import train
    from shared.world import World, WorldConfig, export_split

    world = World(WorldConfig(seed=3, n_train=12, feature_dim=16, n_regions=10), "train")
    export_split(world, tmp_path / "corpus")
    corpus = tmp_path / "corpus"
    data = f"regions:{corpus / 'captions_train.json'},{corpus / 'regions'}"
    common = [*SMALL, "--data", data, "--feature_dim", "16", "--n_regions", "10"]
    lines = []
    run, paper, overrides = train.parse_args([*common, "--max_steps", "3",
                                              "--out", str(tmp_path / "ce")])
    train.train(run, paper, overrides, log=lines.append)
    run, paper, overrides = train.parse_args([
        *common, "--scst", "--init", str(tmp_path / "ce" / "best.pt"), "--max_steps", "15",
        "--lr", "5e-6", "--out", str(tmp_path / "scst")])
    final = train.train(run, paper, overrides, log=lines.append)
    progress = [line for line in lines if line.startswith("step 15/15")]
    assert progress and "reward" in progress[0] and "greedy_reward" in progress[0], lines[-8:]
    assert final["step"] == 15 and final["images"] == 12
    saved = json.loads((tmp_path / "scst" / "config.json").read_text())
    assert saved["config"]["scst"] is True and saved["config"]["task"] == "caption"
    assert (tmp_path / "scst" / "latest.pt").is_file()
