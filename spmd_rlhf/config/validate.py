"""``validate(cfg, world_size)``: the checks that run before any process group or model exists.

Every user-facing mistake raises ``ConfigError`` (a ``ValueError``) naming the key and the fix.
Validation is a pure function of the config and the world size, so every rank reaches the same
verdict and exits the same way: no rank waits on a collective that another rank never enters.
What needs the model's config or an engine's own library is checked by ``train.run`` just after
(``layout.check_tp_shapes``, ``rollout.vllm_checks.check_vllm``), still before any process group.
"""

from __future__ import annotations

import os

from .checks import choice, in_range, positive
from .schema import (ADV_ESTIMATORS, ALGORITHMS, ENGINES, KL_CONTROLLERS, KL_ESTIMATORS, LORA_SYNC, LOSS_AGG_MODES,
                     POLICY_LOSSES, VLLM_DTYPES, WEIGHT_SYNC, Config, ConfigError)
from .validate_data import validate_task
from .validate_layout import validate_layout
from .validate_reward import validate_reward


def validate(cfg: Config, world_size: int) -> None:
    """Raise ``ConfigError`` for anything a user got wrong. Cheap; no process group needed."""
    _validate_sizes(cfg)
    _validate_choices(cfg)
    validate_layout(cfg, world_size)
    validate_reward(cfg)
    _validate_paths(cfg)
    _validate_cpu_offload(cfg)
    _validate_lora(cfg)
    _validate_moe(cfg)


def _validate_sizes(cfg: Config) -> None:
    for key, value in [
        ("trainer.total_steps", cfg.trainer.total_steps),
        ("trainer.batch_size", cfg.trainer.batch_size),
        ("trainer.mini_batch_size", cfg.trainer.mini_batch_size),
        ("trainer.micro_batch_size", cfg.trainer.micro_batch_size),
        ("rollout.n", cfg.rollout.n),
        ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
        ("rollout.bucket_mb", cfg.rollout.bucket_mb),
        ("rollout.max_batch_size", cfg.rollout.max_batch_size),
        ("algorithm.ppo_epochs", cfg.algorithm.ppo_epochs),
        ("data.max_prompt_length", cfg.data.max_prompt_length),
        ("distributed.tp", cfg.distributed.tp),
        ("distributed.dp_replicate", cfg.distributed.dp_replicate),
        ("distributed.timeout_s", cfg.distributed.timeout_s),
        ("reward.timeout_s", cfg.reward.timeout_s),
        ("model.hidden_size", cfg.model.hidden_size),
        ("model.num_layers", cfg.model.num_layers),
        ("model.num_heads", cfg.model.num_heads),
        ("model.activation_checkpointing_every", cfg.model.activation_checkpointing_every),
        ("model.logprob_chunk_tokens", cfg.model.logprob_chunk_tokens),
    ]:
        positive(value, key)
    for key, value in [
        ("trainer.lr", cfg.trainer.lr),
        ("trainer.weight_decay", cfg.trainer.weight_decay),
        ("trainer.grad_clip", cfg.trainer.grad_clip),
        ("trainer.warmup_steps", cfg.trainer.warmup_steps),
        ("trainer.save_every", cfg.trainer.save_every),
        ("trainer.sft.steps", cfg.trainer.sft.steps),
        ("rollout.temperature", cfg.rollout.temperature),
        ("rollout.val_temperature", cfg.rollout.val_temperature),
        ("rollout.top_k", cfg.rollout.top_k),
        ("algorithm.kl_coef", cfg.algorithm.kl_coef),
        ("algorithm.clip_low", cfg.algorithm.clip_low),
        ("algorithm.clip_high", cfg.algorithm.clip_high),
        ("algorithm.tis_cap", cfg.algorithm.tis_cap),
        ("trainer.max_tokens_per_micro_batch", cfg.trainer.max_tokens_per_micro_batch or 0),
    ]:
        positive(value, key, allow_zero=True)
    if cfg.trainer.peak_tflops is not None:
        positive(cfg.trainer.peak_tflops, "trainer.peak_tflops")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]; set rollout.top_p=1.0 to disable it")
    if not 0.0 <= cfg.data.max_bad_row_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_row_fraction={cfg.data.max_bad_row_fraction} must be in [0, 1]")
    if cfg.trainer.sft.steps > 0:
        positive(cfg.trainer.sft.batch_size, "trainer.sft.batch_size")
        positive(cfg.trainer.sft.lr, "trainer.sft.lr")
    _validate_algorithm_sizes(cfg)
    _validate_multi_turn(cfg)


