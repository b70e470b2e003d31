"""Weights from the actor into the rollout engine: the one owner of the weight sync.

``WeightSync`` is built once per run, from the engine and the actor (colocated) or the topology
(split). It fixes the per-parameter shard plan (``distributed/tp_plan.py``, adjusted by the
engine), whether whole tensors or tensor-parallel slices travel, the engine's dtype and the bucket
size; ``push()`` then moves one version of the weights and returns the bytes this rank moved.

* colocated: every rank reshards its FSDP shards into its own engine (``reshard_stream``), or
  streams whole tensors to an engine that ``wants_full_weights``;
* split: training ranks send with ``CrossReshard`` and generation ranks load what it receives.

A LoRA actor sends its merged weights (``model.lora.sync=merged``, both placements: each FSDP
block merged as its bucket goes out), or, colocated with vLLM (``model.lora.sync=adapter``), the
base weights once and then only the adapters (``VLLMEngine.load_adapter``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from ..distributed.comm import recv_object, send_object
from ..distributed.cross_reshard import CrossReshard, param_specs
from ..distributed.reshard import full_tensor_stream, reshard_stream
from ..distributed.topology import Topology
from ..distributed.tp_plan import param_shard_dims, replicated_dims
from ..models.lora import MergedWeights, adapter_state, adapter_sync, is_lora
from .base import RolloutEngine


def sync_shard_dims(engine: RolloutEngine, model: torch.nn.Module | MergedWeights, tp: int) -> dict[str, int | None]:
    """The per-parameter tensor-parallel plan the weight sync streams to ``engine``.

    Empty when the engine takes whole tensors; every parameter whole at tp = 1; otherwise
    ``param_shard_dims``, adjusted by the engine where it lays some tensors out differently.
    """
    if engine.wants_full_weights:
        return {}
    return engine.shard_dims(base_shard_dims(model, tp))


def base_shard_dims(model: torch.nn.Module | MergedWeights, tp: int) -> dict[str, int | None]:
    """The trainer's plan before any engine adjusts it: every tensor whole at tp = 1."""
    return param_shard_dims(model) if tp > 1 else replicated_dims(model)


def bucket_bytes_of(bucket_mb: int) -> int:
    return bucket_mb * 2**20


def _counted(stream: Iterable[list[tuple[str, torch.Tensor]]], into: list[int]) -> Iterator:
    for bucket in stream:
        into[0] += sum(t.numel() * t.element_size() for _, t in bucket)
        yield bucket


class WeightSync:
    """Colocated: the actor's FSDP shards -> this rank's engine (tp slices or whole tensors).

    A LoRA actor (``model.lora.sync=merged``) sends its merged weights under the base model's
    names, each FSDP block merged as its bucket is cast (``models/lora.MergedWeights``). With
    ``model.lora.sync=adapter`` (a vLLM engine built with ``lora_rank``) the base weights go once,
    unmerged, and every push after that sends only the adapters (``VLLMEngine.load_adapter``)."""

    def __init__(self, engine: RolloutEngine, model: torch.nn.Module, topo: Topology, bucket_bytes: int):
        self.engine = engine
        self.model = model
        self.topo = topo
        self.bucket_bytes = bucket_bytes
        self.full = engine.wants_full_weights
        self.dtype = engine.dtype
        self.merged = MergedWeights(model) if is_lora(model) else None
        self.adapter = adapter_sync(model)
        self.shard_dims = sync_shard_dims(engine, self.merged or model, topo.tp)

    def stream(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """One version of the weights, bucket by bucket, as the engine's ``load_weights`` takes
        them; every rank of the training mesh must consume the whole stream. (Adapter sync: the
        base model's weights, unmerged.)"""
        if self.adapter:
            params = self.merged.named_parameters()
            if self.full:
                return full_tensor_stream(params, self.bucket_bytes, self.dtype)
            return reshard_stream(params, self.shard_dims, self.topo.reshard_mesh, self.bucket_bytes, self.dtype)
        if self.merged is not None:
            if self.full:
                return full_tensor_stream(self.merged.full_tensors(), self.bucket_bytes, self.dtype)
            return reshard_stream(self.merged.named_parameters(), self.shard_dims, self.topo.reshard_mesh,
                                  self.bucket_bytes, self.dtype, local_block=self.merged.local_block)
        params = self.model.named_parameters()
        if self.full:
            return full_tensor_stream(params, self.bucket_bytes, self.dtype)
        return reshard_stream(params, self.shard_dims, self.topo.reshard_mesh, self.bucket_bytes, self.dtype)

    def push(self) -> float:
        """Load the actor's current weights into the engine; returns bytes this rank received."""
        received = [0]
        if not self.adapter or not self.engine.has_weights:  # adapter sync: the base once, then adapters
            self.engine.load_weights(_counted(self.stream(), received))
        if self.adapter:
            config, tensors = adapter_state(self.model)
            self.engine.load_adapter(config, tensors)
            received[0] += sum(t.numel() * t.element_size() for t in tensors.values())
        return float(received[0])


class CrossWeightSync:
    """Split: the training ranks' FSDP shards -> the generation ranks' engines (``CrossReshard``).

    Built on every rank (collective): training rank 0 asks the first generation rank's engine how it
    wants the trainer's plan (``shard_dims``, whole tensors, dtype) and tells the training ranks.
    ``push()`` sends on training ranks (returns the bytes this rank sent) and loads into the
    engine on generation ranks (returns the bytes this rank received). A LoRA actor sends its
    merged weights under the base model's names, each FSDP block merged as its bucket is gathered
    (``MergedWeights.local_block``): the generation ranks' engines never see an adapter."""

    def __init__(self, topo: Topology, bucket_bytes: int, model: torch.nn.Module | None = None,
                 engine: RolloutEngine | None = None):
        assert (model is not None) == topo.is_training and (engine is not None) == topo.is_generating
        self.topo, self.model, self.engine = topo, model, engine
        self.merged = MergedWeights(model) if model is not None and is_lora(model) else None
        weights = self.merged or model  # what crosses: the merged view of a LoRA actor
        train0, gen0 = topo.train_ranks[0], topo.gen_ranks[0]
        specs = None
        if topo.rank == gen0:
            base = recv_object(train0)
            dims = {name: None for name in base} if engine.wants_full_weights else engine.shard_dims(base)
            send_object((dims, engine.dtype), train0)
        if topo.is_training:
            box = [None]
            if topo.rank == train0:
                send_object(base_shard_dims(weights, topo.tp), gen0)
                box = [recv_object(gen0)]
            dist.broadcast_object_list(box, src=train0, group=topo.train_group)
            dims, dtype = box[0]
            specs = param_specs(weights.named_parameters(), dims, dtype)
        self.cross = CrossReshard(topo, specs, bucket_bytes)

    def push(self) -> float:
        if self.merged is not None:
            return float(self.cross.send(self.merged.named_parameters(), local_block=self.merged.local_block))
        if self.topo.is_training:
            return float(self.cross.send(self.model.named_parameters()))
        self.engine.load_weights(self.cross.receive())
        return float(self.cross.received_bytes)
