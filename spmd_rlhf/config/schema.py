"""The typed configuration: one dataclass per section, registered in Hydra's ConfigStore as
``base_config``; YAML in ``configs/`` and ``recipes/`` is validated against it. Also the choices
each string key accepts and ``ConfigError``, the error of every mistake a user can fix."""

from __future__ import annotations

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
WEIGHT_SYNC = ("auto", "dtensor", "full")
PLACEMENTS = ("colocate", "split")
LORA_SYNC = ("merged", "adapter")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CODE_SCORES = ("fraction", "all_pass")  # reward.code_score (rewards.sandboxed's)


class ConfigError(ValueError):
    """A configuration a user can fix; the message names the key and the fix."""


@dataclass
class LoraConfig:
    """LoRA adapters on the actor through PEFT (``models/lora.py``); only the adapters train."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # the attention and MLP projections
    sync: str = "merged"  # merged: W + (alpha/r) B A to the engine, bucket by bucket | adapter: the adapters to vLLM


@dataclass
class MoeConfig:
    """Mixture-of-experts policies (Qwen3-MoE, Qwen2-MoE; ``models/moe.py``). Dense models ignore it."""

    # weight of the routers' load-balancing loss, added to the actor's loss in every training forward;
    # null = the model config's router_aux_loss_coef (Qwen3-MoE: 0.001), 0 = off
    router_aux_loss_coef: float | None = None


@dataclass
class VisionConfig:
    """Vision-language policies (Qwen2-VL, Qwen2.5-VL; ``models/vlm.py``). Text models ignore it."""

    freeze_vision_tower: bool = True  # the whole vision tower (patch embedding, blocks, merger) keeps its weights


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
    lora: LoraConfig = field(default_factory=LoraConfig)
    moe: MoeConfig = field(default_factory=MoeConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)


@dataclass
class ArithmeticTaskConfig:
    digits: int = 2
    num_val: int = 256
    carry_drop_prob: float = 0.5
    seed: int = 0
    # padded ("07+48=", the embedded model) | chat (a question, for chat models) | tools (padded, and the
    # embedded tokenizer and warm start know the calculator's tool calls: recipe=tiny_arithmetic_tools)
    style: str = "padded"


@dataclass
class ShapesTaskConfig:
    """The built-in visual task (``data.task=shapes``, ``tasks/shapes.py``): count the shapes in an image."""

    size: int = 56  # pixels a side, a multiple of 28
    num_train: int = 512
    num_val: int = 64
    seed: int = 0
    style: str = "padded"  # padded ("<image>=", the tiny tokenizer) | chat (a question, for chat models)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # empty = the built-in task data.task
    val_files: list[str] = field(default_factory=list)
    max_prompt_length: int = 512
    apply_chat_template: bool = True
    max_bad_row_fraction: float = 0.01
    default_data_source: str | None = None
    shuffle: bool = True
    seed: int = 0
    max_val_examples: int = 512
    arithmetic: ArithmeticTaskConfig = field(default_factory=ArithmeticTaskConfig)
    task: str = "arithmetic"  # the built-in task without data.train_files: arithmetic | shapes (needs a VL model.path)
    shapes: ShapesTaskConfig = field(default_factory=ShapesTaskConfig)


@dataclass
class RewardModelConfig:
    """A frozen ``AutoModelForSequenceClassification`` scoring prompt + response (``reward.model.*``)."""

    path: str | None = None  # HF directory; null = no reward model
    weight: float = 1.0  # reward = rule_weight * rule score + weight * model score
    dtype: str = "float32"  # float32 | bfloat16
    micro_batch_size: int = 64  # sequences per forward, per rank


@dataclass
class RewardSandboxConfig:
    """The sandbox pools that run code tests, math-verify and, by default, ``reward.custom_function``
    (``reward.sandbox.*``); the limits hold for each sandboxed program (``spmd_rlhf.sandbox.SandboxLimits``)
    and the memory limit for each user reward call. ``custom_function=false`` calls the user's function
    in the trainer's process instead: faster (no pipe round trip), but unisolated and one at a time."""

    workers: int | None = None  # processes per pool; null = min(4, CPUs)
    timeout_s: float = 10.0  # wall clock of one program; its process group is killed after it
    cpu_s: float | None = None  # CPU seconds of one program; null = timeout_s
    memory_mb: int = 1024  # address space of each program; a custom function's call: beyond its loaded worker's
    max_output_bytes: int = 1048576  # per stream; more kills the program
    max_processes: int = 32  # tasks of the sandbox user (only enforced when run as root)
    max_file_mb: int = 64  # largest file a program may write
    # reward.custom_function runs in the sandbox workers (a batch in parallel, each call under reward.timeout_s
    # and memory_mb; nothing it starts outlives the call); false calls it in the trainer's process (no
    # limit but reward.timeout_s). No effect without reward.custom_function.
    custom_function: bool = True