def _validate_multi_turn(cfg: Config) -> None:
    """``rollout.multi_turn.*``; whether each tool loads is ``rollout.tools.build_tools``'s."""
    m = cfg.rollout.multi_turn
    positive(m.max_turns, "rollout.multi_turn.max_turns")
    positive(m.tool_timeout_s, "rollout.multi_turn.tool_timeout_s")
    if m.enable and not m.tools:
        raise ConfigError("rollout.multi_turn.enable=true but rollout.multi_turn.tools is empty; set e.g. "
                          "rollout.multi_turn.tools=[calculator,python] (or dotted paths pkg.module:tool)")
    if m.enable and cfg.rollout.ignore_eos:
        raise ConfigError("rollout.multi_turn.enable=true with rollout.ignore_eos=true never ends a turn; set "
                          "rollout.ignore_eos=false")


def _validate_algorithm_sizes(cfg: Config) -> None:
    a, c, t, r = cfg.algorithm, cfg.critic, cfg.trainer, cfg.reward
    in_range(a.gamma, "algorithm.gamma", 0.0, 1.0, "set algorithm.gamma=1.0 (no discount)")
    in_range(a.lam, "algorithm.lam", 0.0, 1.0, "set algorithm.lam=1.0 (Monte-Carlo advantages)")
    if a.clip_ratio_c != 0.0 and a.clip_ratio_c <= 1.0:
        raise ConfigError(f"algorithm.clip_ratio_c={a.clip_ratio_c} must be > 1 (dual-clip bound, e.g. 3.0) or 0 (off)")
    positive(a.kl_in_reward.coef, "algorithm.kl_in_reward.coef", allow_zero=True)
    positive(a.kl_in_reward.target, "algorithm.kl_in_reward.target")
    positive(a.kl_in_reward.horizon, "algorithm.kl_in_reward.horizon")
    positive(a.kl_guard.max_kl, "algorithm.kl_guard.max_kl", allow_zero=True)
    if not 0.0 < a.kl_guard.lr_decay <= 1.0:
        raise ConfigError(f"algorithm.kl_guard.lr_decay={a.kl_guard.lr_decay} must be in (0, 1]; set it to 0.5")
    positive(a.dynamic_sampling.max_rounds, "algorithm.dynamic_sampling.max_rounds")
    if not 0 <= a.overlong.buffer_len < cfg.rollout.max_new_tokens:
        raise ConfigError(f"algorithm.overlong.buffer_len={a.overlong.buffer_len} must be in [0, "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}); set it to about a fifth of "
                          "rollout.max_new_tokens, or 0 (off)")
    positive(a.overlong.penalty_factor, "algorithm.overlong.penalty_factor", allow_zero=True)
    positive(a.filter.replay_capacity, "algorithm.filter.replay_capacity", allow_zero=True)
    in_range(a.filter.replay_fraction, "algorithm.filter.replay_fraction", 0.0, 1.0, "set it to e.g. 0.25, or 0 (off)")
    if a.filter.replay_fraction > 0 and a.filter.replay_capacity == 0:
        raise ConfigError("algorithm.filter.replay_fraction > 0 needs a buffer; set algorithm.filter.replay_capacity "
                          "(groups kept per rank, e.g. 64) or algorithm.filter.replay_fraction=0")
    for key, value in [("critic.lr", c.lr), ("reward.model.micro_batch_size", r.model.micro_batch_size),
                       ("trainer.keep_last", t.keep_last), ("trainer.max_consecutive_skips", t.max_consecutive_skips)]:
        positive(value, key)
    for key, value in [("critic.warmup_steps", c.warmup_steps), ("critic.weight_decay", c.weight_decay),
                       ("critic.grad_clip", c.grad_clip), ("critic.clip_range_value", c.clip_range_value),
                       ("critic.warmup_updates", c.warmup_updates), ("trainer.val_every", t.val_every),
                       ("reward.rule_weight", r.rule_weight), ("reward.model.weight", r.model.weight)]:
        positive(value, key, allow_zero=True)
    if r.rule_weight == 0 and (r.model.path is None or r.model.weight == 0):
        raise ConfigError("reward.rule_weight=0 and no reward model leaves nothing to learn from; set "
                          "reward.model.path (and reward.model.weight > 0) or reward.rule_weight > 0")


