"""Full-ranking top-K metrics for the recommendation task: Recall@K, NDCG@K and HitRate@K.

Every user is ranked against **all** items except those in an exclusion set (usually the user's
train items, so the ranking is over the items the user has not interacted with), and the top-K
list is compared with the user's held-out items. The definitions follow the LightGCN / NGCF
evaluation code, averaged over the users that have at least one held-out item:

* ``recall@K`` = |top-K ∩ test| / |test|
* ``ndcg@K`` = DCG@K / IDCG@K, with DCG@K = Σ 1 / log2(i + 1) over the 1-based ranks ``i <= K``
  whose item is a test item, and IDCG@K the same sum over ``min(|test|, K)`` ideal hits
* ``hit@K`` = 1 if any test item is in the top-K, else 0

Ranking rule (deterministic): items are ordered by decreasing score, **ties by increasing item
index**; NaN scores rank as ``-inf``. An item whose score is ``-inf`` (excluded, or so scored)
is never a hit, so when K exceeds the number of candidates the top-K list simply holds fewer
real entries. Test items that are also excluded can never be hit but still count in |test|.

:func:`topk_metrics` scores one batch of users; :func:`full_ranking_eval` runs the whole
evaluation, batched and split across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

__all__ = ["RANKING_KS", "InteractionSets", "topk_metrics", "full_ranking_eval", "metric_names"]

RANKING_KS: tuple[int, ...] = (5, 10, 20, 40)
_METRICS = ("recall", "ndcg", "hit")


def metric_names(ks: Sequence[int] = RANKING_KS) -> list[str]:
    """``["recall@5", ..., "hit@40"]``: every metric at every K, metric-major."""
    return [f"{m}@{k}" for m in _METRICS for k in ks]


def _as_long(x: torch.Tensor | np.ndarray | Sequence[int]) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.int64).reshape(-1)
    return torch.as_tensor(np.asarray(x, dtype=np.int64).reshape(-1))


class InteractionSets:
    """Per-user sorted, deduplicated item lists in CSR form.

    User ``u`` owns ``indices[indptr[u]:indptr[u + 1]]`` (increasing item ids). Tensors live on
    the CPU; :meth:`mask_index` moves its result to a device on request.

    Args:
        indptr (torch.Tensor): ``[num_users + 1]`` int64 row offsets.
        indices (torch.Tensor): ``[nnz]`` int64 item ids, sorted within each user, no repeats.

    Example::

        >>> s = InteractionSets.from_pairs([2, 0, 2, 2], [5, 1, 3, 5], num_users=3)
        >>> s.indptr.tolist(), s.indices.tolist()
        ([0, 1, 1, 3], [1, 3, 5])
        >>> s.counts(torch.tensor([2, 1])).tolist()
        [2, 0]
        >>> [t.tolist() for t in s.mask_index(torch.tensor([2, 0]))]
        [[0, 0, 1], [3, 5, 1]]
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor) -> None:
        self.indptr = indptr.to("cpu", torch.int64).contiguous()
        self.indices = indices.to("cpu", torch.int64).contiguous()
        if self.indptr.dim() != 1 or self.indptr.numel() < 1 or int(self.indptr[0]) != 0 \
                or int(self.indptr[-1]) != self.indices.numel():
            raise ValueError("InteractionSets: indptr must start at 0 and end at len(indices)")

    @classmethod
    def from_pairs(
        cls,
        users: torch.Tensor | np.ndarray | Sequence[int],
        items: torch.Tensor | np.ndarray | Sequence[int],
        num_users: int,
    ) -> "InteractionSets":
        """Builds the sets from parallel ``(user, item)`` arrays (repeated pairs count once).

        Args:
            users (Tensor | ndarray | Sequence[int]): ``[N]`` user ids in ``[0, num_users)``.
            items (Tensor | ndarray | Sequence[int]): ``[N]`` item ids, ``>= 0``.
            num_users (int): number of users (rows of the CSR).

        Returns:
            InteractionSets: the per-user item sets.
        """
        u, i = _as_long(users), _as_long(items)
        if u.numel() != i.numel():
            raise ValueError(f"InteractionSets: {u.numel()} users but {i.numel()} items")
        if u.numel() and (int(u.min()) < 0 or int(u.max()) >= num_users):
            raise ValueError(f"InteractionSets: user ids must lie in [0, {num_users})")
        if i.numel() and int(i.min()) < 0:
            raise ValueError("InteractionSets: item ids must be >= 0")
        # Sort by (user, item): stable sort by item, then stable sort by user.
        order = torch.sort(i, stable=True).indices
        order = order[torch.sort(u[order], stable=True).indices]
        u, i = u[order], i[order]
        keep = torch.ones(u.numel(), dtype=torch.bool)
        if u.numel() > 1:
            keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
        u, i = u[keep], i[keep]
        indptr = torch.zeros(num_users + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(torch.bincount(u, minlength=num_users), 0)
        return cls(indptr, i)

    @property
    def num_users(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def counts(self, users: torch.Tensor | None = None) -> torch.Tensor:
        """``[U_b]`` int64 set sizes of ``users`` (all users when None)."""
        lengths = self.indptr[1:] - self.indptr[:-1]
        return lengths if users is None else lengths[_as_long(users)]

    def users_with_items(self) -> torch.Tensor:
        """Increasing int64 ids of the users whose set is not empty."""
        return torch.nonzero(self.counts() > 0).reshape(-1)

    def mask_index(
        self, users: torch.Tensor, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row, col)``: ``row[j]`` is the position in ``users`` and ``col[j]`` an item of that user.

        ``scores[row, col]`` addresses every (batch user, item of the set) cell of a
        ``[U_b, I]`` score matrix; rows are increasing, items increasing within a row.

        Args:
            users (torch.Tensor): ``[U_b]`` user ids.
            device (torch.device | str | None): device of the result (default CPU).

        Returns:
            tuple[torch.Tensor, torch.Tensor]: ``[nnz_b]`` int64 row and column indices.
        """
        users = _as_long(users)
        starts = self.indptr[users]
        lengths = self.indptr[users + 1] - starts
        total = int(lengths.sum())
        row = torch.repeat_interleave(torch.arange(users.numel()), lengths)
        first = torch.cumsum(lengths, 0) - lengths  # position of each row's first entry
        offset = torch.arange(total) - torch.repeat_interleave(first, lengths)
        col = self.indices[torch.repeat_interleave(starts, lengths) + offset]
        if device is not None:
            row, col = row.to(device), col.to(device)
        return row, col


def _topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[U_b, k]`` item indices of the top-``k`` of every row: decreasing score, ties by index.

    ``torch.topk`` picks an arbitrary subset of the items tied at the k-th value. In the rows
    where such a tie crosses the cut (the (k+1)-th value equals the k-th value ``t``) the list is
    rebuilt: the items scoring above ``t`` (the head of the sorted top-k values), then the
    lowest-index items scoring exactly ``t`` (a second top-k on ``-index`` over those items).
    Every list is then ordered by (score desc, index asc).
    """
    n_rows, n_items = scores.shape
    if k == 0 or n_rows == 0:
        return torch.zeros(n_rows, k, dtype=torch.int64, device=scores.device)
    probe = min(k + 1, n_items)
    vals, idx = torch.topk(scores, probe, dim=1, largest=True, sorted=True)
    if probe > k:
        cut = vals[:, k - 1]
        tied = torch.nonzero(vals[:, k] == cut).reshape(-1)
        vals, idx = vals[:, :k], idx[:, :k]
        if tied.numel():
            t = cut[tied].unsqueeze(1)
            n_above = (vals[tied] > t).sum(1, keepdim=True)  # [r, 1]; these lead the sorted list
            key_dtype = torch.float32 if n_items <= 1 << 24 else torch.float64  # exact indices
            neg_index = -torch.arange(n_items, device=scores.device, dtype=key_dtype)
            key = torch.where(scores[tied] == t, neg_index, torch.tensor(-math.inf, dtype=key_dtype,
                                                                          device=scores.device))
            lowest = torch.topk(key, k, dim=1, largest=True, sorted=True).indices  # tied items, index asc
            j = torch.arange(k, device=scores.device).unsqueeze(0)
            from_tied = torch.gather(lowest, 1, (j - n_above).clamp(min=0))
            idx = idx.clone()
            idx[tied] = torch.where(j < n_above, idx[tied], from_tied)
    # Order each list by (score desc, index asc): index-sort, then a stable sort on the score.
    idx = torch.sort(idx, dim=1).values
    v = torch.gather(scores, 1, idx)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices
    return torch.gather(idx, 1, order)


def topk_metrics(
    scores: torch.Tensor,
    test: InteractionSets,
    users: torch.Tensor,
    exclude: InteractionSets | None,
    ks: Sequence[int] = RANKING_KS,
    *,
    inplace: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-user full-ranking metrics of one batch of users.

    Args:
        scores (torch.Tensor): ``[U_b, I]`` scores of every item for each batch user (any float
            dtype, any device).
        test (InteractionSets): held-out items per user (the relevant items).
        users (torch.Tensor): ``[U_b]`` int64 user ids, the rows of ``scores``.
        exclude (InteractionSets | None): items never ranked (score set to ``-inf``), usually
            the train interactions; None ranks every item.
        ks (Sequence[int]): cut-offs, each ``>= 1``.
        inplace (bool): write the ``-inf`` of the excluded items into ``scores`` itself
            instead of a copy (saves one ``[U_b, I]`` buffer).

    Returns:
        dict[str, torch.Tensor]: ``recall@K``, ``ndcg@K``, ``hit@K`` for every K (``[U_b]``
        float32 on the scores' device; 0 for users without test items) and ``valid``
        (``[U_b]`` bool: the user has at least one test item; average over these users only).

    Example::

        >>> test = InteractionSets.from_pairs([0, 0, 1], [2, 3, 0], num_users=2)
        >>> train = InteractionSets.from_pairs([0], [0], num_users=2)
        >>> scores = torch.tensor([[9.0, 1.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        >>> m = topk_metrics(scores, test, torch.tensor([0, 1]), train, ks=(1, 2))
        >>> m["recall@1"].tolist(), m["hit@2"].tolist()  # user 1: all tied -> item 0 first
        ([0.5, 1.0], [1.0, 1.0])
        >>> round(m["ndcg@2"][0].item(), 4)  # ranks: item 2, item 1 (item 0 excluded)
        0.6131
    """
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"topk_metrics: every K must be >= 1, got {ks}")
    if scores.dim() != 2:
        raise ValueError(f"topk_metrics: scores must be [U_b, I], got shape {tuple(scores.shape)}")
    users = _as_long(users)
    n_rows, n_items = scores.shape
    if users.numel() != n_rows:
        raise ValueError(f"topk_metrics: {users.numel()} users but {n_rows} score rows")
    device = scores.device
    if not inplace:
        scores = scores.clone()
    scores.masked_fill_(torch.isnan(scores), -math.inf)
    if exclude is not None:
        row, col = exclude.mask_index(users, device)
        if col.numel() and int(col.max()) >= n_items:
            raise ValueError(f"topk_metrics: an excluded item id is >= the {n_items} scored items")
        scores[row, col] = -math.inf
    kmax = max(ks)
    depth = min(kmax, n_items)
    top = _topk_stable(scores, depth)  # [U_b, depth]
    ranked = torch.gather(scores, 1, top) > -math.inf  # a real candidate at that rank
    t_row, t_col = test.mask_index(users, device)
    if t_col.numel() and int(t_col.max()) >= n_items:
        raise ValueError(f"topk_metrics: a test item id is >= the {n_items} scored items")
    test_keys = t_row * n_items + t_col  # sorted: rows increasing, items increasing within a row
    cand = torch.arange(n_rows, device=device).unsqueeze(1) * n_items + top
    if test_keys.numel():
        pos = torch.searchsorted(test_keys, cand).clamp_(max=test_keys.numel() - 1)
        hits = (test_keys[pos] == cand) & ranked
    else:
        hits = torch.zeros_like(ranked)
    hits_f = hits.to(torch.float64)
    discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=device, dtype=torch.float64))  # [kmax]
    ideal = torch.cumsum(discount, 0)  # ideal[j] = IDCG with j + 1 hits
    hit_cum = torch.cumsum(hits_f, 1)  # [U_b, depth]
    dcg_cum = torch.cumsum(hits_f * discount[:depth], 1)
    n_test = test.counts(users).to(device)
    valid = n_test > 0
    denom = n_test.clamp(min=1).to(torch.float64)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        if depth == 0:
            h = dcg = torch.zeros(n_rows, dtype=torch.float64, device=device)
        else:
            h, dcg = hit_cum[:, min(k, depth) - 1], dcg_cum[:, min(k, depth) - 1]
        idcg = ideal[(torch.minimum(n_test, torch.tensor(k, device=device)).clamp(min=1) - 1)]
        zero = torch.zeros_like(h)
        out[f"recall@{k}"] = torch.where(valid, h / denom, zero).float()
        out[f"ndcg@{k}"] = torch.where(valid, dcg / idcg, zero).float()
        out[f"hit@{k}"] = torch.where(valid, (h > 0).to(torch.float64), zero).float()
    out["valid"] = valid
    return {name: out[name] for name in [*metric_names(ks), "valid"]}


def full_ranking_eval(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    test: InteractionSets,
    exclude: InteractionSets | None,
    *,
    num_items: int,
    batch_users: int = 1024,
    ks: Sequence[int] = RANKING_KS,
    rank: int = 0,
    world_size: int = 1,
    group: dist.ProcessGroup | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Full-ranking evaluation of every user with at least one test item, across ranks.

    The users with test items (increasing ids) are dealt round-robin: rank ``r`` evaluates
    positions ``r, r + world_size, ...`` of that list, in batches of ``batch_users``. Every rank
    makes the same number of ``score_fn`` calls, ``ceil(n_users / world_size / batch_users)``,
    because ``score_fn`` may run collectives (a sharded embedding lookup): a rank whose share
    runs out first scores a one-user stand-in batch (the first evaluated user) and discards it.
    The per-rank metric sums and user counts are summed with ``torch.distributed.all_reduce``
    over ``group`` (float64 CPU tensors: ``group`` must be a gloo group such as
    :func:`recsys_mtl.distributed.env.control_group`, or None for the default group when it is
    gloo) and the means returned, so every rank gets the same numbers. ``score_fn`` runs under
    ``torch.no_grad()``; with no user to evaluate no call is made.

    Args:
        score_fn (Callable[[Tensor], Tensor]): ``users [U_b] int64 -> scores [U_b, num_items]``.
        test (InteractionSets): held-out items per user.
        exclude (InteractionSets | None): items not ranked (the train items), or None.
        num_items (int): columns of every score matrix.
        batch_users (int): users per ``score_fn`` call.
        ks (Sequence[int]): cut-offs.
        rank (int): this rank.
        world_size (int): ranks taking part (each must call this with the same arguments).
        group (ProcessGroup | None): gloo group of the all-reduce (``world_size > 1``).
        progress (bool): a tqdm bar on rank 0.

    Returns:
        dict[str, float]: the mean of every metric (``recall@5`` ... ``hit@40``) over the
        evaluated users and ``"users"``, their number (NaN means when no user has test items).

    Example::

        >>> test = InteractionSets.from_pairs([0, 1, 2], [1, 0, 3], num_users=4)
        >>> scores = torch.tensor([[0.0, 2.0, 1.0, 0.5]]).repeat(4, 1)
        >>> r = full_ranking_eval(lambda u: scores[u], test, None, num_items=4, batch_users=2, ks=(1, 2))
        >>> r["users"], r["hit@1"], r["recall@2"]
        (3, 0.3333333333333333, 0.3333333333333333)
    """
    ks = tuple(int(k) for k in ks)
    if batch_users < 1:
        raise ValueError(f"full_ranking_eval: batch_users must be >= 1, got {batch_users}")
    if not 0 <= rank < world_size:
        raise ValueError(f"full_ranking_eval: rank {rank} is outside world_size {world_size}")
    names = metric_names(ks)
    eval_users = test.users_with_items()
    n_users = eval_users.numel()
    mine = eval_users[rank::world_size]
    n_calls = -(-n_users // (world_size * batch_users))  # = ceil(ceil(n_users / world_size) / batch_users)
    sums = torch.zeros(len(names) + 1, dtype=torch.float64)
    for step in tqdm(range(n_calls), desc="full ranking", unit="batch", disable=not (progress and rank == 0)):
        batch = mine[step * batch_users:(step + 1) * batch_users]
        stand_in = batch.numel() == 0
        if stand_in:
            batch = eval_users[:1]
        with torch.no_grad():
            scores = score_fn(batch)
        if tuple(scores.shape) != (batch.numel(), num_items):
            raise ValueError(f"full_ranking_eval: score_fn returned shape {tuple(scores.shape)}, expected "
                             f"({batch.numel()}, {num_items})")
        if stand_in:
            continue
        m = topk_metrics(scores.detach(), test, batch, exclude, ks, inplace=False)
        valid = m["valid"]
        for j, name in enumerate(names):
            sums[j] += float(m[name][valid].to(torch.float64).sum())
        sums[-1] += int(valid.sum())
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    count = int(round(float(sums[-1])))
    result: dict[str, float] = {name: (float(sums[j]) / count if count else math.nan) for j, name in enumerate(names)}
    result["users"] = count
    return result
