"""The trainer's own GRPO step on DESIGN §7's reference workload: step time by phase, tokens/s/GPU,
MFU, memory, and optionally a profiler summary of one update and one logprob micro-batch.

    torchrun --nproc-per-node 1 tools/bench_step.py --shape 1.5b --steps 4 --kl-steps 2 --out step.json
    torchrun --nproc-per-node 1 tools/bench_step.py --shape 0.5b --spread-max-tokens 0,32768 --rollout-ab
    torchrun --nproc-per-node 1 tools/bench_step.py --shape tiny --engine torch --steps 2   # CPU smoke

Workload: random-init Qwen2 of the 0.5B / 1.5B shape, 64 prompts x 8 samples, prompts of exactly
``--prompt-len`` tokens, bf16 vLLM rollout at temperature 1, a random reward, one optimizer step per
batch, no KL term (TRL's default) for ``--steps`` steps, then the k3 KL loss against a frozen
reference for ``--kl-steps`` more. The fixed workload ignores EOS (every completion is exactly
``--gen-len`` tokens, as TRL's side); the spread one (``--spread-max-tokens``, with packing off (0)
and on) stops on any of vocab/256 token ids, so under the
random model's near-uniform sampling completion lengths are geometric with mean ~256 tokens, cut
at ``--gen-len`` (what packing buys). The first step of each setting is a warm-up and
is reported but not averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_colocate import SHAPES, qwen2_config, random_prompts  # noqa: E402

PHASES = ("timing/reshard", "timing/generate", "timing/reference", "timing/update", "timing/step")
SPREAD_STOP_FRACTION = 256  # spread workload: one token id in this many ends a completion


def say(*parts) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print("[bench_step]", *parts, flush=True)


def random_reward(data_source, solution_str, ground_truth, extra_info=None) -> float:
    return random.random()


class _NullTokenizer:
    pad_token_id = 1

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def make_config(args, max_tokens: int, kl: bool, workload: str = "fixed"):
    from spmd_rlhf.config import Config

    cfg = Config()
    r, t, a, m = cfg.rollout, cfg.trainer, cfg.algorithm, cfg.model
    r.engine, r.n, r.max_new_tokens, r.ignore_eos = args.engine, args.n, args.gen_len, workload == "fixed"
    r.vllm.seed_per_request = bool(args.seed_per_request)
    r.vllm.gpu_memory_utilization, r.vllm.sleep_level = args.gpu_memory_utilization, 2
    t.batch_size = t.mini_batch_size = args.train_prompts
    t.micro_batch_size, t.lr, t.max_tokens_per_micro_batch = args.micro_batch, 1e-6, max_tokens
    m.activation_checkpointing, m.activation_checkpointing_every = args.ac_every > 0, max(args.ac_every, 1)
    m.compile_layers, m.logprob_chunk_tokens = bool(args.compile), args.chunk_tokens
    a.use_kl_loss, a.kl_coef = kl, 0.001 if kl else 0.0
    cfg.reward.custom_function = f"{os.path.abspath(__file__)}:random_reward"
    return cfg


def build_trainer(args, topo, hf_config, actor_model, engine, cfg):
    from spmd_rlhf.data.datasets import PromptExample
    from spmd_rlhf.data.loader import PromptLoader
    from spmd_rlhf.models.build import build_reference
    from spmd_rlhf.rewards.registry import RewardScorer
    from spmd_rlhf.rollout.generation import Generation
    from spmd_rlhf.rollout.local import LocalRollouts
    from spmd_rlhf.rollout.scoring import Scoring
    from spmd_rlhf.rollout.sync import WeightSync, bucket_bytes_of
    from spmd_rlhf.trainer.actor import Actor
    from spmd_rlhf.trainer.loop import Trainer, TrainerParts
    from spmd_rlhf.trainer.micro import MicroBatcher
    from spmd_rlhf.trainer.schedule import build_scheduler
    from spmd_rlhf.train import build_optimizer, needs_reference

    t = cfg.trainer
    optimizer, _ = build_optimizer(actor_model, t.lr, t.weight_decay, t.betas, 0, 100, 0.0, t.fused_optimizer,
                                   topo.device)
    batcher = MicroBatcher(t.max_tokens_per_micro_batch, cfg.model.logprob_chunk_tokens)
    actor = Actor(actor_model, optimizer, build_scheduler(optimizer, 0, 100), topo.dp_size, 1.0, topo.device,
                  batcher=batcher)
    reference = build_reference(actor_model, hf_config, topo) if needs_reference(cfg) else None
    prompts = random_prompts(args.train_prompts * 8, args.prompt_len, hf_config.vocab_size, seed=5)
    examples = [PromptExample(p, "random", "0", {}, i) for i, p in enumerate(prompts)]
    loader = PromptLoader(examples, args.train_prompts, topo.rank, topo.world_size, 0)
    tokenizer = _NullTokenizer()
    scoring = Scoring(cfg, tokenizer, RewardScorer(cfg.reward.custom_function, 10.0, sandbox_custom=False))
    sync = WeightSync(engine, actor_model, topo, bucket_bytes_of(cfg.rollout.bucket_mb))
    rollouts = LocalRollouts(cfg, topo, engine, sync, Generation(cfg, topo, engine, loader, scoring), [])
    parts = TrainerParts(tokenizer, actor, rollouts, loader, None, [], reference=reference)
    return Trainer(cfg, topo, parts)


def run_steps(trainer, steps: int, device) -> list[dict]:
    records = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        metrics = trainer.train_step()
        trainer.state.step += 1
        record = {k: v for k, v in metrics.items() if k.startswith(("timing/", "perf/", "rollout/response_length"))}
        if device.type == "cuda":
            record["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        records.append(record)
        say(json.dumps({k: round(v, 4) for k, v in record.items()}))
    return records


def summarise(records: list[dict]) -> dict:
    timed = records[1:] or records  # the first step compiles and warms caches
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0]}
    return {"steps": records, "mean": mean}


def profile_micro(trainer, args, hf_config, out_path: str) -> None:
    """torch.profiler over one update and one logprob pass of ``--profile-rows`` sequences."""
    from torch.profiler import ProfilerActivity, profile

    from spmd_rlhf.data.batch import collate
    from spmd_rlhf.trainer.actor import PolicyTargets

    rng = random.Random(11)
    rows = args.profile_rows
    prompts = random_prompts(rows, args.prompt_len, hf_config.vocab_size, seed=13)
    responses = [[rng.randrange(2, hf_config.vocab_size) for _ in range(args.gen_len)] for _ in range(rows)]
    batch = collate(prompts, responses, pad_id=1)
    targets = PolicyTargets(torch.randn(batch.loss_mask_BT.shape), None)
    algo, actor = trainer.cfg.algorithm, trainer.actor
    for _ in range(2):  # warm-up
        actor.update(batch, targets, algo, rows, 1.0)
    lines = []
    for name, fn in [("update", lambda: actor.update(batch, targets, algo, rows, 1.0)),
                     ("logprobs", lambda: actor.logprobs(batch, rows, 1.0))]:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        lines += profile_summary(name, prof, wall, rows, args)
    text = "\n".join(lines)
    say("\n" + text)
    with open(out_path, "w") as f:
        f.write(text + "\n")


def profile_summary(name: str, prof, wall: float, rows: int, args) -> list[str]:
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    gpu_us = sum(e.self_device_time_total for e in kernels)
    syncs = {e.key: e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                         "aten::_local_scalar_dense", "aten::item", "cudaMemcpyAsync")}
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    lines = [f"## {name}: {rows} x {args.prompt_len + args.gen_len} tokens, wall {wall * 1e3:.1f} ms, "
             f"GPU busy {gpu_us / 1e3:.1f} ms ({100 * gpu_us / 1e6 / wall:.0f} %), idle {wall * 1e3 - gpu_us / 1e3:.1f} ms, "
             f"{launches} kernel launches, host syncs {syncs}",
             "| kernel | calls | GPU ms | share |", "|---|---|---|---|"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:15]:
        lines.append(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.1f} | "
                     f"{100 * e.self_device_time_total / max(gpu_us, 1):.1f} % |")
    return lines


def rollout_ab(trainer, args, hf_config, device) -> dict:
    """Generate the step's 64 x 8 samples with and without a seed per request (same weights)."""
    from spmd_rlhf.rollout.base import SamplingConfig

    engine, out = trainer.rollouts.engine, {}
    prompts = random_prompts(args.train_prompts, args.prompt_len, hf_config.vocab_size, seed=21)
    sampling = SamplingConfig(max_new_tokens=args.gen_len, n=args.n, temperature=1.0, seed=3, ignore_eos=True)
    engine.wake()
    trainer.rollouts.sync.push()
    for seeded in (True, False, True):
        engine.seed_per_request = seeded
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        samples = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        out[f"seeded={seeded}"] = sum(len(t) for t in samples.token_ids) / seconds
    engine.seed_per_request = bool(args.seed_per_request)
    engine.sleep()
    return out


