"""The reader's resume position: starting at batch k yields exactly the batches an uninterrupted
pass yields after its first k, per rank, with shuffling on and with several DataLoader workers."""

from __future__ import annotations

import pytest

from recsys_mtl.data.reader import make_dataloader


def _fingerprints(data, **kw) -> list[tuple]:
    return [(b.batch_size, float(b.labels.sum()), int(b.sparse.values().sum()), float(b.dense.sum()))
            for b in make_dataloader(data, "train", batch_size=100, world_size=2, shuffle=True, seed=3,
                                     shuffle_block_rows=64, shuffle_buffer_rows=300, **kw)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from recsys_mtl.data.synth import generate_recsys

    d = tmp_path_factory.mktemp("pos")
    # 17 row groups of <= 170 rows over 3 files: ranks and workers get unequal numbers of batches.
    generate_recsys(d, rows=3000, seed=0, num_users=50, num_items=80, rows_per_file=1000, row_group_size=170)
    return d


@pytest.mark.parametrize("num_workers", [0, 2, 3])
@pytest.mark.parametrize("rank", [0, 1])
def test_start_batch_resumes_the_exact_sequence(data, num_workers, rank):
    full = _fingerprints(data, rank=rank, num_workers=num_workers)
    assert len(full) >= 12
    for k in (1, 2, 5, len(full) - 1, len(full)):
        # Worker exhaustion, a position inside a row group, and the end of the epoch.
        assert _fingerprints(data, rank=rank, num_workers=num_workers, start_batch=k) == full[k:], k


def test_start_batch_and_num_batches(data):
    from recsys_mtl.data.reader import ParquetMTLDataset

    ds = ParquetMTLDataset(data, "train", batch_size=100, rank=1, world_size=2, shuffle=True)
    n = ds.num_batches()
    resumed = ParquetMTLDataset(data, "train", batch_size=100, rank=1, world_size=2, shuffle=True, start_batch=3)
    assert resumed.num_batches() == n - 3 == len(list(resumed))
