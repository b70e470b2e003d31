"""Training ranks -> generation ranks weight transfer for split placement (issue 11).

Split placement keeps the actor on the training ranks (FSDP2 ``Shard(0)`` blocks over the training
mesh, HSDP included) and the engine on the generation ranks (tensor parallel ``tp`` within each
replica). The two sets share no parameters, so weights cross by point-to-point messages:

* buckets: consecutive parameters of one dtype holding at least ``bucket_bytes`` of whole
  tensors (the last may be less; ``reshard_plan.bucket_groups`` sized on whole tensors), so no
  rank ever holds more than about one bucket of gathered weights, plus the bucket in flight;
* gather: each training rank casts its FSDP blocks of the bucket to the wire dtype and one
  ``all_gather_single`` over the FSDP shard group (blocks padded to torch.chunk's step) gives
  every training rank the bucket's whole tensors (HSDP replicas gather within their own group);
* send: generation rank ``gen_ranks[i]`` (tp rank ``i % tp``) gets ONE flat message per bucket
  from training rank ``train_ranks[i % T]``: its tp slice of every parameter of the bucket
  (``tensor.chunk(tp, shard_dim)[tp_rank]``, whole where ``shard_dim`` is None), concatenated;
* receive: the generation rank cuts the message into ``(name, slice)`` views, the format the
  engines' ``load_weights`` takes (the names and slices of colocated ``reshard_stream``). The
  next bucket's receive is posted before a bucket is handed out, and a training rank waits for a
  bucket's sends only after starting the next, so one bucket travels while the next is prepared.

The specs (and so the buckets) reach generation ranks once, at construction, from rank 0.
gloo moves CPU tensors, NCCL CUDA ones: every buffer lives on ``topo.device``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch._utils import _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import reshard_plan
from .comm import isend_object, recv_object
from .reshard import tp_chunk
from .topology import Topology


class ParamSpec(NamedTuple):
    """A parameter as the generation ranks see it: global shape, wire dtype, tp split dim."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard_dim: int | None  # tensor-parallel split dim; None = whole on every tp rank


def param_specs(named_params: Iterable[tuple[str, torch.Tensor]], shard_dims: dict[str, int | None],
                dtype: torch.dtype | None = None) -> list[ParamSpec]:
    """Specs of the training ranks' parameters (global shapes), sent as ``dtype`` (default: their own)."""
    specs = []
    for name, param in named_params:
        assert name in shard_dims, f"no tensor-parallel placement planned for {name}"
        specs.append(ParamSpec(name, tuple(param.shape), dtype or param.dtype, shard_dims[name]))
    return specs


def _plan_spec(spec: ParamSpec) -> reshard_plan.ParamSpec:
    return reshard_plan.ParamSpec(spec.name, spec.shape, spec.shard_dim, spec.dtype)


def _buckets(specs: list[ParamSpec], bucket_bytes: int) -> list[tuple[ParamSpec, ...]]:
    """Consecutive one-dtype groups of at least ``bucket_bytes`` of whole tensors (the last may be less)."""
    by_name = {spec.name: spec for spec in specs}
    groups = reshard_plan.bucket_groups(tuple(_plan_spec(s) for s in specs), 1, bucket_bytes)
    return [tuple(by_name[s.name] for s in group) for group in groups]


def _slice_numel(spec: ParamSpec, tp: int, tp_rank: int) -> int:
    return math.prod(reshard_plan.slice_shape(_plan_spec(spec), tp, tp_rank))


