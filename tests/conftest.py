"""Shared test set-up. ``multirank`` (beside this file) runs functions on several gloo ranks."""

import os

# Two CPU cores: keep each test process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
