"""Known noise of the pinned stack (torch 2.13, torchrec 1.8.0), filtered by exact message.

Each entry names where it comes from and why it is not actionable for us; warnings that our code
causes are fixed at their cause instead (e.g. the planner topology is built with TopologyFactory).
Only these messages are dropped: anything else from the same libraries still shows.
"""

from __future__ import annotations

import logging
import warnings

# (logger name, message prefix): logging records dropped.
_LOG_NOISE = (
    # torchrec/distributed/planner/planners.py: logged for every data-parallel table, which by
    # design has no sharding spec (it is replicated).
    ("root", "Sharding spec not found for "),
    # torchrec/distributed/utils.py: logged for every data-parallel table although we pass no
    # caching parameters (the fused optimizer parameters are shared by all tables).
    ("torchrec.distributed.utils", "Sharding Type is data_parallel, caching params will be ignored"),
    ("torchrec.distributed.utils", "Compute Kernel is dense, caching params will be ignored"),
    # torchrec/distributed/comm.py: the intra/cross-host process groups of table_row_wise tables;
    # without TORCHREC_RESOLVED_POD_SIZE it uses LOCAL_WORLD_SIZE (what we want) and says so, then
    # logs each group's peers at warning level.
    ("torchrec.distributed.comm", "TORCHREC_RESOLVED_POD_SIZE not set"),
    ("torchrec.distributed.comm", "[Connection] "),
    # torch/fx/_symbolic_trace.py: a one-time notice about an API split, raised inside
    # TrainPipelineSparseDist's tracing of the model.
    ("torch.fx._symbolic_trace", "is_fx_tracing will return true"),
)

# (category, message regex): Python warnings ignored.
_WARNING_NOISE = (
    # torchrec wraps replicated modules in DDP with broadcast_buffers (deprecated in torch 2.13).
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    # torch.distributed.checkpoint on torchrec's ShardedTensor state (torchrec 1.8 still uses it).
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # torchrec's reduce-scatter / all-gather calls use the old collective names.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    # fbgemm-gpu-cpu 1.8.0 registers its dense (data-parallel) lookup without an Autograd kernel;
    # backward through it is correct (tests/distributed compare it with the unsharded model).
    (UserWarning, r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered"),
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


_installed = False


def quiet_known_noise() -> None:
    """Installs the filters once per process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    by_logger: dict[str, list[str]] = {}
    for name, prefix in _LOG_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger() if name == "root" else logging.getLogger(name)
        logger.addFilter(_DropPrefixes(tuple(prefixes)))
    for category, message in _WARNING_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
