"""Runs a test file's Triton tests in a fresh pytest process with ``TRITON_INTERPRET=1``.

The variable only takes effect if it is set before ``triton`` is first imported (torchrec imports
it), so the op test files define their ``triton_interpreted`` tests only in a process that has it
and start that process from the ordinary run through :func:`run_interpreted`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys


def run_interpreted(test_file: str, expected: int) -> None:
    """``pytest test_file -k triton_interpreted`` under the interpreter: every one of the
    ``expected`` tests passes and none is skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-k", "triton_interpreted"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert re.search(rf"\b{expected} passed\b", out) and "skipped" not in out, out[-3000:]
