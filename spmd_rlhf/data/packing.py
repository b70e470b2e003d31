"""Token-budget micro-batches and sequence packing of ``TokenBatch`` rows.

Planning (``plan_micro_batches``): rows are grouped so that each group's real tokens fit
``max_tokens`` (a row longer than the budget gets a group of its own), balanced by the
longest-processing-time rule: rows sorted longest first, each into the currently lightest group;
if that overflows the budget, the plan is retried with one group more. Deterministic: ties break
on row index, then group index. FSDP2 runs its collectives per micro-batch, so every rank must run
the SAME number of micro-batches: each rank counts its own (``count_micro_batches``), the caller
all-reduces the MAX and plans again with ``num_micro`` set to it.

Packing (``pack``): a group's rows become one ``[1, N]`` row of their real tokens, concatenated in
the group's order, positions restarting at 0 per sequence, plus ``cu_seqlens`` for the attention
(``models/attention.py``). Everything the losses see keeps ``TokenBatch``'s alignment, with B = 1:
column ``i`` of ``loss_mask_1M`` (M = N - 1) refers to token ``i + 1`` of ``input_ids_1N``, i.e. to
the logits at packed position ``i``. The column of a sequence's last token would predict the next
sequence's first token: it is always 0 in the mask and never maps to a padded column.
``unpack`` / ``pack_values`` move per-token values between that layout and the padded
``[S, W]`` layout of the same rows (``W`` = longest row - 1, the width of
``batch.select(rows).loss_mask_BT``) by index tensors only: no device synchronisation, and the
gradient flows both ways.

Sequence parallel (``distributed.sp``) splits a packed row evenly over its ranks: ``padded``
appends filler tokens (one segment of their own, positions from 0, nothing to learn) so that N
divides by the group size.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, fields

import torch

from .batch import TokenBatch


def _lpt(lengths: list[int], count: int, max_tokens: int) -> list[list[int]] | None:
    """Longest first into the lightest of ``count`` groups; None if a group would pass the budget
    (a row alone in a group may). Groups keep ascending row order; empty groups come last."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    heap = [(0, g) for g in range(count)]
    groups: list[list[int]] = [[] for _ in range(count)]
    for i in order:
        load, g = heapq.heappop(heap)
        if load > 0 and load + lengths[i] > max_tokens:
            return None  # the lightest group has the most room: no group can take row i
        groups[g].append(i)
        heapq.heappush(heap, (load + lengths[i], g))
    return sorted((sorted(g) for g in groups), key=lambda g: (not g, g[0] if g else 0))


def _split_heaviest(groups: list[list[int]], lengths: list[int]) -> None:
    """Split the group of most tokens among those of 2+ rows in two balanced halves (in place);
    halves never exceed the whole, so a plan within budget stays within budget."""
    splittable = [g for g in groups if len(g) >= 2]
    assert splittable, "no group of two or more rows left to split"
    group = max(splittable, key=lambda g: (sum(lengths[i] for i in g), -g[0]))
    halves = _lpt([lengths[i] for i in group], 2, math.inf)
    groups[groups.index(group)] = [group[i] for i in halves[0]]
    groups.append([group[i] for i in halves[1]])


def plan_micro_batches(lengths: list[int], max_tokens: int, num_micro: int | None = None) -> list[list[int]]:
    """Groups of row indices (each row exactly once) whose token totals fit ``max_tokens``.

    ``lengths[i]`` is the number of real tokens of row ``i`` (prompt + response). A row longer than
    ``max_tokens`` gets a group of its own. Without ``num_micro``: the fewest groups the balancing
    rule finds (see the module docstring). With ``num_micro``: exactly that many groups, which must
    be at least this rank's own count (pass the max over ranks of ``count_micro_batches``); the
    extra groups share the rows, so each holds fewer tokens. Groups are non-empty whenever
    ``len(lengths) >= num_micro`` (always true when ranks hold equally many rows, since a count
    never exceeds the number of rows); otherwise the surplus groups are empty lists, placed last,
    and ``pack(batch, [])`` gives the matching dummy micro-batch.
    """
    assert max_tokens > 0, f"max_tokens must be positive, got {max_tokens}"
    assert all(n > 0 for n in lengths), "every row has at least one token"
    if not lengths:
        return [[] for _ in range(num_micro or 0)]
    over = sum(n > max_tokens for n in lengths)
    count = max(1, over + math.ceil(sum(n for n in lengths if n <= max_tokens) / max_tokens))
    groups = _lpt(lengths, count, max_tokens)
    while groups is None:  # ends at count == len(lengths): every row alone
        count += 1
        groups = _lpt(lengths, count, max_tokens)
    if num_micro is None or num_micro == count:
        return groups
    assert num_micro > count, f"num_micro={num_micro} is below this rank's own count {count}"
    forced = _lpt(lengths, num_micro, max_tokens)
    if forced is not None:
        return forced
    # more groups can overflow where fewer fit (rare): split the fitting plan instead
    while len(groups) < min(num_micro, len(lengths)):
        _split_heaviest(groups, lengths)
    return groups + [[] for _ in range(num_micro - len(groups))]


