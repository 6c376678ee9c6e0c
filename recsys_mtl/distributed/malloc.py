"""glibc malloc thresholds for a training process: keep freed step buffers instead of returning
them to the kernel, so the next step does not page-fault them back in.

PyTorch's CPU allocator is plain ``malloc``/``free``. A training step allocates and frees the same
activations and gradients every step; glibc returns the free top of its heap to the kernel once
it exceeds ``M_TRIM_THRESHOLD`` (dynamic by default: twice the mmap threshold, at most 64 MiB),
and the next step's allocations fault every page back in, zero-filled. On the 2-core benchmark
VM (2026-12-02) recsys_mtl's W1 step shrank and regrew its heap by ~60 MiB each step: 9,000-11,000
minor faults and ~6-10 ms of an ~80 ms step (the plain-PyTorch peer's step, measured the same way,
took none). :func:`tune_malloc` fixes the thresholds through glibc's own
``mallopt`` (what ``GLIBC_TUNABLES=glibc.malloc.*`` would set at exec time, applied from Python
after start): a trim threshold of :data:`TRIM_THRESHOLD` and the mmap threshold at glibc's
64-bit maximum, which also turns glibc's dynamic adjustment off. A replacement allocator
(jemalloc, tcmalloc through ``LD_PRELOAD``) avoids the same faults and needs a system package
and a launcher change; this needs neither, hence a few lines of ``ctypes`` here.

``RECSYS_MTL_MALLOC=default`` leaves glibc as it is; so does a process that already chose
(``GLIBC_TUNABLES`` naming ``glibc.malloc.``, or jemalloc/tcmalloc in ``LD_PRELOAD``), and any
non-glibc C library. The setting is process-wide: ``recsys-mtl train`` applies it on every rank
before building the model, ``recsys-mtl bench`` before building any contender (so peers in the
same process run under it too).
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_malloc", "malloc_state", "check_env", "release_free_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "ENV"]

ENV = "RECSYS_MTL_MALLOC"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # glibc's upper limit on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 * 2**30  # free heap top kept before returning memory to the kernel

_applied: dict | None = None


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


MODES = ("tuned", "default")


def check_env() -> str:
    """``RECSYS_MTL_MALLOC`` (``tuned`` when unset), validated.

    Raises:
        ValueError: it is neither ``tuned`` nor ``default``.
    """
    mode = os.environ.get(ENV, "tuned")
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _skip_reason() -> str | None:
    if check_env() == "default":
        return f"{ENV}=default"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets malloc"
    preload = os.environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload:
        return "another allocator is preloaded"
    return None


def tune_malloc() -> dict:
    """Sets glibc's trim and mmap thresholds once per process (later calls return the first answer).

    Returns:
        dict: ``{"malloc": "tuned", "trim_threshold": ..., "mmap_threshold": ...}`` when applied,
        else ``{"malloc": "default", "why": ...}``.

    Raises:
        ValueError: ``RECSYS_MTL_MALLOC`` is neither ``tuned`` nor ``default``.

    Example::

        >>> tune_malloc()["malloc"] in ("tuned", "default")
        True
    """
    global _applied
    if _applied is not None:
        return dict(_applied)
    why = _skip_reason()
    libc = None if why else _libc()
    if why is None and libc is None:
        why = "not glibc"
    if why is None:
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        why = None if ok else "mallopt refused"
    _applied = ({"malloc": "tuned", "trim_threshold": TRIM_THRESHOLD, "mmap_threshold": MMAP_THRESHOLD}
                if why is None else {"malloc": "default", "why": why})
    return dict(_applied)


def malloc_state() -> dict:
    """What :func:`tune_malloc` did in this process, without applying anything (benchmark metadata)."""
    return dict(_applied) if _applied is not None else {"malloc": "default", "why": "not tuned in this process"}


def release_free_memory() -> bool:
    """Returns the heap's free memory to the kernel now (``malloc_trim(0)``), e.g. after freeing a
    model that will not be rebuilt. True if glibc released any; False elsewhere."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
