"""SIGTERM (what Slurm and Kubernetes send before a kill) to a running `recsys-mtl train`: the
ranks agree on a step, save a checkpoint, exit without a traceback, and the same command resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes(tmp_path):
    from recsys_mtl.data.synth import generate_recsys

    data = tmp_path / "data"
    generate_recsys(data, rows=60_000, seed=0, num_users=500, num_items=800)
    cmd = [str(BIN / "recsys-mtl"), "train", "--data", str(data), "--output-dir", str(tmp_path / "out"),
           "--checkpoint-dir", str(tmp_path / "ck"), "--model", "mmoe", "--batch-size", "32", "--epochs", "2",
           "--nproc-per-node", "2", "--embedding-dim", "4", "--no-eval-outputs"]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (tmp_path / "out" / "sharding_plan.txt").exists():  # the ranks planned: training starts
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.5)
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out[-2000:], err[-4000:])
    assert "stopped by SIGTERM after step" in err and "rerun the same command to resume" in err, err[-4000:]
    assert "Traceback" not in err, err[-4000:]
    saved = sorted((tmp_path / "ck").glob("step_*"))
    assert saved and int(saved[-1].name.split("_")[1]) > 0
    assert not (tmp_path / "out" / "metrics.json").exists()  # the run is not finished
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"resumed from {saved[-1]}" in done.stdout, done.stdout[-3000:]
    assert (tmp_path / "out" / "metrics.json").exists()
