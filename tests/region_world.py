"""What the region models' tests share (tests/test_uniter.py, tests/test_oscar.py): a small
world of 16-d regions, a tokenizer trained on its captions and questions, and one thread.
Imported by name into a test module, a fixture here serves that module."""

import pytest
import torch

from shared.tokenizer import Tokenizer
from shared.world import World, WorldConfig

WORLD_CONFIG = WorldConfig(feature_dim=16, n_regions=10, n_train=400, n_val=40, n_test=40)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors are tiny: one thread is fastest, and on a busy machine two OpenMP threads
    can spin against another process for 50x the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WORLD_CONFIG, "train")


@pytest.fixture(scope="module")
def tokenizer(world) -> Tokenizer:
    texts = []
    for i in range(100):
        example = world.example(i, regions=False)
        texts += example["captions"] + [q for q, _ in example["questions"]]
    return Tokenizer.train(texts, vocab_size=200)
