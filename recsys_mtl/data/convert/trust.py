"""Ciao and Epinions (the mTrust / eTrust releases of Tang et al.) → an "interactions" dataset.

Raw format (the same for both sites): two MATLAB ``.mat`` files, each holding one matrix
variable (its name is found, not assumed):

* ``rating.mat`` (Ciao: variable ``rating``, int32, 5 columns): one row per rating,
  ``userid, productid, categoryid, rating[, helpfulness]``. 4 to 6 columns are accepted; the
  columns after the rating (helpfulness, a timestamp in some variants) are not used.
* ``trustnetwork.mat`` (variable ``trustnetwork``): one row ``truster, trustee`` per trust
  statement ("user 1 trusts user 2"); a third column, if present, is not used.

Ids are positive integers (MATLAB numbering); integral floating-point matrices are accepted.
The two inputs are told apart by their variable names, else their file names (``rating`` /
``trust``), else their column counts, in any order.

Conversion (the recommendation setting of PMTRec, §4.1):

1. Ratings are loaded whole; repeated ``(user, product)`` pairs are kept once (the first row).
2. ``core > 0``: users and products with fewer than ``core`` interactions are removed, again and
   again until none is left (the K-core); ``core = 0`` keeps the raw counts.
3. Ids: the users with at least one kept rating, sorted by raw id, become ``0 .. n_users - 1``;
   the same for products (``item``) and for the categories assigned to them. An item's category
   is the most frequent ``categoryid`` over all of its raw rating rows (ties: the smallest id).
4. Split: the interactions (in file order) are shuffled with
   ``numpy.random.default_rng(seed).permutation`` and cut into train / eval / test parts of
   ``round(f0 n)``, ``round((f0 + f1) n) - round(f0 n)`` and the rest (default 0.6 / 0.2 / 0.2,
   seed 2024); each part keeps the shuffled order.
5. Trust edges are mapped to the user ids; edges with an endpoint outside the users (no rating,
   or removed by the core filter), self-loops and repeats are dropped (and counted); the kept
   edges are sorted by ``(user, friend)``.

Output layout (format ``"interactions"``)::

    OUT/schema.json                 # Schema: sparse user, item; tasks rec, social, category
    OUT/train/part-00000.parquet    # user:int64, item:int64, rating:float32 (60%)
    OUT/eval/part-00000.parquet     # the same columns (20%, validation)
    OUT/test/part-00000.parquet     # the same columns (20%)
    OUT/side/trust.parquet          # user:int64, friend:int64 (truster -> trustee)
    OUT/side/item_category.parquet  # item:int64, category:int64, one row per item
    OUT/vocab/user.parquet          # raw:int64, id:int64 (likewise item.parquet, category.parquet)

``schema.metadata`` records ``format``, ``source``, ``seed``, ``split``, ``core``, the numbers of
users, items, categories, interactions per split and trust edges, the side-table paths and the
counts of dropped rows. The directory is written as a sibling ``OUT.tmp-*`` and renamed into
place at the end, so a failed run leaves no partial ``OUT``; an existing non-empty ``OUT`` is
refused unless ``overwrite`` is set.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> import numpy as np, scipy.io
    >>> d = Path(tempfile.mkdtemp())
    >>> ratings = [[u, p, 1 + p % 2, 4, 1] for u in range(1, 6) for p in range(1, 5)]
    >>> scipy.io.savemat(d / "rating.mat", {"rating": np.array(ratings, np.int32)})
    >>> scipy.io.savemat(d / "trustnetwork.mat", {"trustnetwork": np.array([[1, 2], [2, 9], [3, 3]])})
    >>> s = convert_trust("ciao", [d / "trustnetwork.mat", d / "rating.mat"], d / "out", quiet=True)
    >>> s.metadata["num_users"], s.metadata["num_items"], s.metadata["interactions"]
    (5, 4, {'train': 12, 'eval': 4, 'test': 4})
    >>> s.metadata["trust_edges"], s.metadata["trust_dropped"]
    (1, {'unknown_endpoint': 1, 'self_loop': 1, 'duplicate': 0})
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.io
import scipy.sparse

from recsys_mtl.data.convert.common import ConvertError
from recsys_mtl.data.pair_tasks import BUILTIN
from recsys_mtl.data.schema import Schema, SparseFeature, TaskSpec

__all__ = [
    "TRUST_DATASETS", "DEFAULT_SEED", "DEFAULT_SPLIT", "Ratings", "read_mat_matrix", "identify_inputs",
    "load_ratings", "load_trust", "core_filter", "split_sizes", "convert_trust",
]

TRUST_DATASETS: tuple[str, ...] = ("ciao", "epinions")
DEFAULT_SEED = 2024
DEFAULT_SPLIT: tuple[float, float, float] = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "eval", "test")
RATING_COLUMNS = (4, 6)  # accepted column counts of the rating matrix (inclusive)
TRUST_COLUMNS = (2, 3)
_RATING_NAMES = ("userid", "productid", "categoryid", "rating")

INTERACTION_SCHEMA = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("rating", pa.float32())])
TRUST_SCHEMA = pa.schema([("user", pa.int64()), ("friend", pa.int64())])
CATEGORY_SCHEMA = pa.schema([("item", pa.int64()), ("category", pa.int64())])
VOCAB_SCHEMA = pa.schema([("raw", pa.int64()), ("id", pa.int64())])


# --------------------------------------------------------------------------- reading


def read_mat_matrix(path: str | Path) -> tuple[str, np.ndarray]:
    """The single matrix variable of a MATLAB (v4 to v7) ``.mat`` file.

    Args:
        path (str | Path): the file.

    Returns:
        tuple[str, np.ndarray]: the variable's name and its ``[rows, columns]`` numeric matrix.

    Raises:
        ConvertError: missing or unreadable file, not a ``.mat`` file (or a v7.3 / HDF5 one), no
        or several variables, a variable that is not a non-empty 2-D numeric matrix.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: input file not found")
    try:
        contents = scipy.io.loadmat(path)
    except NotImplementedError:
        raise ConvertError(f"{path}: a MATLAB v7.3 (HDF5) file, which is not read; save it with -v7") from None
    except Exception as e:  # scipy raises ValueError, MatReadError, TypeError, ... for non-.mat input
        raise ConvertError(f"{path}: not a MATLAB .mat file ({type(e).__name__}: {e})") from None
    names = [k for k in contents if not k.startswith("__")]
    if not names:
        raise ConvertError(f"{path}: no matrix variable in the .mat file")
    if len(names) > 1:
        raise ConvertError(f"{path}: expected one matrix variable, found {sorted(names)}")
    name = names[0]
    value = contents[name]
    if scipy.sparse.issparse(value):
        value = value.toarray()
    if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype.kind not in "iuf":
        kind = (f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray)
                else type(value).__name__)
        raise ConvertError(f"{path}: variable {name!r} is not a numeric matrix ({kind})")
    if value.shape[0] == 0:
        raise ConvertError(f"{path}: variable {name!r} has no rows")
    return name, value