def _validate_choices(cfg: Config) -> None:
    a = cfg.algorithm
    choice(a.name, "algorithm.name", ALGORITHMS)
    choice(a.adv_estimator, "algorithm.adv_estimator", ADV_ESTIMATORS)
    choice(a.policy_loss, "algorithm.policy_loss", POLICY_LOSSES)
    choice(a.kl_in_reward.estimator, "algorithm.kl_in_reward.estimator", KL_ESTIMATORS)
    choice(a.kl_in_reward.controller, "algorithm.kl_in_reward.controller", KL_CONTROLLERS)
    choice(cfg.reward.model.dtype, "reward.model.dtype", ("float32", "bfloat16"))
    if a.use_kl_loss and a.kl_coef > 0 and a.kl_in_reward.enable:
        raise ConfigError(
            "KL to the reference is on both as a loss (algorithm.use_kl_loss=true, algorithm.kl_coef > 0) and in the "
            "reward (algorithm.kl_in_reward.enable=true); pick one: set algorithm.use_kl_loss=false or "
            "algorithm.kl_in_reward.enable=false"
        )
    group_based = a.adv_estimator in ("grpo", "rloo", "reinforce_pp_baseline") or a.dynamic_sampling.enable
    if group_based and cfg.rollout.n < 2:
        raise ConfigError(f"algorithm.adv_estimator={a.adv_estimator} (or dynamic sampling) compares the samples of a "
                          f"prompt with each other, but rollout.n={cfg.rollout.n}; set rollout.n >= 2")
    choice(cfg.algorithm.loss_agg_mode, "algorithm.loss_agg_mode", LOSS_AGG_MODES)
    choice(cfg.algorithm.kl_estimator, "algorithm.kl_estimator", KL_ESTIMATORS)
    choice(cfg.rollout.engine, "rollout.engine", ENGINES)
    choice(cfg.data.arithmetic.style, "data.arithmetic.style", ("padded", "chat", "tools"))
    validate_task(cfg)
    choice(cfg.rollout.weight_sync, "rollout.weight_sync", WEIGHT_SYNC)
    if cfg.rollout.engine == "vllm":
        _validate_vllm_knobs(cfg)
    resume = cfg.trainer.resume
    if resume not in ("auto", "never") and not os.path.exists(resume):
        raise ConfigError(
            f"trainer.resume={resume!r} is neither auto, never nor an existing checkpoint path; set "
            "trainer.resume=auto (latest checkpoint of this run, if any), never, or the path of a checkpoint"
        )


