"""glibc malloc thresholds (recsys_mtl.distributed.malloc): with them, buffers a step frees come
back without page faults; with glibc's own, glibc trims the heap and the next step faults them in again.

The settings are process-wide and sticky, so every behaviour check runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from recsys_mtl.distributed import malloc

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A "step" that allocates 16 buffers of 8 MiB (below the mmap threshold: heap memory), touches every
# page and frees them. It calls libc's malloc/free directly, as PyTorch's CPU allocator does, so
# no Python or tensor objects land between the buffers and the heap layout is the same every run
# (with torch tensors, a small allocation sometimes ends up above the buffers and blocks the trim).
_STEPS = r"""
import ctypes, json, resource
from recsys_mtl.distributed.malloc import tune_malloc
state = tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.restype, libc.memset.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt
size, n = 8 * 2**20, 16
per_step, ptrs = [0] * 6, [0] * n
for step in range(6):
    f0 = faults()
    for i in range(n):
        ptrs[i] = libc.malloc(size)
        libc.memset(ptrs[i], 1, size)
    for i in reversed(range(n)):
        libc.free(ptrs[i])
    per_step[step] = faults() - f0
print(json.dumps({"state": state, "faults": per_step}))
"""


def _run(code: str, **env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in (malloc.ENV, "GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], env=e | env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_tuned_heap_keeps_freed_step_buffers():
    pages = 16 * 8 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # what one step touches
    default = _run(_STEPS, RECSYS_MTL_MALLOC="default")
    tuned = _run(_STEPS)
    assert default["state"] == {"malloc": "default", "why": "RECSYS_MTL_MALLOC=default"}
    assert tuned["state"] == {"malloc": "tuned", "trim_threshold": malloc.TRIM_THRESHOLD,
                              "mmap_threshold": malloc.MMAP_THRESHOLD}
    # glibc's own thresholds: the freed heap top is trimmed, so every step faults its pages in again
    assert min(default["faults"]) > pages // 2, default
    # tuned: the first step faults the heap in; later ones reuse it
    assert tuned["faults"][0] > pages // 2, tuned
    assert max(tuned["faults"][1:]) < pages // 20, tuned


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_respects_a_choice_already_made():
    code = "import json; from recsys_mtl.distributed.malloc import tune_malloc; print(json.dumps(tune_malloc()))"
    assert _run(code, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")["why"] == "GLIBC_TUNABLES sets malloc"
    # (a preloaded jemalloc is recognised by name; nothing is loaded here)
    code_preload = ("import json, os; os.environ['LD_PRELOAD'] = '/usr/lib/libjemalloc.so.2'\n"
                    "from recsys_mtl.distributed.malloc import tune_malloc; print(json.dumps(tune_malloc()))")
    assert _run(code_preload)["why"] == "another allocator is preloaded"
    # once per process: the first answer sticks
    code_twice = ("import json, os; from recsys_mtl.distributed.malloc import tune_malloc\n"
                  "a = tune_malloc(); os.environ['RECSYS_MTL_MALLOC'] = 'default'\n"
                  "print(json.dumps([a, tune_malloc()]))")
    a, b = _run(code_twice)
    assert a == b and a["malloc"] == "tuned"


def test_bad_env_value_is_refused(monkeypatch):
    monkeypatch.setenv(malloc.ENV, "off")
    with pytest.raises(ValueError, match="RECSYS_MTL_MALLOC must be one of tuned, default, got 'off'"):
        malloc.check_env()
    monkeypatch.delenv(malloc.ENV)
    assert malloc.check_env() == "tuned"


def test_cli_refuses_bad_env_before_training(tmp_path):
    env = os.environ | {malloc.ENV: "off"}
    out = subprocess.run([sys.executable, "-m", "recsys_mtl.cli", "train", "--data", str(tmp_path / "none"),
                          "--model", "mmoe", "--output-dir", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "RECSYS_MTL_MALLOC must be one of tuned, default, got 'off'" in out.stderr
    assert not (tmp_path / "out").exists()
