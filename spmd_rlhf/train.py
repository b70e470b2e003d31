"""``python -m spmd_rlhf.train [recipe=NAME] [key=value ...]``: the one program every rank runs.

Order matters for failing well: the config is validated, the tokenizer and data are loaded (all
user errors surface here, identically on every rank) BEFORE the process group starts or any
model is built. After that, a failure on one rank ends the job through the launcher (torchrun and
srun tear the other ranks down) and every collective has a timeout.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import (Config, ConfigError, check_context_length, check_known_keys, check_tp_shapes,
                     dedicated_generation_ranks, micro_batch_tokens, register_configs, validate)
from .data.datasets import PromptExample
from .data.loader import PromptLoader
from .distributed.comm import use_training_group
from .distributed.topology import Topology, init_distributed, read_launch_env, shutdown
from .models.build import build_models, build_reference
from .models.heads import build_critic, check_model_dir, load_reward_model
from .models.load import eos_token_ids, load_tokenizer, max_positions, model_config
from .models.lora import fold_adapters
from .models.vlm import check_vision_language, is_vision_language, text_config
from .plot import write_dashboard
from .rewards.build import build_scorer
from .rewards.model import RewardModel
from .rewards.registry import RewardScorer
from .rollout.build import build_engine
from .rollout.generation import Generation
from .rollout.local import LocalRollouts
from .rollout.multi_turn import check_multi_turn
from .rollout.remote import RemoteRollouts
from .rollout.scoring import Scoring
from .rollout.sync import CrossWeightSync, WeightSync, bucket_bytes_of
from .rollout.worker import GenerationWorker
from .rollout.vllm_checks import check_vllm
from .rollout.vllm_moe import num_experts
from .tasks.prompts import load_data, max_images, sft_demonstrations
from .trainer.actor import Actor
from .trainer.checkpoint import CheckpointError, CheckpointManager
from .trainer.preemption import PreemptionHandler
from .trainer.console import quiet_libraries
from .trainer.critic import Critic
from .trainer.experience import uses_reference
from .trainer.loop import Trainer, TrainerParts
from .trainer.metrics import MetricsLogger
from .trainer.micro import MicroBatcher
from .trainer.offload import ActorOffload
from .trainer.schedule import build_scheduler
from .trainer.sft import sft_warm_start

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
RECIPE_DIR = REPO_ROOT / "recipes"
CONFIG_ERROR_GRACE_S = 15.0  # how long ranks other than 0 wait before exiting on a config error
log = logging.getLogger("spmd_rlhf")


def _register() -> None:
    register_configs()
    store = ConfigStore.instance()
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        store.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    # Only rank 0 writes Hydra's copy of the config into the run directory.
    OmegaConf.register_new_resolver(
        "rank_zero_subdir", lambda: ".hydra" if os.environ.get("RANK", "0") == "0" else None, replace=True
    )


# --- run ----------------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)


def broadcast_from_rank_zero(value, group: dist.ProcessGroup | None = None):
    """Rank 0's value on every rank of ``group`` (file-system answers may differ across nodes for a moment)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def shared_run_dir(run_dir: str, topo: Topology) -> str:
    """Rank 0's Hydra run directory, on every rank (their clocks may straddle a second)."""
    box = [run_dir]
    dist.broadcast_object_list(box, src=0)
    if box[0] != run_dir and os.path.isdir(run_dir) and not os.listdir(run_dir):
        os.rmdir(run_dir)
    os.makedirs(box[0], exist_ok=True)
    return box[0]


