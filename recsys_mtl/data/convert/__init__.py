"""Raw public datasets → recsys_mtl datasets (``recsys-mtl data convert``; docs/design.md §3, §4).

Every converter streams its raw files twice (vocabularies and train statistics, then encoding and
writing; see :mod:`recsys_mtl.data.convert.common`) and writes the standard layout::

    OUT/schema.json              # metadata: inputs, split rule, min_count, vocab sizes, rows, ...
    OUT/train/part-*.parquet
    OUT/eval/part-*.parquet
    OUT/vocab/<feature>.parquet  # id, raw value, train count of every id >= 1

Converters (module docstrings give the raw format, tasks, features and split rule):

* ``census-kdd`` — :class:`~recsys_mtl.data.convert.census.CensusKDD`
* ``ali-ccp`` — :class:`~recsys_mtl.data.convert.ali_ccp.AliCCP`
* ``kuairand`` — :class:`~recsys_mtl.data.convert.kuairand.KuaiRand`
* ``icme2019`` — :class:`~recsys_mtl.data.convert.icme2019.ICME2019`

``ciao`` and ``epinions`` (:func:`~recsys_mtl.data.convert.trust.convert_trust`) are not streaming
sources: their ``.mat`` files are loaded whole and written in the "interactions" layout
(``train``/``eval``/``test`` interactions plus ``side/`` trust and item-category tables; see
:mod:`recsys_mtl.data.convert.trust`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from recsys_mtl.data.convert.ali_ccp import AliCCP
from recsys_mtl.data.convert.census import CensusKDD
from recsys_mtl.data.convert.common import ConvertError, Source, run_conversion
from recsys_mtl.data.convert.icme2019 import ICME2019
from recsys_mtl.data.convert.kuairand import KuaiRand
from recsys_mtl.data.convert.trust import TRUST_DATASETS, convert_trust
from recsys_mtl.data.schema import Schema

__all__ = ["CONVERTERS", "ConvertError", "convert", "AliCCP", "CensusKDD", "ICME2019", "KuaiRand",
           "TRUST_DATASETS", "convert_trust"]

CONVERTERS: dict[str, type[Source]] = {
    "census-kdd": CensusKDD,
    "ali-ccp": AliCCP,
    "kuairand": KuaiRand,
    "icme2019": ICME2019,
}


def convert(
    name: str,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    min_count: int = 1,
    rows_per_file: int = 1_048_576,
    row_group_size: int = 16_384,
    progress: bool | None = None,
    **options,
) -> Schema:
    """Converts raw files of dataset ``name`` into ``out_dir``; returns the written schema.

    Args:
        name (str): ``census-kdd``, ``ali-ccp``, ``kuairand`` or ``icme2019``; ``ciao`` and
            ``epinions`` go to :func:`convert_trust` with ``**options`` (``seed``, ``split``,
            ``core``, ``overwrite``, ``quiet``) and ignore the streaming options.
        inputs (Sequence[str | Path]): the raw files (``.gz`` allowed).
        out_dir (str | Path): dataset directory to write.
        min_count (int): values seen fewer times in the train rows map to id 0.
        rows_per_file (int): rows per parquet file.
        row_group_size (int): rows per parquet row group.
        progress (bool | None): tqdm bars on stderr.
        **options: the converter's own options (``eval_fraction``, ``seed``, ``max_rows``,
            ``tasks``, ``split_date``, ``keep_weight``; see each class).

    Example::

        >>> import tempfile
        >>> from pathlib import Path
        >>> raw = Path(tempfile.mkdtemp()) / "final_track2_train.txt"
        >>> _ = raw.write_text("".join(f"{u}\\t1\\t{i}\\t3\\t4\\t0\\t{i % 2}\\t0\\t-1\\t7\\t0\\t15\\n"
        ...                            for u in range(20) for i in range(5)))
        >>> s = convert("icme2019", [raw], tempfile.mkdtemp(), eval_fraction=0.2)
        >>> s.task_names, s.user_id_feature, s.feature("uid").num_embeddings
        (['finish', 'like'], 'uid', 21)
    """
    if name in TRUST_DATASETS:  # whole-file .mat releases, not a streaming Source
        return convert_trust(name, inputs, out_dir, **options)
    if name not in CONVERTERS:
        raise ConvertError(f"unknown dataset {name!r}; choose from {sorted([*CONVERTERS, *TRUST_DATASETS])}")
    source = CONVERTERS[name](inputs, **options)
    return run_conversion(source, out_dir, min_count=min_count, rows_per_file=rows_per_file,
                          row_group_size=row_group_size, progress=progress)
