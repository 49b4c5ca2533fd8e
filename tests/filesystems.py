"""Real small or read-only filesystems for the tests of full disks and unwritable folders: a
tmpfs mounted for the test. A mock of write() does not reproduce what torch.save, np.savez or a
mkdir meet there (torch's zip writer raises RuntimeError, not OSError; root writes into a chmod
555 folder), so these tests mount one. Mounting needs root and mount(8): elsewhere the test is
skipped, saying why."""

import contextlib
import os
import subprocess
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """`folder` (made here) with a tmpfs mounted on it for the block, e.g. options "size=6m"
    or "ro,size=1m"; pytest.skip where it cannot be mounted. Unmounted after the block."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
            capture_output=True).returncode != 0:
        pytest.skip(f"mounting a tmpfs ({options}) needs root and mount(8)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