def _role(path: Path, name: str, matrix: np.ndarray) -> str | None:
    """``"rating"`` or ``"trust"`` from the variable name, the file name, then the column count."""
    for text in (name.lower(), path.name.lower()):
        if "rating" in text and "trust" not in text:
            return "rating"
        if "trust" in text and "rating" not in text:
            return "trust"
    cols = matrix.shape[1]
    if RATING_COLUMNS[0] <= cols <= RATING_COLUMNS[1]:
        return "rating"
    if TRUST_COLUMNS[0] <= cols <= TRUST_COLUMNS[1]:
        return "trust"
    return None


def identify_inputs(inputs: Sequence[str | Path]) -> dict[str, tuple[Path, str, np.ndarray]]:
    """Reads the two input files and tells the rating file from the trust file.

    Args:
        inputs (Sequence[str | Path]): the rating and trust-network ``.mat`` files, any order.

    Returns:
        dict[str, tuple[Path, str, np.ndarray]]: ``{"rating": (path, variable, matrix),
        "trust": (...)}``.

    Raises:
        ConvertError: not exactly two inputs, an unreadable one, or not one file of each kind.
    """
    paths = [Path(p) for p in inputs]
    if len(paths) != 2:
        raise ConvertError(f"expected two inputs (rating.mat and trustnetwork.mat), got {len(paths)}: "
                           f"{[str(p) for p in paths]}")
    found: dict[str, tuple[Path, str, np.ndarray]] = {}
    for path in paths:
        name, matrix = read_mat_matrix(path)
        role = _role(path, name, matrix)
        if role is None:
            raise ConvertError(f"{path}: cannot tell whether variable {name!r} ({matrix.shape[1]} columns) holds "
                               f"ratings or trust edges")
        if role in found:
            raise ConvertError(f"{path}: a second {role} file (after {found[role][0]}); expected one rating file and "
                               f"one trust-network file")
        found[role] = (path, name, matrix)
    for role, what in (("rating", "rating.mat"), ("trust", "trustnetwork.mat")):
        if role not in found:
            raise ConvertError(f"no {what} among the inputs {[str(p) for p in paths]}")
    return found


