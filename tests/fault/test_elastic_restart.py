"""Elastic restart: SIGKILL one rank of a 2-rank job mid-run; the elastic agent restarts the
ranks, they resume from the last checkpoint, and the job ends with exactly the metrics of an
undisturbed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _worker_pids(launcher: int) -> list[int]:
    """The rank processes under the launcher: its multiprocessing-spawned children (the elastic
    agent sets RANK inside them after start, so /proc environ cannot tell them apart)."""
    out = []
    for pid in _descendants(launcher):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(pid)
    return sorted(out)


def _train_cmd(data: Path, out: Path, ck: Path) -> list[str]:
    return [str(BIN / "recsys-mtl"), "train", "--data", str(data), "--model", "mmoe", "--output-dir", str(out),
            "--nproc-per-node", "2", "--batch-size", "64", "--steps", "120", "--embedding-dim", "8",
            "--expert-layer-sizes", "32", "--tower-layer-sizes", "8", "--checkpoint-dir", str(ck),
            "--checkpoint-every-steps", "10", "--max-restarts", "1"]


@pytest.mark.e2e
def test_sigkill_of_a_rank_restarts_and_resumes_to_the_same_result(tmp_path):
    from recsys_mtl.data.synth import generate_recsys

    data = tmp_path / "data"
    generate_recsys(data, rows=3000, seed=2, num_users=100, num_items=150, rows_per_file=1000, row_group_size=250)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")

    ref = subprocess.run(_train_cmd(data, tmp_path / "ref", tmp_path / "ck_ref"), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    log = open(tmp_path / "faulted.log", "w+")
    proc = subprocess.Popen(_train_cmd(data, tmp_path / "out", tmp_path / "ck"), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ck" / "step_00000030").exists():  # mid-run: 3 checkpoints written
            assert proc.poll() is None and time.monotonic() < deadline, "job ended before the fault was injected"
            time.sleep(0.02)
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGKILL)
        killed_at = max(int(p.name.split("_")[1]) for p in (tmp_path / "ck").glob("step_*"))
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log.seek(0)
    text = log.read()
    assert killed_at < 120, "the kill landed after training"
    assert "SIGKILL" in text and "resumed from" in text, text[-3000:]

    want = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert got["steps"] == want["steps"] == 120
    assert got["tasks"] == want["tasks"]  # bit-identical: same AUC, logloss, NE
