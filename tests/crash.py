"""Kill a real ``condkit train`` with SIGKILL once it has written a given checkpoint.

Shared by the kill -9 + ``--resume latest`` tests (tests/test_reliability.py, test_ema.py,
test_aspect_buckets.py, test_optimizers.py): each trains the same recipe once straight,
once killed here and resumed, and compares the results bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def train_killed_after_checkpoint(recipe: Path, output: Path, step: int, timeout: float = 300, poll: float = 0.05) -> None:
    """Run ``condkit train RECIPE --output OUTPUT`` and kill -9 it once ``step-{step:08d}`` exists.

    Args:
        recipe: the recipe file.
        output: the run's output folder.
        step: the checkpoint step to wait for (the recipe's ``train.checkpoint_every``).
        timeout: seconds to wait for it.
        poll: seconds between looks.

    The run must still be going when the checkpoint appears, and die by the signal.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "condkit", "train", str(recipe), "--output", str(output), "--no-progress"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    while not (output / "checkpoints" / f"step-{step:08d}").is_dir():
        assert process.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, f"no checkpoint of step {step} within {timeout} s"
        time.sleep(poll)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