@dataclass
class RewardConfig:
    custom_function: str | None = None  # "package.module:function" or "file.py:function"
    timeout_s: float = 10.0
    default_source: str | None = None
    rule_weight: float = 1.0  # weight of the rule/function score in the training reward
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    sandbox: RewardSandboxConfig = field(default_factory=RewardSandboxConfig)
    code_score: str = "fraction"  # fraction (of the tests passed) | all_pass (1 only when every test passes)
    math_timeout_s: float = 5.0  # one math-verify check


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
    log_level: str = "WARNING"  # vLLM's own logger (its per-step INFO lines) and its loading bars; INFO or DEBUG to see them
    # a seed per request (from rollout.seed, the step and the row): samples independent of batching and of the
    # engine's RNG history; false lets vLLM sample all requests from one generator (no per-request loop)
    seed_per_request: bool = True


@dataclass
class MultiTurnConfig:
    """Multi-turn tool use in rollouts (``rollout.multi_turn.*``): the policy calls tools in the
    Qwen/Hermes format ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the results come
    back as tool messages through the chat template, and generation goes on (``rollout/multi_turn.py``)."""

    enable: bool = False
    max_turns: int = 5  # assistant turns (engine calls) per sample at most, the final answer included
    tool_timeout_s: float = 30.0  # wall clock of one tool call (the Python tool's sandboxed program)
    # built-in tool names (calculator, python) or dotted paths "pkg.module:obj" of custom tools; a row's
    # extra_info.tools_kwargs (verl), when present, limits it to the tools it names
    tools: list[str] = field(default_factory=list)


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
    weight_sync: str = "auto"  # auto (dtensor where vLLM can take tp slices, else full) | dtensor | full
    bucket_mb: int = 256
    max_batch_size: int = 256  # torch engine: rows per generation chunk
    seed: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    multi_turn: MultiTurnConfig = field(default_factory=MultiTurnConfig)


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
    save_every: int = 0  # a checkpoint every N steps; 0 = none before the end
    save_at_end: bool = True  # a checkpoint after the last step (whatever save_every); false = none at the end
    resume: str = "never"  # auto (the newest checkpoint of checkpoint_dir, else a fresh start) | never | PATH
    offload_actor_during_rollout: bool = False  # CUDA: actor + optimizer state in host memory while generating
    # FSDP2 CPUOffloadPolicy: the actor's shards, gradients and optimizer state (and the reference's shards) live
    # in host memory, one layer at a time on the device in its pass (implies offload_actor_during_rollout's effect)
    cpu_offload: bool = False
    eval_before: bool = True
    eval_after: bool = True
    val_every: int = 0  # held-out evaluation every N steps (0 = only before and after)
    checkpoint_dir: str | None = None  # null = <run dir>/checkpoints
    keep_last: int = 2  # complete checkpoints kept
    max_consecutive_skips: int = 5  # non-finite steps in a row before the run aborts
    # k >= 1 (split only): batch i+1 is generated while batch i trains, by a policy at most k versions old;
    # needs algorithm.tis_cap > 0. 0 = the synchronous step
    max_staleness: int = 0
    sft: SFTWarmupConfig = field(default_factory=SFTWarmupConfig)


@dataclass
class LoggingConfig:
    wandb: bool = False
    project: str = "spmd_rlhf"
    run_name: str | None = None
    console: bool = True  # rank 0 prints its messages (and, without the progress bar, a line per step)
    progress_bar: bool = True  # rank 0's bar: algorithm, step, reward, KL, tokens/s
    verbose: bool = False  # vLLM, NCCL and transformers logs at INFO (default: WARNING and above, no loading bars)


@dataclass
class DistributedConfig:
    """Which rank does what (``distributed.*``)."""

    tp: int = 1  # generation tensor-parallel size (split: within the generation ranks)
    dp_replicate: int = 1  # HSDP replicas; dp_shard = training ranks / dp_replicate
    timeout_s: float = 600.0
    placement: str = "colocate"  # colocate (every rank trains and generates) | split (see generation_ranks)
    # split: the last G ranks (W-G .. W-1) only generate, G/tp engine replicas; the first W-G ranks only train
    generation_ranks: int = 0
    # Ulysses sequence parallel: each packed row of the training passes split over sp training ranks
    sp: int = 1


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


def register_configs() -> None:
    """Register the schema; YAML in ``configs/`` and ``recipes/`` is validated against it."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)