def _int_column(path: Path, var: str, matrix: np.ndarray, col: int, label: str, minimum: int) -> np.ndarray:
    """Column ``col`` as int64, checked to be integers ``>= minimum`` (the error names the row)."""
    x = matrix[:, col]
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x) | (x != np.round(x))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ConvertError(f"{path}: variable {var!r}, row {r + 1}, column {col + 1} ({label}): expected an "
                               f"integer id, got {x[r]!r}")
        if np.abs(x).max() >= 2.0**53:
            raise ConvertError(f"{path}: variable {var!r}, column {col + 1} ({label}): ids too large")
    elif x.dtype.kind == "u" and x.dtype.itemsize == 8 and x.max() > np.iinfo(np.int64).max:
        raise ConvertError(f"{path}: variable {var!r}, column {col + 1} ({label}): ids too large")
    out = x.astype(np.int64)
    bad = out < minimum
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        want = "a positive integer id" if minimum == 1 else f"an integer id >= {minimum}"
        raise ConvertError(f"{path}: variable {var!r}, row {r + 1}, column {col + 1} ({label}): expected {want}, "
                           f"got {out[r]}")
    return out


@dataclass(frozen=True)
class Ratings:
    """The rating rows of a release (raw ids, file order).

    Args:
        user (np.ndarray): ``[N]`` int64 raw user ids (``>= 1``).
        item (np.ndarray): ``[N]`` int64 raw product ids (``>= 1``).
        category (np.ndarray): ``[N]`` int64 raw category ids (``>= 0``).
        rating (np.ndarray): ``[N]`` float32 rating values.
    """

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    rating: np.ndarray

    def __len__(self) -> int:
        return int(self.user.size)

    def take(self, index: np.ndarray) -> "Ratings":
        """The rows ``index`` (an index or boolean mask), in that order."""
        return Ratings(self.user[index], self.item[index], self.category[index], self.rating[index])


def load_ratings(path: Path, var: str, matrix: np.ndarray) -> Ratings:
    """Checks and splits a rating matrix into columns.

    Args:
        path (Path): the file (for messages).
        var (str): the variable name (for messages).
        matrix (np.ndarray): ``[N, 4..6]`` rows ``userid, productid, categoryid, rating, ...``.

    Returns:
        Ratings: the columns.

    Raises:
        ConvertError: a wrong column count, non-integer or non-positive ids, non-finite ratings.
    """
    cols = matrix.shape[1]
    if not RATING_COLUMNS[0] <= cols <= RATING_COLUMNS[1]:
        raise ConvertError(f"{path}: variable {var!r} has {cols} columns; a rating matrix has 4 to 6 "
                           f"(userid, productid, categoryid, rating[, helpfulness, ...])")
    user = _int_column(path, var, matrix, 0, _RATING_NAMES[0], 1)
    item = _int_column(path, var, matrix, 1, _RATING_NAMES[1], 1)
    category = _int_column(path, var, matrix, 2, _RATING_NAMES[2], 0)
    rating = matrix[:, 3].astype(np.float32)
    bad = ~np.isfinite(rating)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise ConvertError(f"{path}: variable {var!r}, row {r + 1}, column 4 (rating): not a finite number")
    return Ratings(user, item, category, rating)