def _validate_vllm_knobs(cfg: Config) -> None:
    """``rollout.vllm.*``; whether vLLM imports and runs here is ``rollout.vllm_checks.check_vllm``'s."""
    v = cfg.rollout.vllm
    choice(v.dtype, "rollout.vllm.dtype", VLLM_DTYPES)
    if v.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.vllm.sleep_level={v.sleep_level} must be 1 or 2; set rollout.vllm.sleep_level=2")
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization} must be in (0, 1]; "
                          "set rollout.vllm.gpu_memory_utilization=0.5")
    positive(v.kv_cache_gib, "rollout.vllm.kv_cache_gib")
    choice(v.log_level.upper(), "rollout.vllm.log_level", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    for key, value in [("rollout.vllm.max_model_len", v.max_model_len), ("rollout.vllm.max_num_seqs", v.max_num_seqs),
                       ("rollout.vllm.max_num_batched_tokens", v.max_num_batched_tokens)]:
        if value is not None:
            positive(value, key)


def _validate_cpu_offload(cfg: Config) -> None:
    """``trainer.cpu_offload`` keeps the actor in host memory always; moving it back and forth around
    generation (``trainer.offload_actor_during_rollout``) would put it on the device against FSDP's policy."""
    if cfg.trainer.cpu_offload and cfg.trainer.offload_actor_during_rollout:
        raise ConfigError("trainer.cpu_offload=true already keeps the actor's shards and optimizer state in host "
                          "memory, also while generating, and trainer.offload_actor_during_rollout=true would move "
                          "them back to the device after it; set trainer.offload_actor_during_rollout=false")


def _validate_lora(cfg: Config) -> None:
    """``model.lora``: the adapter's shape, and the parts of the program LoRA does not reach yet."""
    lora = cfg.model.lora
    positive(lora.rank, "model.lora.rank", allow_zero=True)
    if lora.rank == 0:
        return
    positive(lora.alpha, "model.lora.alpha")
    if not 0 <= lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout={lora.dropout} must be in [0, 1); set model.lora.dropout=0.0")
    if not lora.target_modules:
        raise ConfigError("model.lora.target_modules is empty; name the projections to adapt, e.g. "
                          "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
    choice(lora.sync, "model.lora.sync", LORA_SYNC)
    if lora.sync == "adapter" and cfg.rollout.engine != "vllm":
        raise ConfigError(f"model.lora.sync=adapter needs vLLM's LoRA support (rollout.engine=vllm); with "
                          f"rollout.engine={cfg.rollout.engine} set model.lora.sync=merged")
    if lora.sync == "adapter" and cfg.distributed.placement == "split":
        raise ConfigError("model.lora.sync=adapter is not supported with distributed.placement=split (the "
                          "generation ranks take merged weights); set model.lora.sync=merged")
    if lora.sync == "adapter" and lora.rank > 512:
        raise ConfigError(f"model.lora.rank={lora.rank} is above vLLM's largest LoRA rank (512) for "
                          "model.lora.sync=adapter; lower model.lora.rank or set model.lora.sync=merged")
    if cfg.algorithm.adv_estimator == "gae" and cfg.critic.init_from == "actor":
        raise ConfigError("model.lora.rank > 0 with critic.init_from=actor is not supported yet (the critic would "
                          "copy a PEFT model); set critic.init_from=<a reward-model directory> or model.lora.rank=0")


def _validate_moe(cfg: Config) -> None:
    """``model.moe``: the balance loss weight is a finite number >= 0, or null for the model's own."""
    coef = cfg.model.moe.router_aux_loss_coef
    if coef is not None and not (isinstance(coef, (int, float)) and 0 <= coef < float("inf")):
        raise ConfigError(f"model.moe.router_aux_loss_coef={coef} must be a number >= 0 (0 = off), or null for the "
                          "model config's router_aux_loss_coef; set e.g. model.moe.router_aux_loss_coef=0.001")


def _validate_paths(cfg: Config) -> None:
    if cfg.model.path is not None:
        path = cfg.model.path
        if not os.path.isdir(path):
            raise ConfigError(
                f"model.path={path!r} is not a directory; point model.path at a Hugging Face model directory "
                "(config.json + *.safetensors; tools/convert_smollm2.py makes models/smollm2-135m-instruct), or "
                "leave it unset for the embedded tiny model"
            )
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(
                f"model.path={path!r} has no config.json; point model.path at a Hugging Face model directory "
                "(config.json + *.safetensors)"
            )
        if not os.access(os.path.join(path, "config.json"), os.R_OK):
            raise ConfigError(f"model.path={path!r}: config.json is not readable; fix its permissions")
    if cfg.model.path is None and cfg.data.train_files:
        raise ConfigError(
            "data.train_files is set but model.path is not; the embedded tiny model only knows the embedded "
            "arithmetic task. Set model.path=<HF model dir> or clear data.train_files"
        )
    for key, path in [("reward.model.path", cfg.reward.model.path),
                      ("critic.init_from", None if cfg.critic.init_from == "actor" else cfg.critic.init_from)]:
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{key}={path!r} is not a Hugging Face model directory (no config.json there); point "
                              f"{key} at one{' or set critic.init_from=actor' if key.startswith('critic') else ''}")
    for key, files in [("data.train_files", cfg.data.train_files), ("data.val_files", cfg.data.val_files)]:
        for path in files:
            if not os.path.isfile(path):
                raise ConfigError(f"{key}: file {path!r} does not exist; fix the path in {key} (GSM8K in this "
                                  "format: tools/prepare_gsm8k.py writes data/gsm8k/train.parquet and test.parquet)")