def count_micro_batches(lengths: list[int], max_tokens: int) -> int:
    """How many micro-batches ``plan_micro_batches(lengths, max_tokens)`` makes."""
    return len(plan_micro_batches(lengths, max_tokens))


@dataclass
class PackedBatch:
    """One micro-batch of S sequences packed into a single row of N tokens (M = N - 1 columns).

    ``row_K`` / ``col_K`` / ``index_K`` list the K = N - S packed columns that predict a token of
    their own sequence: column ``index_K[k]`` of the ``[1, M]`` layout is cell
    ``(row_K[k], col_K[k])`` of the padded ``[S, W]`` layout (sequence ``s`` = ``rows[s]``).
    """

    input_ids_1N: torch.Tensor  # [1, N] the rows' real tokens, concatenated
    position_ids_1N: torch.Tensor  # [1, N] 0..len-1 per sequence
    loss_mask_1M: torch.Tensor  # [1, N-1] float, aligned like TokenBatch.loss_mask_BT
    cu_seqlens: torch.Tensor  # [S+1] int32 sequence starts, then N
    max_seqlen: int
    row_K: torch.Tensor  # [K] long
    col_K: torch.Tensor  # [K] long
    index_K: torch.Tensor  # [K] long, into the M columns
    rows: list[int]  # the batch rows, in packed order (empty: a dummy micro-batch)
    lengths: list[int]  # their token counts
    width: int  # W = max(2, longest row) - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids_1N.shape[1]

    def to(self, device: torch.device, non_blocking: bool = False) -> PackedBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return PackedBatch(**moved)

    def padded(self, multiple: int) -> PackedBatch:
        """The same row with filler tokens appended until N is a multiple of ``multiple``: their
        own ``cu_seqlens`` segment, positions 0.., zero loss mask; K, rows and width unchanged."""
        extra = -self.num_tokens % multiple
        if extra == 0:
            return self
        ids, positions, mask = self.input_ids_1N, self.position_ids_1N, self.loss_mask_1M
        return PackedBatch(
            input_ids_1N=torch.cat([ids, ids[:, -1:].expand(1, extra)], dim=1),
            position_ids_1N=torch.cat([positions, torch.arange(extra, dtype=positions.dtype).unsqueeze(0)], dim=1),
            loss_mask_1M=torch.cat([mask, mask.new_zeros(1, extra)], dim=1),
            cu_seqlens=torch.cat([self.cu_seqlens, self.cu_seqlens.new_tensor([self.num_tokens + extra])]),
            max_seqlen=max(self.max_seqlen, extra), row_K=self.row_K, col_K=self.col_K, index_K=self.index_K,
            rows=self.rows, lengths=self.lengths, width=self.width,
        )

    def unpack(self, values_1M: torch.Tensor, shape: tuple[int, int] | torch.Size | None = None) -> torch.Tensor:
        """The ``[S, W]`` padded layout of per-column values, zero where no packed column maps
        (each row's padding and last token); ``shape`` may widen W. Differentiable."""
        rows, width = tuple(shape) if shape is not None else (len(self.rows), self.width)
        assert rows == len(self.rows) and width >= self.width, f"shape {(rows, width)} vs {len(self.rows), self.width}"
        assert values_1M.shape == self.loss_mask_1M.shape, f"{values_1M.shape} != {self.loss_mask_1M.shape}"
        out_SW = values_1M.new_zeros(rows, width)
        return out_SW.index_put((self.row_K, self.col_K), values_1M[0, self.index_K])

    def pack_values(self, values_SW: torch.Tensor) -> torch.Tensor:
        """Per-token values of the rows in the padded ``[S, >=W]`` layout (e.g. advantages,
        old logprobs: ``targets_BT[rows]``) in the ``[1, M]`` layout; zero on unmapped columns."""
        assert values_SW.shape[0] == len(self.rows) and values_SW.shape[1] >= self.width, tuple(values_SW.shape)
        out_1M = values_SW.new_zeros(self.loss_mask_1M.shape)
        return out_1M.index_put((torch.zeros_like(self.index_K), self.index_K), values_SW[self.row_K, self.col_K])


