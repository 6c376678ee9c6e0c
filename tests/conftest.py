"""Shared test set-up. ``multirank`` (beside this file) runs functions on several gloo ranks."""

import os

# Two CPU cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# float32 CPU GEMMs: oneDNN's, whatever this machine's calibration would pick, so every run tests
# the same path (and the path the benchmark machine takes); tests of ATen's path force it.
os.environ.setdefault("RECSYS_MTL_CPU_GEMM", "onednn")