def build_trainer(cfg: Config, topo: Topology, tokenizer, train, val, scorer: RewardScorer,
                  logger: MetricsLogger, resuming: bool = False) -> Trainer:
    """Every part of a training rank's run; ``resuming`` skips the warm start (the checkpoint has
    the weights). Colocated, the rank also hosts an engine; split, the rollouts are remote."""
    hf_config = model_config(cfg, tokenizer)
    actor_model = build_models(cfg, topo, hf_config).actor
    if cfg.trainer.sft.steps > 0 and not resuming:
        if cfg.model.path is not None:
            raise ConfigError("trainer.sft.steps > 0 needs the embedded task's demonstrations; set trainer.sft.steps=0")
        metrics = sft_warm_start(actor_model, sft_demonstrations(cfg, tokenizer), cfg.trainer.sft, topo.rank,
                                 topo.dp_size, topo.device, tokenizer.pad_token_id, cfg.trainer.grad_clip)
        logger.log(0, metrics, advance=False)
    algo, t = cfg.algorithm, cfg.trainer
    # LoRA: the reference is the actor with its adapters disabled (the warm start folded into it), no second model
    lora = cfg.model.lora.rank > 0
    if lora and cfg.trainer.sft.steps > 0 and not resuming:
        fold_adapters(actor_model)
    reference = build_reference(actor_model, hf_config, topo) if needs_reference(cfg) and not lora else None
    updates = t.total_steps * algo.ppo_epochs * (t.batch_size // t.mini_batch_size)
    optimizer, scheduler = build_optimizer(actor_model, t.lr, t.weight_decay, t.betas, t.warmup_steps, updates,
                                           t.min_lr_ratio, t.fused_optimizer, topo.device)
    batcher = MicroBatcher(micro_batch_tokens(cfg, topo.device.type, is_vision_language(hf_config)),
                           cfg.model.logprob_chunk_tokens)
    actor = Actor(actor_model, optimizer, scheduler, topo.dp_size, t.grad_clip, topo.device, batcher=batcher)
    critic = build_critic_for(cfg, topo, hf_config, actor_model, updates) if algo.adv_estimator == "gae" else None
    reward_model = None
    if cfg.reward.model.path is not None:
        rm_dtype = torch.bfloat16 if cfg.reward.model.dtype == "bfloat16" else torch.float32
        reward_model = RewardModel(load_reward_model(cfg.reward.model.path, topo, rm_dtype), topo.device,
                                   cfg.reward.model.micro_batch_size)
    score, bucket_bytes = Scoring(cfg, tokenizer, scorer, reward_model), bucket_bytes_of(cfg.rollout.bucket_mb)
    if topo.placement == "split":  # every training rank walks the whole batch: it receives groups of any prompt
        loader = global_loader(cfg, train)
        rollouts = RemoteRollouts(cfg, topo, CrossWeightSync(topo, bucket_bytes, model=actor_model), loader, score)
    else:
        offload = partial(ActorOffload, actor_model, optimizer, topo.device, t.offload_actor_during_rollout)
        with offload():  # vLLM sizes its KV cache in the room left
            engine = build_engine(cfg, topo, hf_config, eos_token_ids(tokenizer, hf_config), tokenizer.pad_token_id,
                                  max_images(train + val))
        loader = PromptLoader(train, t.batch_size, topo.rank, topo.world_size, cfg.data.seed, cfg.data.shuffle,
                              mini_batch=t.mini_batch_size)
        rollouts = LocalRollouts(cfg, topo, engine, WeightSync(engine, actor_model, topo, bucket_bytes),
                                 Generation(cfg, topo, engine, loader, score), val, offload)
    # from model.path, this function rebuilds the reference a resume needs (the actor's weights before the
    # checkpoint loads); the embedded model's is its warm start, which only the checkpoint keeps
    parts = TrainerParts(tokenizer, actor, rollouts, loader, logger, val, reference=reference, critic=critic,
                         reference_in_checkpoint=cfg.model.path is None)
    return Trainer(cfg, topo, parts)


def global_loader(cfg: Config, train: list[PromptExample]) -> PromptLoader:
    """The loader of split placement: every rank sees the whole batch, in global order."""
    t = cfg.trainer
    return PromptLoader(train, t.batch_size, 0, 1, cfg.data.seed, cfg.data.shuffle, mini_batch=t.mini_batch_size)


def run_generation_rank(cfg: Config, topo: Topology, tokenizer, train, val, scorer: RewardScorer) -> None:
    """A generation-only rank (split placement): the engine, run by training rank 0's controls."""
    hf_config = model_config(cfg, tokenizer)
    engine = build_engine(cfg, topo, hf_config, eos_token_ids(tokenizer, hf_config), tokenizer.pad_token_id,
                          max_images(train + val))
    try:
        sync = CrossWeightSync(topo, bucket_bytes_of(cfg.rollout.bucket_mb), engine=engine)
        GenerationWorker(cfg, topo, engine, sync, global_loader(cfg, train), tokenizer, scorer, val).run()
    finally:
        engine.close()


def needs_reference(cfg: Config) -> bool:
    """Reference log-probs are needed when KL is a loss, in the reward, or guarded."""
    return uses_reference(cfg)


def build_optimizer(model, lr: float, weight_decay: float, betas, warmup_steps: int, updates: int,
                    min_lr_ratio: float, fused: bool | None = None, device: torch.device | None = None):
    """AdamW and the warmup/decay schedule. Its fused kernel by default where the state lives on CUDA:
    the state lives with the parameters, in host memory under FSDP's CPU offload, where the default
    is torch's CPU loop (``fused=True`` takes the CPU fused kernel there). Only trainable parameters
    get optimizer state (LoRA: the adapters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if fused is None:
        fused = device is not None and device.type == "cuda" and all(p.device.type == "cuda" for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                  fused=fused)
    return optimizer, build_scheduler(optimizer, warmup_steps, max(updates, warmup_steps), min_lr_ratio)


def build_critic_for(cfg: Config, topo: Topology, hf_config, actor_model, updates: int) -> Critic:
    """The value model of ``adv_estimator=gae``: from the actor's weights or a reward model's."""
    c = cfg.critic
    init_from = actor_model if c.init_from == "actor" else c.init_from
    model = build_critic(hf_config, topo, init_from, c.activation_checkpointing, seed=cfg.trainer.seed,
                         cpu_offload=cfg.trainer.cpu_offload)
    optimizer, scheduler = build_optimizer(model, c.lr, c.weight_decay, cfg.trainer.betas, c.warmup_steps, updates,
                                           cfg.trainer.min_lr_ratio, cfg.trainer.fused_optimizer, topo.device)
    return Critic(model, optimizer, scheduler, topo.dp_size, c.grad_clip, topo.device)


def check_reward_model(cfg: Config, tokenizer) -> None:
    """The reward model and critic directories, checked before any process group exists."""
    if cfg.reward.model.path is not None:
        check_model_dir(cfg.reward.model.path, "reward.model.path", tokenizer)
    if cfg.algorithm.adv_estimator == "gae" and cfg.critic.init_from != "actor":
        check_model_dir(cfg.critic.init_from, "critic.init_from", tokenizer)


def report(results: dict[str, dict[str, float]], logger: MetricsLogger) -> None:
    """The held-out table: the columns of the evaluations that ran (``before``: fresh runs with
    ``trainer.eval_before``; ``after``: ``trainer.eval_after``), the change when both did."""
    columns = [(name, results[name]) for name in ("before", "after") if results.get(name)]
    keys = sorted({k for _, values in columns for k in values if k.endswith("/accuracy")})
    if not keys:
        return
    width = max(len(k) for k in keys)
    both = len(columns) == 2
    lines = [f"{'held-out':<{width}}" + "".join(f"  {name:>6}" for name, _ in columns) + ("   change" if both else "")]
    for key in keys:
        cells = "".join(f"  {values[key]:6.3f}" if key in values else "       -" for _, values in columns)
        change = ""
        if both and all(key in values for _, values in columns):
            change = f"  {100 * (columns[1][1][key] - columns[0][1][key]):+6.1f} pts"
        lines.append(f"{key:<{width}}{cells}{change}")
    logger.write("\n".join(lines))


def check_torchrun_restart(environ=os.environ) -> None:
    """Refuse a torchrun restart that would hang. torchrun's agent shares its rendezvous store with
    the workers (static rendezvous always; c10d unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); the
    process group of restarted workers then reads the previous attempt's addresses from that store
    and waits for them until ``distributed.timeout_s`` (torch 2.13, pytorch/pytorch#135712)."""
    restarts = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise ConfigError(
            f"torchrun restarted the workers (restart {restarts}) with its rendezvous store shared with them, where "
            "the new process group would hang on the previous attempt's addresses; for --max-restarts launch "
            "torchrun with --rdzv-backend c10d --rdzv-endpoint HOST:PORT and the environment variable "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store for every restart)")


def preflight(cfg: Config, world_size: int, config_dict: dict | None = None):
    """Every check a user's configuration can fail, before any process group or model exists (also
    what the launchers run once, in one process, before starting ranks). Returns what the run goes
    on with: ``(tokenizer, train, val, scorer)``. Raises ``ConfigError``."""
    try:
        check_torchrun_restart()
        check_known_keys(config_dict)
        validate(cfg, world_size)
        tokenizer = load_tokenizer(cfg)
        hf_config = model_config(cfg, tokenizer)
        check_vision_language(cfg, hf_config)
        text = text_config(hf_config)
        heads = text.num_attention_heads
        check_tp_shapes(cfg, heads, getattr(text, "num_key_value_heads", None) or heads, text.intermediate_size,
                        num_experts(hf_config))
        check_context_length(cfg, max_positions(hf_config))
        check_vllm(cfg, hf_config)
        train, val = load_data(cfg, tokenizer, hf_config)
        scorer = build_scorer(cfg.reward)
        check_reward_model(cfg, tokenizer)
        check_multi_turn(cfg, tokenizer)
        if len(train) < cfg.trainer.batch_size:
            raise ConfigError(f"only {len(train)} usable training prompts, fewer than trainer.batch_size="
                              f"{cfg.trainer.batch_size}; lower trainer.batch_size or add data")
    except (ValueError, OSError) as err:
        raise err if isinstance(err, ConfigError) else ConfigError(str(err)) from err
    return tokenizer, train, val, scorer


def run(cfg: Config, run_dir: str, config_dict: dict | None = None) -> dict[str, dict[str, float]]:
    env = read_launch_env()
    tokenizer, train, val, scorer = preflight(cfg, env.world_size, config_dict)
    topo = init_distributed(cfg.distributed.dp_replicate, cfg.distributed.tp, cfg.distributed.timeout_s, env,
                            generation_ranks=dedicated_generation_ranks(cfg), sp=cfg.distributed.sp)
    try:
        return train_on(topo, cfg, run_dir, tokenizer, train, val, scorer, config_dict)
    except BaseException as err:
        forget_locals(err)
        raise
    finally:
        scorer.close()  # the sandbox pools, if any row started them
        use_training_group(None)  # the module kept the training ranks' group
        shutdown()  # after train_on's frame is gone: nothing of the run holds a process group any more


def train_on(topo: Topology, cfg: Config, run_dir: str, tokenizer, train, val, scorer: RewardScorer,
             config_dict: dict | None) -> dict[str, dict[str, float]]:
    """Everything that needs the process group: build (or resume), train, report. The engine is
    closed here on every path, while the group is still alive (vLLM's teardown needs it)."""
    run_dir = shared_run_dir(run_dir, topo)
    seed_everything(cfg.trainer.seed, topo.rank)
    if not topo.is_training:
        run_generation_rank(cfg, topo, tokenizer, train, val, scorer)
        return {}
    group = topo.train_group if topo.placement == "split" else None  # what training collectives span
    use_training_group(group)
    lg = cfg.logging
    logger = MetricsLogger(run_dir, topo.is_main, cfg.trainer.total_steps, lg, config_dict, lg.console,
                           lg.progress_bar, group=group, label=cfg.algorithm.name)
    generation = f"{len(topo.gen_ranks)} generation ranks" if topo.placement == "split" else "colocated generation"
    logger.write(f"spmd_rlhf: world {topo.world_size} ({topo.backend}), train mesh {tuple(topo.train_mesh.shape)},"
                 f" {generation}, tp {topo.tp}, {len(train)} train / {len(val)} held-out prompts, run dir {run_dir}")
    checkpoints = CheckpointManager(cfg.trainer.checkpoint_dir or os.path.join(run_dir, "checkpoints"),
                                    cfg.trainer.keep_last, process_group=group)
    resume_path = broadcast_from_rank_zero(checkpoints.resolve(cfg.trainer.resume), group)
    if resume_path is None and cfg.trainer.resume == "auto":
        logger.write(f"spmd_rlhf: trainer.resume=auto found no checkpoint in {checkpoints.checkpoint_dir}; "
                     "starting fresh at step 0")
    trainer = build_trainer(cfg, topo, tokenizer, train, val, scorer, logger, resuming=resume_path is not None)
    try:
        if resume_path is not None:
            info = checkpoints.load(resume_path, trainer.checkpoint_state())
            trainer.state.saved_step = info.step
            logger.write(f"spmd_rlhf: resumed from {info.path} (step {info.step}, saved by {info.world_size} ranks)")
        logger.start(trainer.step)
        with PreemptionHandler(process_group=group) as preemption:
            results = trainer.run(checkpoints, preemption)
        report(results, logger)
        logger.close()
        if topo.is_main:
            write_dashboard(run_dir)
        return results
    finally:
        trainer.close()


def forget_locals(err: BaseException) -> None:
    """Clear the locals of the frames a failed run's traceback keeps (and of the exceptions it
    chains): they hold the models, and through them the process groups, which ``shutdown`` must
    be able to end before the interpreter exits. The traceback still prints every line."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(dcfg: DictConfig) -> None:
    cfg: Config = OmegaConf.to_object(dcfg)
    quiet_libraries(cfg.logging.verbose, read_launch_env().rank == 0)
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg, run_dir, OmegaConf.to_container(dcfg, resolve=True))
    except (ConfigError, CheckpointError) as err:  # a damaged or foreign checkpoint: every rank agrees on it too
        if read_launch_env().rank == 0:
            kind = "checkpoint error" if isinstance(err, CheckpointError) else "configuration error"
            print(f"spmd_rlhf: {kind}: {err}", file=sys.stderr, flush=True)
        else:
            # Every rank reaches the same verdict, but a launcher ends the job as soon as one rank
            # exits: give rank 0 time to print first (its exit usually ends this rank sooner).
            time.sleep(CONFIG_ERROR_GRACE_S)
        sys.exit(2)


_register()

if __name__ == "__main__":
    main()