class CrossReshard:
    """Weight transfer from the training ranks to the generation ranks (split placement).

    Construct on every rank (rank 0 sends the bucket plan to the generation ranks); then, for every
    sync, training ranks call ``send`` and generation ranks iterate ``receive`` to the end.
    """

    def __init__(self, topo: Topology, specs: list[ParamSpec] | None, bucket_bytes: int) -> None:
        assert topo.placement == "split", "colocated ranks reshard in place (reshard.reshard_stream)"
        self.topo = topo
        self.received_bytes = 0
        # The job's world, held now: an engine may consume ``receive`` while its own world is the
        # default group (vLLM on generation-only ranks), and ranks here are the job's.
        self.group = dist.distributed_c10d._get_default_group()
        if topo.is_training:
            assert specs is not None, "training ranks pass the specs of the parameters they send"
            self.buckets = _buckets(list(specs), bucket_bytes)
            if topo.is_main:
                sends = [isend_object(self.buckets, dst, self.group) for dst in topo.gen_ranks]
                for handle in sends:
                    handle.wait()
        else:
            self.buckets = recv_object(topo.train_ranks[0], self.group)

    def _sender(self, gen_index: int) -> int:
        return self.topo.train_ranks[gen_index % len(self.topo.train_ranks)]

    # ---- training ranks -------------------------------------------------------------------

    @torch.no_grad()
    def send(self, named_params: Iterable[tuple[str, torch.Tensor]],
             local_block: Callable[[str, DTensor], torch.Tensor] | None = None) -> int:
        """Send every bucket to the generation ranks this rank serves; returns the bytes this rank sent.

        Every training rank must call it (the gathers are collective over the training mesh).
        ``local_block(name, param)``: this rank's FSDP block of what goes out for ``param`` (default
        its local shard; LoRA's merged block), made as its bucket is gathered.
        """
        assert self.topo.is_training
        params = list(named_params)
        assert [name for name, _ in params] == [s.name for b in self.buckets for s in b], "parameters match the specs"
        mine = [(i, dst) for i, dst in enumerate(self.topo.gen_ranks) if self._sender(i) == self.topo.rank]
        sent, in_flight, start = 0, None, 0
        for bucket in self.buckets:
            full = self._gather(bucket, [p for _, p in params[start:start + len(bucket)]], local_block)
            start += len(bucket)
            messages: dict[int, torch.Tensor] = {}
            works = []
            for index, dst in mine:
                tp_rank = index % self.topo.tp
                if tp_rank not in messages:
                    messages[tp_rank] = _message(bucket, full, self.topo.tp, tp_rank)
                if messages[tp_rank].numel():
                    works.append(dist.isend(messages[tp_rank], dst, group=self.group))
                    sent += messages[tp_rank].numel() * messages[tp_rank].element_size()
            _wait(in_flight)  # the previous bucket's sends, while this one's are under way
            in_flight = (works, messages)
        _wait(in_flight)
        return sent

    def _gather(self, bucket: tuple[ParamSpec, ...], params: list[torch.Tensor],
                local_block: Callable[[str, DTensor], torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The bucket's whole tensors in the wire dtype, from every rank's FSDP blocks (one all-gather)."""
        mesh = self.topo.fsdp_mesh
        placements = (Replicate(),) * (mesh.ndim - 1) + (Shard(0),)
        for spec, param in zip(bucket, params):
            assert isinstance(param, DTensor) and param.placements == placements, (spec.name, "FSDP2 Shard(0)")
            assert tuple(param.shape) == spec.shape, (spec.name, param.shape, spec.shape)
        blocks = [param._local_tensor if local_block is None else local_block(spec.name, param)
                  for spec, param in zip(bucket, params)]  # FSDP's unpadded torch.chunk block
        shards = mesh.size(mesh.ndim - 1)
        if shards == 1:
            return [block.to(self.topo.device, spec.dtype) for spec, block in zip(bucket, blocks)]
        steps = [-(-spec.shape[0] // shards) * math.prod(spec.shape[1:]) for spec in bucket]
        offsets = [sum(steps[:i]) for i in range(len(steps) + 1)]
        mine = torch.zeros(offsets[-1], dtype=bucket[0].dtype, device=self.topo.device)
        torch._foreach_copy_([mine[o:o + b.numel()] for o, b in zip(offsets, blocks)],
                             [b.reshape(-1) for b in blocks])
        gathered = mine.new_empty(shards * offsets[-1])
        dist.all_gather_single(gathered, mine, group=mesh.get_group(mesh.ndim - 1))
        pieces = []
        for spec, offset in zip(bucket, offsets):
            row = math.prod(spec.shape[1:])
            for s in range(shards):
                lo, hi = reshard_plan.chunk_range(spec.shape[0], shards, s)
                at = s * offsets[-1] + offset
                pieces.append(gathered[at:at + (hi - lo) * row])
        flat = torch.cat(pieces)
        return list(_unflatten_dense_tensors(flat, [torch.empty(s.shape, device="meta") for s in bucket]))

    # ---- generation ranks -----------------------------------------------------------------

    def receive(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield every bucket as ``[(name, tp slice)]`` (views of one buffer: copy them, then drop)."""
        assert self.topo.is_generating and not self.topo.is_training
        index = self.topo.gen_ranks.index(self.topo.rank)
        tp, tp_rank, src = self.topo.tp, index % self.topo.tp, self._sender(index)
        self.received_bytes = 0
        pending = self._post(self.buckets[0], tp, tp_rank, src) if self.buckets else None
        for position, bucket in enumerate(self.buckets):
            buffer, work = pending
            if work is not None:
                work.wait()
            following = position + 1 < len(self.buckets)
            pending = self._post(self.buckets[position + 1], tp, tp_rank, src) if following else None
            self.received_bytes += buffer.numel() * buffer.element_size()
            shapes = [reshard_plan.slice_shape(_plan_spec(spec), tp, tp_rank) for spec in bucket]
            views = _unflatten_dense_tensors(buffer, [torch.empty(s, device="meta") for s in shapes])
            yield [(spec.name, view) for spec, view in zip(bucket, views)]

    def _post(self, bucket: tuple[ParamSpec, ...], tp: int, tp_rank: int, src: int):
        """Allocate a bucket's buffer and start receiving into it (nothing to receive: no message)."""
        numel = sum(_slice_numel(spec, tp, tp_rank) for spec in bucket)
        buffer = torch.empty(numel, dtype=bucket[0].dtype, device=self.topo.device)
        return buffer, (dist.irecv(buffer, src, group=self.group) if numel else None)


def _wait(in_flight: tuple[list[dist.Work], dict[int, torch.Tensor]] | None) -> None:
    """Wait for a bucket's sends; their buffers (held alongside) may go afterwards."""
    if in_flight is not None:
        for work in in_flight[0]:
            work.wait()


def _message(bucket: tuple[ParamSpec, ...], full: list[torch.Tensor], tp: int, tp_rank: int) -> torch.Tensor:
    """Tp rank ``tp_rank``'s slice of every tensor of the bucket, flat and concatenated."""
    slices = [t if spec.shard_dim is None else tp_chunk(t, spec.shard_dim, tp, tp_rank)
              for spec, t in zip(bucket, full)]
    return torch.cat([s.reshape(-1) for s in slices])