def load_trust(path: Path, var: str, matrix: np.ndarray) -> np.ndarray:
    """Checks a trust matrix; returns its ``[E, 2]`` int64 ``(truster, trustee)`` raw ids.

    Raises:
        ConvertError: a wrong column count, non-integer or non-positive ids.
    """
    cols = matrix.shape[1]
    if not TRUST_COLUMNS[0] <= cols <= TRUST_COLUMNS[1]:
        raise ConvertError(f"{path}: variable {var!r} has {cols} columns; a trust matrix has 2 (truster, trustee)")
    return np.stack([_int_column(path, var, matrix, 0, "truster", 1),
                     _int_column(path, var, matrix, 1, "trustee", 1)], axis=1)


# --------------------------------------------------------------------------- transforms


def _first_of_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Increasing row indices of the first occurrence of every distinct ``(a, b)`` pair."""
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return np.sort(first)


def core_filter(user: np.ndarray, item: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions in the ``k``-core: every kept user and item has ``>= k``.

    Users and items below ``k`` are removed repeatedly until the counts are stable.

    Args:
        user (np.ndarray): ``[N]`` user ids of distinct interactions.
        item (np.ndarray): ``[N]`` item ids.
        k (int): minimum interactions; ``<= 1`` keeps everything.

    Returns:
        np.ndarray: ``[N]`` bool.

    Example::

        >>> core_filter(np.array([1, 1, 2, 2, 3]), np.array([7, 8, 7, 8, 7]), 2).tolist()
        [True, True, True, True, False]
    """
    keep = np.ones(user.size, dtype=bool)
    if k <= 1:
        return keep
    _, u_inv = np.unique(user, return_inverse=True)
    _, i_inv = np.unique(item, return_inverse=True)
    while True:
        u_cnt = np.bincount(u_inv[keep], minlength=u_inv.max() + 1 if u_inv.size else 0)
        i_cnt = np.bincount(i_inv[keep], minlength=i_inv.max() + 1 if i_inv.size else 0)
        new = keep & (u_cnt[u_inv] >= k) & (i_cnt[i_inv] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def split_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """``(train, eval, test)`` sizes: ``round(f0 n)``, ``round((f0 + f1) n) - round(f0 n)``, the rest.

    Example::

        >>> split_sizes(10, (0.6, 0.2, 0.2)), split_sizes(7, (0.6, 0.2, 0.2))
        ((6, 2, 2), (4, 2, 1))
    """
    f0, f1, _ = fractions
    a = int(round(f0 * n))
    b = int(round((f0 + f1) * n))
    return a, b - a, n - b


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    fr = tuple(float(x) for x in split)
    if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ConvertError(f"split must be three positive fractions (train, eval, test) summing to 1, got {split}")
    return fr  # type: ignore[return-value]


def _majority_category(item: np.ndarray, category: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(items, category)``: each distinct item's most frequent category, ties to the smallest."""
    pairs = np.stack([item, category], axis=1)
    uniq, counts = np.unique(pairs, axis=0, return_counts=True)
    order = np.lexsort((uniq[:, 1], -counts, uniq[:, 0]))  # item asc, count desc, category asc
    uniq = uniq[order]
    first = np.ones(uniq.shape[0], dtype=bool)
    first[1:] = uniq[1:, 0] != uniq[:-1, 0]
    return uniq[first, 0], uniq[first, 1]


# --------------------------------------------------------------------------- output directory


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConvertError(f"{out}: the output path exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: the output directory is not empty; pass --overwrite (overwrite=True) to "
                           f"replace it")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Moves the finished ``tmp`` directory to ``out`` (replacing an old one if allowed)."""
    _check_out(out, overwrite)
    if out.is_dir():
        old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


# --------------------------------------------------------------------------- driver


def convert_trust(
    name: str,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    seed: int = DEFAULT_SEED,
    split: Sequence[float] = DEFAULT_SPLIT,
    core: int = 0,
    overwrite: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> Schema:
    """Converts a Ciao or Epinions release (``rating.mat`` + ``trustnetwork.mat``) into ``out_dir``.

    Args:
        name (str): ``"ciao"`` or ``"epinions"`` (recorded as the dataset's source).
        inputs (Sequence[str | Path]): the two ``.mat`` files, any order.
        out_dir (str | Path): dataset directory to create (see the module docstring).
        seed (int): seed of the shuffle before the split.
        split (Sequence[float]): train / eval / test fractions.
        core (int): K-core threshold (0 = none).
        overwrite (bool): replace a non-empty ``out_dir``.
        quiet (bool): no progress lines.
        log (Callable[[str], None] | None): receives the progress lines (default: print).

    Returns:
        Schema: the written schema.

    Raises:
        ConvertError: bad input (the message names the file), an empty result, an existing
        non-empty ``out_dir`` without ``overwrite``.
    """
    if name not in TRUST_DATASETS:
        raise ConvertError(f"unknown trust dataset {name!r}; choose from {list(TRUST_DATASETS)}")
    if core < 0:
        raise ConvertError(f"core must be >= 0, got {core}")
    fractions = _check_split(split)
    out = Path(out_dir)
    _check_out(out, overwrite)

    def say(msg: str) -> None:
        if not quiet:
            (log or (lambda m: print(m, flush=True)))(f"{name}: {msg}")

    found = identify_inputs(inputs)
    rating_path, rating_var, rating_matrix = found["rating"]
    trust_path, trust_var, trust_matrix = found["trust"]
    raw = load_ratings(rating_path, rating_var, rating_matrix)
    trust_raw = load_trust(trust_path, trust_var, trust_matrix)
    say(f"loaded {len(raw):,} ratings ({np.unique(raw.user).size:,} users, {np.unique(raw.item).size:,} products) "
        f"from {rating_path} and {trust_raw.shape[0]:,} trust rows from {trust_path}")

    # ---- deduplicate, core filter, map
    inter = raw.take(_first_of_pairs(raw.user, raw.item))
    n_duplicates = len(raw) - len(inter)
    if core > 0:
        inter = inter.take(core_filter(inter.user, inter.item, core))
    if len(inter) == 0:
        raise ConvertError(f"{rating_path}: no interactions left after the {core}-core filter")
    user_raw, user_id = np.unique(inter.user, return_inverse=True)
    item_raw, item_id = np.unique(inter.item, return_inverse=True)
    cat_items, cat_of_item = _majority_category(raw.item, raw.category)
    item_cat_raw = cat_of_item[np.searchsorted(cat_items, item_raw)]
    cat_raw, item_cat = np.unique(item_cat_raw, return_inverse=True)
    n_users, n_items, n_cats = user_raw.size, item_raw.size, cat_raw.size
    say(f"mapped {len(inter):,} interactions ({n_duplicates:,} repeated pairs dropped"
        f"{f', {core}-core' if core else ''}): {n_users:,} users, {n_items:,} items, {n_cats:,} categories")

    # ---- split
    sizes = split_sizes(len(inter), fractions)
    for part, size in zip(SPLIT_NAMES, sizes):
        if size == 0:
            raise ConvertError(f"{rating_path}: the {part} split would be empty ({len(inter)} interactions, "
                               f"split {list(fractions)})")
    perm = np.random.default_rng(seed).permutation(len(inter))
    bounds = np.cumsum((0,) + sizes)
    parts = {part: perm[bounds[j]:bounds[j + 1]] for j, part in enumerate(SPLIT_NAMES)}
    say(f"split (seed {seed}): " + ", ".join(f"{p} {s:,}" for p, s in zip(SPLIT_NAMES, sizes)))

    # ---- trust edges
    t_user = np.searchsorted(user_raw, trust_raw[:, 0]).clip(max=n_users - 1)
    t_friend = np.searchsorted(user_raw, trust_raw[:, 1]).clip(max=n_users - 1)
    known = (user_raw[t_user] == trust_raw[:, 0]) & (user_raw[t_friend] == trust_raw[:, 1])
    self_loop = known & (trust_raw[:, 0] == trust_raw[:, 1])
    t_user, t_friend = t_user[known & ~self_loop], t_friend[known & ~self_loop]
    edges = np.unique(np.stack([t_user, t_friend], axis=1).reshape(-1, 2), axis=0)  # sorted, repeats removed
    dropped = {"unknown_endpoint": int((~known).sum()), "self_loop": int(self_loop.sum()),
               "duplicate": int(t_user.size - edges.shape[0])}
    say(f"trust edges: kept {edges.shape[0]:,} of {trust_raw.shape[0]:,} (dropped {dropped['unknown_endpoint']:,} "
        f"with an endpoint outside the users, {dropped['self_loop']:,} self-loops, {dropped['duplicate']:,} "
        f"repeats)")
    if edges.shape[0] == 0:
        raise ConvertError(f"{trust_path}: no trust edge left between the {n_users:,} users")

    # ---- write into a sibling directory, then move it into place
    counts = {part: int(idx.size) for part, idx in parts.items()}
    schema = Schema(
        sparse=(SparseFeature("user", n_users, side="user"), SparseFeature("item", n_items, side="item")),
        dense=(),
        tasks=(TaskSpec("rec"), TaskSpec("social"), TaskSpec("category")),
        user_id_feature="user",
        metadata={
            "format": "interactions",
            "source": name,
            "converter": name,
            "inputs": {"rating": str(rating_path), "trust": str(trust_path)},
            "seed": int(seed),
            "split": list(fractions),
            "core": int(core),
            "num_users": int(n_users),
            "num_items": int(n_items),
            "num_categories": int(n_cats),
            "interactions": counts,
            "trust_edges": int(edges.shape[0]),
            "side": {"trust": "side/trust.parquet", "item_category": "side/item_category.parquet"},
            "pair_tasks": {name: task.to_dict() for name, task in BUILTIN.items()},
            "raw": {"ratings": len(raw), "repeated_pairs": n_duplicates, "trust_rows": int(trust_raw.shape[0])},
            "trust_dropped": dropped,
            "vocab": {"user": "vocab/user.parquet", "item": "vocab/item.parquet",
                      "category": "vocab/category.parquet"},
        },
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        for part, idx in parts.items():
            cols = [pa.array(user_id[idx].astype(np.int64)), pa.array(item_id[idx].astype(np.int64)),
                    pa.array(inter.rating[idx], pa.float32())]
            _write(pa.Table.from_arrays(cols, schema=INTERACTION_SCHEMA), tmp / part / "part-00000.parquet")
        _write(pa.Table.from_arrays([pa.array(edges[:, 0]), pa.array(edges[:, 1])], schema=TRUST_SCHEMA),
               tmp / "side" / "trust.parquet")
        cols = [pa.array(np.arange(n_items, dtype=np.int64)), pa.array(item_cat.astype(np.int64))]
        _write(pa.Table.from_arrays(cols, schema=CATEGORY_SCHEMA), tmp / "side" / "item_category.parquet")
        for feat, values in (("user", user_raw), ("item", item_raw), ("category", cat_raw)):
            _write(pa.Table.from_arrays([pa.array(values.astype(np.int64)),
                                         pa.array(np.arange(values.size, dtype=np.int64))], schema=VOCAB_SCHEMA),
                   tmp / "vocab" / f"{feat}.parquet")
        schema.save(tmp)
        _publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"wrote {out}")
    return schema
