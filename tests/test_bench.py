"""bench.py: the timing harness alternates its contestants, skips missing libraries, and
the IPOT comparison runs at small sizes."""

import importlib.util
import re

import pytest
import torch

import bench


def test_time_alternately_interleaves_and_returns_medians():
    calls = []
    medians = bench.time_alternately({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     rounds=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up each, then A B A B A B
    assert set(medians) == {"a", "b"} and all(m >= 0 for m in medians.values())


def without(monkeypatch, missing: str) -> None:
    """bench.py as it runs where `missing` is not installed: find_spec finds nothing."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == missing else find_spec(name, *args))


def test_coca_comparison_is_skipped_with_a_message_without_open_clip(capsys, monkeypatch):
    without(monkeypatch, "open_clip")
    bench.coca_vs_open_clip()
    assert "skipped coca vs open_clip: open_clip is not installed" in capsys.readouterr().out


def test_resnet_comparison_is_skipped_with_a_message_without_torchvision(capsys, monkeypatch):
    without(monkeypatch, "torchvision")
    bench.resnet_vs_torchvision()
    assert "skipped resnet vs torchvision: torchvision is not installed" in capsys.readouterr().out


def test_ipot_comparison_runs_small_and_prints_the_speedups(capsys):
    threads = torch.get_num_threads()
    bench.ipot_batched_vs_loop(batch=3, text=4, regions=5, iters=3, rounds=2, warmup=1)
    out = capsys.readouterr().out
    assert "IPOT, batch 3, up to 4 text x 5 regions, 3 iterations" in out
    speedups = re.findall(r"^  (full|ragged) .* speedup (\d+\.\d)x .*difference (\S+)\)$", out,
                          re.MULTILINE)
    assert [layout for layout, _, _ in speedups] == ["full", "ragged"]
    assert all(float(gap) < 1e-5 for _, _, gap in speedups)  # batched = loop
    assert torch.get_num_threads() == threads  # the thread setting is put back


def test_adamw_comparison_times_three_paths_for_each_paper(capsys):
    bench.adamw_fused_vs_loops(rounds=1, warmup=1)
    lines = re.findall(r"^adamw (\w+) tiny .* single (\S+) ms, foreach (\S+) ms, fused (\S+) ms",
                       capsys.readouterr().out, re.MULTILINE)
    assert [name for name, *_ in lines] == ["coca", "virtex", "oscar", "uniter"]
    assert all(float(t) > 0 for _, *times in lines for t in times)