def build_actor_and_engine(args, topo, hf_config, model_dir):
    from transformers import AutoModelForCausalLM

    from spmd_rlhf.models.parallelize import parallelize
    from spmd_rlhf.rollout.build import build_engine

    if args.compile < 0:
        args.compile = int(topo.device.type == "cuda")
    cfg = make_config(args, 0, False)
    cfg.model.path = model_dir
    torch.manual_seed(0)
    with torch.device(topo.device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    m = cfg.model
    actor = parallelize(model, topo.fsdp_mesh, topo.device, m.activation_checkpointing, trainable=True,
                        checkpoint_every=m.activation_checkpointing_every, compile_layers=m.compile_layers)
    cfg.data.max_prompt_length = args.prompt_len
    # the fixed workload ignores EOS; the spread one stops on any of these ids
    stop = list(range(2, 2 + hf_config.vocab_size // SPREAD_STOP_FRACTION))
    engine = build_engine(cfg, topo, hf_config, stop, 1)
    return actor, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    parser.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", dest="n", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per padded micro-batch")
    parser.add_argument("--max-tokens", default="32768", help="comma list of trainer.max_tokens_per_micro_batch to run")
    parser.add_argument("--spread-max-tokens", default="", help="then the spread workload with each of these")
    parser.add_argument("--spread-steps", type=int, default=3)
    parser.add_argument("--seed-per-request", type=int, default=1)
    parser.add_argument("--rollout-ab", action="store_true", help="time generate with and without per-request seeds")
    parser.add_argument("--chunk-tokens", type=int, default=4096)
    parser.add_argument("--ac-every", type=int, default=0, help="activation checkpointing every k-th layer; 0 = off")
    parser.add_argument("--compile", type=int, default=-1, help="compile decoder layers: 1, 0, -1 = on CUDA only")
    parser.add_argument("--steps", type=int, default=3, help="steps without KL per setting (first is warm-up)")
    parser.add_argument("--kl-steps", type=int, default=0, help="steps with the KL loss on, after those")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--profile", default=None, help="write a profiler summary here")
    parser.add_argument("--profile-rows", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from spmd_rlhf.distributed.topology import init_distributed

    world = int(os.environ.get("WORLD_SIZE", "1"))
    hf_config = qwen2_config(args.shape)
    model_dir = tempfile.mkdtemp(prefix="bench_step_")
    hf_config.save_pretrained(model_dir)
    topo = init_distributed(1, world, 1800)
    actor_model, engine = build_actor_and_engine(args, topo, hf_config, model_dir)
    device = topo.device
    result = {"shape": args.shape, "world_size": world, "date": time.strftime("%Y-%m-%d"), "args": vars(args),
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "runs": {}}
    fixed = [int(x) for x in args.max_tokens.split(",")]
    runs = [("fixed", mt, False, args.steps) for mt in fixed] + [("fixed", fixed[-1], True, args.kl_steps)]
    runs += [("spread", int(x), False, args.spread_steps) for x in filter(None, args.spread_max_tokens.split(","))]
    for workload, max_tokens, kl, steps in runs:
        if steps == 0:
            continue
        cfg = make_config(args, max_tokens, kl, workload)
        trainer = build_trainer(args, topo, hf_config, actor_model, engine, cfg)
        name = f"{workload},max_tokens={max_tokens},kl={'on' if kl else 'off'}"
        say("run", name)
        result["runs"][name] = summarise(run_steps(trainer, steps, device))
        if args.profile and not kl and workload == "fixed" and device.type == "cuda":
            profile_micro(trainer, args, hf_config, f"{args.profile}.max_tokens{max_tokens}.md")
        if args.rollout_ab and not kl and workload == "fixed":
            try:
                result["rollout_ab"] = rollout_ab(trainer, args, hf_config, device)
            except Exception as err:  # a failed comparison is a result; the step figures stand
                result["rollout_ab"] = {"error": f"{type(err).__name__}: {err}"}
            say("rollout_ab", result["rollout_ab"])
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if topo.is_main:
        table = [f"{'run':<28} " + " ".join(f"{p.split('/')[-1]:>9}" for p in PHASES) + "  tok/s/GPU  mfu_upd  mfu_lp"]
        for name, run in result["runs"].items():
            m = run["mean"]
            table.append(f"{name:<28} " + " ".join(f"{m.get(p, 0):9.2f}" for p in PHASES)
                         + f"  {m.get('perf/tokens_per_s_per_gpu', 0):9.0f}  {m.get('perf/mfu/update', 0):7.3f}"
                         + f"  {m.get('perf/mfu/logprobs', 0):6.3f}")
        text = json.dumps(result, indent=1, default=str)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print("\n".join(table), flush=True)
    if hasattr(engine, "close"):
        engine.close()
    if dist.is_initialized():  # vLLM's close may already have ended the group
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