def _dummy(batch: TokenBatch) -> PackedBatch:
    """Two tokens, nothing to learn: keeps a rank with no rows in step with the others."""
    token = int(batch.input_ids_BT[0, 0]) if batch.size else 0
    empty = torch.zeros(0, dtype=torch.long)
    return PackedBatch(
        input_ids_1N=torch.full((1, 2), token, dtype=torch.long),
        position_ids_1N=torch.arange(2).unsqueeze(0),
        loss_mask_1M=torch.zeros(1, 1, dtype=batch.loss_mask_BT.dtype),
        cu_seqlens=torch.tensor([0, 2], dtype=torch.int32),
        max_seqlen=2, row_K=empty, col_K=empty, index_K=empty, rows=[], lengths=[], width=1,
    )


def pack(batch: TokenBatch, rows: list[int]) -> PackedBatch:
    """Pack ``rows`` of a right-padded host ``batch`` (positions 0..len-1, as ``collate`` makes).

    ``rows == []`` (a surplus group of a forced plan) gives a dummy: 2 tokens, one sequence,
    ``loss_mask_1M`` all zero and K = 0, so ``unpack`` returns ``[0, W]``; the caller still runs
    its forward and backward (collectives), with a loss that is zero but connected to the output.
    """
    if not rows:
        return _dummy(batch)
    assert len(set(rows)) == len(rows), "a row may be packed once"
    index_S = torch.tensor(rows, dtype=torch.long)
    mask_SL = batch.attention_mask_BT[index_S].bool()
    lengths_S = mask_SL.sum(dim=1)
    assert bool((lengths_S > 0).all()), "empty row"
    arange_L = torch.arange(mask_SL.shape[1])
    assert torch.equal(mask_SL, arange_L < lengths_S[:, None]), "rows must be right-padded"
    positions_SL = batch.position_ids_BT[index_S]
    assert torch.equal(positions_SL[mask_SL], arange_L.expand_as(mask_SL)[mask_SL]), "positions must be 0..len-1"
    width = max(2, int(lengths_S.max())) - 1
    # per packed token: its sequence s and position t; column i predicts token i+1 iff t < len_s - 1
    seq_N = torch.repeat_interleave(torch.arange(len(rows)), lengths_S)
    pos_N = positions_SL[mask_SL]
    predicts_N = pos_N < lengths_S[seq_N] - 1
    index_K = torch.nonzero(predicts_N).squeeze(1)
    row_K, col_K = seq_N[index_K], pos_N[index_K]
    loss_mask_1M = torch.zeros(1, int(lengths_S.sum()) - 1, dtype=batch.loss_mask_BT.dtype)
    loss_mask_1M[0, index_K] = batch.loss_mask_BT[index_S][row_K, col_K]
    cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(lengths_S, 0)
    return PackedBatch(
        input_ids_1N=batch.input_ids_BT[index_S][mask_SL].unsqueeze(0),
        position_ids_1N=pos_N.unsqueeze(0),
        loss_mask_1M=loss_mask_1M,
        cu_seqlens=cu_seqlens,
        max_seqlen=int(lengths_S.max()),
        row_K=row_K, col_K=col_K, index_K=index_K,
        rows=list(rows), lengths=lengths_S.tolist(), width=width,
    )
