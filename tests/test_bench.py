"""shared/bench.py: the timing harness alternates its contestants and skips missing libraries."""

import importlib.util

import pytest

from shared import bench


def test_time_alternately_interleaves_and_returns_medians():
    calls = []
    medians = bench.time_alternately({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then A B A B A B
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None,
                    reason="open_clip is installed here: the comparison would run instead")
def test_coca_comparison_is_skipped_with_a_message_without_open_clip(capsys):
    bench.coca_vs_open_clip()
    assert "skipped coca vs open_clip: open_clip is not installed" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="torchvision is installed here: the comparison would run instead")
def test_resnet_comparison_is_skipped_with_a_message_without_torchvision(capsys):
    bench.resnet_vs_torchvision()
    assert "skipped resnet vs torchvision: torchvision is not installed" in capsys.readouterr().out
