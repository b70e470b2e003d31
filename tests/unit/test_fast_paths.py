"""The update's fast paths compute what the slow paths compute (CPU, one gloo rank): a micro-batch
loop without per-micro-batch host reads, activation checkpointing of every k-th layer, compiled
decoder layers; and the defaults that pick them."""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from spmd_rlhf.config import AlgorithmConfig, Config, compile_layers, micro_batch_tokens
from spmd_rlhf.data.batch import collate
from spmd_rlhf.models.parallelize import decoder_layers, frozen_dtype, parallelize
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from spmd_rlhf.train import needs_reference
from spmd_rlhf.trainer.actor import Actor, PolicyTargets
from spmd_rlhf.trainer.micro import MicroBatcher
from spmd_rlhf.trainer.schedule import build_scheduler


@pytest.fixture
def mesh(world_of_one):
    return world_of_one


def build_actor(mesh, layers: int = 3, batcher: MicroBatcher | None = None, **parallel) -> Actor:
    tokenizer = build_tokenizer()
    config = tiny_model_config(len(tokenizer), 64, layers, 2, tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model = parallelize(model, mesh, torch.device("cpu"), trainable=True, **parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    return Actor(model, optimizer, build_scheduler(optimizer, 0, 10, 1.0), 1, 0.0, torch.device("cpu"),
                 batcher=batcher)


def batch_and_targets(rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 12, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(rows)]
    responses = [torch.randint(3, 12, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(rows)]
    batch = collate(prompts, responses, pad_id=0)
    return batch, PolicyTargets(torch.randn(batch.loss_mask_BT.shape, generator=gen), None)


def grads_after_update(actor: Actor, batch, targets, micro: int) -> dict[str, torch.Tensor]:
    """Weights after one update (lr 1e-2, no clipping): a function of the gradients."""
    actor.update(batch, targets, AlgorithmConfig(use_kl_loss=False, entropy_coef=0.01), micro, 1.0)
    return {n: p.full_tensor().detach().clone() for n, p in actor.model.named_parameters()}


class ScalarReads(TorchDispatchMode):
    """Counts reads of a tensor's value into Python (``.item()``, ``float()``, ``bool()``), except
    those made by files named in ``ignore``."""

    def __init__(self, ignore: tuple[str, ...]):
        super().__init__()
        self.count, self.ignore = 0, ignore

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            files = [frame.filename for frame in traceback.extract_stack()]
            self.count += not any(name in f for f in files for name in self.ignore)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_host_reads_do_not_grow_with_micro_batches(mesh, packed):
    """The loop keeps per-micro-batch metrics on the device: 2 or 8 micro-batches read the same
    number of values (the global counts, the final metrics and the gradient norm). Not counted:
    AdamW's step counters (host tensors on CPU; CUDA's fused kernel reads none), packing (it reads
    the host copy of the batch before anything moves to the device) and transformers' mask
    preparation (one read of the positions or the padding mask per forward, its own)."""
    batch, targets = batch_and_targets(8)
    counts = {}
    ignore = ("torch/optim/", "transformers/masking_utils", "spmd_rlhf/data/packing")
    for micro_rows, tokens in [(4, 64), (1, 12)]:
        actor = build_actor(mesh, batcher=MicroBatcher(tokens if packed else 0, 7))
        plan = actor.batcher.plan(batch, micro_rows, torch.device("cpu"))
        with ScalarReads(ignore) as reads:
            actor.update(batch, targets, AlgorithmConfig(use_kl_loss=False), micro_rows, 1.0)
        counts[len(plan)] = reads.count
    assert len(counts) == 2 and min(counts) <= 2 and max(counts) >= 6, counts
    assert len(set(counts.values())) == 1, f"host reads per update by micro-batch count: {counts}"


def test_checkpointing_every_kth_layer_gives_the_plain_gradients(mesh):
    batch, targets = batch_and_targets(6)
    plain = grads_after_update(build_actor(mesh), batch, targets, 3)
    actor = build_actor(mesh, activation_checkpointing=True, checkpoint_every=2)
    assert [layer.gradient_checkpointing for layer in decoder_layers(actor.model)] == [True, False, True]
    torch.testing.assert_close(grads_after_update(actor, batch, targets, 3), plain, rtol=1e-5, atol=1e-6)


def test_compiled_layers_give_the_eager_gradients(mesh):
    """Per-layer ``torch.compile`` with dynamic shapes (aot_eager: the graph capture and its
    autograd, without code generation) inside FSDP2 and activation checkpointing."""
    batch, targets = batch_and_targets(6)
    eager = grads_after_update(build_actor(mesh, layers=2), batch, targets, 2)
    torch._dynamo.reset()
    actor = build_actor(mesh, layers=2, activation_checkpointing=True, compile_layers=True,
                        compile_backend="aot_eager")
    torch.testing.assert_close(grads_after_update(actor, batch, targets, 2), eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_speed_defaults_resolve_by_device():
    cfg = Config()
    assert micro_batch_tokens(cfg, "cuda") == 16384 and micro_batch_tokens(cfg, "cpu") == 0
    assert compile_layers(cfg, "cuda") and not compile_layers(cfg, "cpu")
    cfg.trainer.max_tokens_per_micro_batch = 0  # padded: every width would recompile
    assert not compile_layers(cfg, "cuda")
    cfg.model.compile_layers = True
    assert compile_layers(cfg, "cpu")
    assert frozen_dtype(torch.device("cuda")) == torch.bfloat16 and frozen_dtype(torch.device("cpu")) == torch.float32


def test_reference_only_when_a_kl_term_reads_it():
    cfg = Config()
    assert needs_reference(cfg)  # grpo's k3 loss
    cfg.algorithm.kl_coef = 0.0
    assert not needs_reference(cfg)
    cfg.algorithm.kl_guard.max_kl = 0.5
    assert needs_reference(cfg)
