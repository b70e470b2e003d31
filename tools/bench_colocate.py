"""Colocated vLLM figures: sleep memory, weight-sync speed, sync-path equality, rollout
throughput against a stand-alone vLLM engine, and GRPO step time by phase.

    torchrun --nproc-per-node 1 tools/bench_colocate.py --shape 1.5b --out bench.json
    torchrun --nproc-per-node 2 tools/bench_colocate.py --shape 0.5b        # tp = world size

Random-init Qwen2 models of the published shapes (or ``--shape qwen3-moe-2b``: a Qwen3-MoE with
Qwen3-30B-A3B's layer layout, scaled to one GPU), bf16 engine, fp32 FSDP2 master weights. The
stand-alone reference runs first, in a child process on the same GPU(s) with the same prompts,
sampling settings and engine options, so both figures come from one run. The step-time part runs
the trainer's own step on DESIGN's reference workload: prompts of exactly ``--prompt-len``
tokens, completions of exactly ``--gen-len`` (EOS ignored), a random reward, one optimizer step
per batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

GiB = 1024**3
SHAPES = {  # Qwen2.5 shapes
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    # 3B / 7B / 14B / 32B from their published config.json (tools/bench_capacity.py)
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
}

# Qwen3-MoE shapes: Qwen3-30B-A3B's layer layout (head_dim 128, q/k norms, top-8 routing, every layer
# sparse) with fewer layers and experts, to train on one GPU. 2.3B parameters, 0.66B active per token.
MOE_SHAPES = {
    "qwen3-moe-2b": dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=64,
                         num_experts_per_tok=8, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=128, vocab_size=151936, tie_word_embeddings=False),
}


def model_config(shape: str):
    """The HF config of a dense (``SHAPES``) or MoE (``MOE_SHAPES``) shape."""
    if shape not in MOE_SHAPES:
        return qwen2_config(shape)
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**MOE_SHAPES[shape], architectures=["Qwen3MoeForCausalLM"], norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[],
                          router_aux_loss_coef=0.001, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=0,
                          eos_token_id=1, pad_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def qwen2_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=0,
                       eos_token_id=1, pad_token_id=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(count)]


def gpu_used_gib() -> float:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GiB


def say(*parts) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print("[bench]", *parts, flush=True)


def timed(fn, *args):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


# --- stand-alone reference (child process) ------------------------------------------------------


def standalone(args) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {}
    if args.standalone_async in ("on", "off"):
        extra["async_scheduling"] = args.standalone_async == "on"
    llm = LLM(model=args.model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              seed=0, tensor_parallel_size=args.tp, **extra, gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              max_model_len=args.prompt_len + args.gen_len, enable_prefix_caching=True)
    prompts = random_prompts(args.prompts, args.prompt_len, model_config(args.shape).vocab_size, seed=1)
    params = SamplingParams(n=1, temperature=1.0, max_tokens=args.gen_len, ignore_eos=True, logprobs=0,
                            detokenize=False, seed=3)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(requests[:8], params, use_tqdm=False)  # warm-up
    outputs, seconds = timed(llm.generate, requests, params)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print("STANDALONE " + json.dumps({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                                      "async_scheduling": _async_scheduling(llm)}), flush=True)


def _async_scheduling(llm):
    """Whether vLLM chose to overlap scheduling with the GPU (None where this version does not say)."""
    try:
        return llm.llm_engine.vllm_config.scheduler_config.async_scheduling
    except AttributeError:
        return None


def run_standalone(args, model_dir: str) -> dict:
    """The reference engine in a child process (plain ``python``, not under torchrun)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--standalone", "--model-dir", model_dir, "--shape", args.shape,
           "--prompts", str(args.prompts), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--tp", str(args.tp),
           "--standalone-async", args.standalone_async]
    cmd += ["--enforce-eager"] if args.enforce_eager else []
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "GROUP_WORLD_SIZE",
                     "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("STANDALONE "):
            return json.loads(line[len("STANDALONE "):])
    raise RuntimeError(f"stand-alone vLLM failed:\n{proc.stdout[-5000:]}")


# --- colocated -----------------------------------------------------------------------------------


def build(args, topo, hf_config, model_dir):
    from spmd_rlhf.models.parallelize import parallelize
    from spmd_rlhf.rollout.vllm_engine import VLLMEngine
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(topo.device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    actor = parallelize(model, topo.fsdp_mesh, topo.device, activation_checkpointing=True)
    before = gpu_used_gib()
    engine = VLLMEngine(hf_config, topo.gen_mesh, topo.device, torch.bfloat16, [hf_config.eos_token_id],
                        model_path=model_dir, weight_sync="dtensor", seed=0,
                        max_model_len=args.prompt_len + args.gen_len, gpu_memory_utilization=args.gpu_memory_utilization,
                        enforce_eager=args.enforce_eager, sleep_level=args.sleep_level)
    engine_gib = gpu_used_gib() - before
    return actor, engine, engine_gib


def weight_bytes(actor) -> int:
    return sum(p.numel() * 2 for p in actor.parameters())  # bf16 in the engine


def sync(engine, actor, topo, path: str, received: list[int] | None = None) -> float:
    """One weight sync through the trainer's ``WeightSync`` (tp slices, or whole tensors for ``full``)."""
    from spmd_rlhf.rollout.sync import WeightSync

    engine.wants_full_weights = path == "full"
    weights = WeightSync(engine, actor, topo, 256 * 2**20)
    moved, seconds = timed(weights.push)
    if received is not None:
        received[0] += int(moved)
    return seconds


def sync_figures(args, topo, actor, engine, engine_gib) -> dict:
    from spmd_rlhf.rollout import vllm_compat as compat

    out: dict = {"engine_gib": engine_gib}
    sync(engine, actor, topo, "dtensor")  # warm-up
    out["used_awake_gib"] = gpu_used_gib()
    _, out["sleep_s"] = timed(engine.sleep)
    out["used_asleep_gib"] = gpu_used_gib()
    out["freed_gib"] = out["used_awake_gib"] - out["used_asleep_gib"]
    out["freed_fraction_of_engine"] = out["freed_gib"] / max(engine_gib, 1e-9)
    _, out["wake_weights_s"] = timed(engine.wake)
    out["sync_with_kv_wake_s"] = sync(engine, actor, topo, "dtensor")  # also wakes the KV cache
    out["wake_plus_sync_s"] = out["wake_weights_s"] + out["sync_with_kv_wake_s"]
    out["sync_dtensor_s"] = min(sync(engine, actor, topo, "dtensor") for _ in range(3))  # engine awake
    gb = weight_bytes(actor) / 1e9
    out["weights_gb"] = gb
    out["sync_dtensor_ms_per_gb"] = 1e3 * out["sync_dtensor_s"] / gb
    model = compat.driver_model(engine.llm)
    dtensor_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtensor_bytes, full_bytes = [0], [0]
    sync(engine, actor, topo, "dtensor", dtensor_bytes)
    out["sync_full_s"] = sync(engine, actor, topo, "full", full_bytes)
    per_rank = torch.tensor([dtensor_bytes[0], full_bytes[0]], dtype=torch.float64, device=topo.device)
    gathered = [torch.zeros_like(per_rank) for _ in range(topo.world_size)]
    dist.all_gather(gathered, per_rank)
    out["received_bytes_per_rank"] = {"dtensor": [float(g[0]) for g in gathered],
                                      "full": [float(g[1]) for g in gathered]}
    identical = all(torch.equal(p, dtensor_weights[n]) for n, p in model.named_parameters())
    flag = torch.tensor([int(identical)], device=topo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    out["sync_paths_bit_identical"] = bool(flag.item())
    del dtensor_weights
    # vLLM's own load_weights of GPU-resident full tensors (the reference of DESIGN §7)
    full = [(n, p.full_tensor().to(torch.bfloat16)) for n, p in actor.named_parameters()]
    torch.cuda.synchronize()
    out["vllm_load_weights_s"] = min(timed(model.load_weights, iter(full))[1] for _ in range(3))
    out["vllm_load_weights_ms_per_gb"] = 1e3 * out["vllm_load_weights_s"] / gb
    out["sync_vs_vllm_load_weights"] = out["sync_dtensor_s"] / out["vllm_load_weights_s"]
    del full
    engine.wants_full_weights = False
    return out


def throughput(args, engine, hf_config) -> dict:
    from spmd_rlhf.rollout.base import SamplingConfig

    prompts = random_prompts(args.prompts, args.prompt_len, hf_config.vocab_size, seed=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = engine.tp
    replica, replicas = rank // tp, world // tp
    share = prompts[replica::replicas]
    mine = share[engine.tp_rank::tp]  # the engine gathers its tp group's prompts
    sampling = SamplingConfig(max_new_tokens=args.gen_len, n=1, temperature=1.0, seed=3, ignore_eos=True)
    engine.generate(mine[:2], sampling)  # warm-up
    samples, seconds = timed(engine.generate, mine, sampling)
    tokens = torch.tensor([sum(len(t) for t in samples.token_ids)], device=torch.device("cuda"))
    dist.all_reduce(tokens)
    return {"tokens": int(tokens.item()), "seconds": seconds, "tokens_per_s": tokens.item() / seconds}


def step_times(args, topo, actor, engine, hf_config) -> dict:
    """The trainer's own step on the reference workload."""
    from spmd_rlhf.config import Config
    from spmd_rlhf.data.datasets import PromptExample
    from spmd_rlhf.data.loader import PromptLoader
    from spmd_rlhf.models.build import build_reference
    from spmd_rlhf.rewards.registry import RewardScorer
    from spmd_rlhf.rollout.generation import Generation
    from spmd_rlhf.rollout.local import LocalRollouts
    from spmd_rlhf.rollout.scoring import Scoring
    from spmd_rlhf.rollout.sync import WeightSync
    from spmd_rlhf.trainer.actor import Actor
    from spmd_rlhf.trainer.loop import Trainer, TrainerParts
    from spmd_rlhf.trainer.schedule import build_scheduler

    cfg = Config()
    cfg.rollout.n, cfg.rollout.max_new_tokens, cfg.rollout.ignore_eos = args.n, args.gen_len, True
    cfg.trainer.batch_size = cfg.trainer.mini_batch_size = args.train_prompts
    cfg.trainer.micro_batch_size, cfg.trainer.lr = args.micro_batch, 1e-6
    cfg.reward.custom_function = f"{os.path.abspath(__file__)}:random_reward"
    prompts = random_prompts(args.train_prompts * 4, args.prompt_len, hf_config.vocab_size, seed=5)
    examples = [PromptExample(p, "random", "0", {}, i) for i, p in enumerate(prompts)]
    reference = build_reference(actor, hf_config, topo)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=1e-6)
    trainer_actor = Actor(actor, optimizer, build_scheduler(optimizer, 0, 100), topo.dp_size, 1.0, topo.device)
    loader = PromptLoader(examples, args.train_prompts, topo.rank, topo.world_size, 0)
    scoring = Scoring(cfg, _NullTokenizer(), RewardScorer(cfg.reward.custom_function, 10.0, sandbox_custom=False))
    rollouts = LocalRollouts(cfg, topo, engine, WeightSync(engine, actor, topo, 256 * 2**20),
                             Generation(cfg, topo, engine, loader, scoring), [])
    parts = TrainerParts(_NullTokenizer(), trainer_actor, rollouts, loader, None, [], reference=reference)
    trainer = Trainer(cfg, topo, parts)
    records = []
    for _ in range(args.steps):
        metrics = trainer.train_step()
        trainer.state.step += 1
        records.append({k: v for k, v in metrics.items() if k.startswith(("timing/", "perf/", "rollout/"))})
    last = records[-1]
    tokens = args.train_prompts * args.n * (args.prompt_len + args.gen_len)
    last["perf/tokens_per_s_per_gpu"] = tokens / last["timing/step"] / topo.world_size
    return {"steps": records, "last": last}


class _NullTokenizer:
    pad_token_id = 1

    def batch_decode(self, ids, skip_special_tokens=True):
        return [""] * len(ids)


def random_reward(data_source, solution_str, ground_truth, extra_info=None) -> float:
    return random.random()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", choices=sorted(SHAPES) + sorted(MOE_SHAPES))
    parser.add_argument("--prompts", type=int, default=512, help="throughput prompts")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--samples-per-prompt", dest="n", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sleep-level", type=int, default=2)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: standalone,throughput,steps")
    parser.add_argument("--out", default=None)
    parser.add_argument("--standalone", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--standalone-async", default="auto", choices=["auto", "on", "off"],
                        help="async scheduling of the stand-alone reference (auto: vLLM's choice)")
    args = parser.parse_args()
    if args.standalone:
        return standalone(args)

    from spmd_rlhf.distributed.topology import init_distributed

    skip = set(filter(None, args.skip.split(",")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    hf_config = model_config(args.shape)
    model_dir = tempfile.mkdtemp(prefix="bench_")
    hf_config.save_pretrained(model_dir)
    result: dict = {"shape": args.shape, "world_size": world, "device": torch.cuda.get_device_name(),
                    "date": time.strftime("%Y-%m-%d"), "args": vars(args)}
    args.tp = world
    if "standalone" not in skip and "throughput" not in skip and int(os.environ.get("RANK", "0")) == 0:
        # rank 0 runs the reference on all the job's GPUs (tp = world) before the process group
        # starts; the other ranks wait for it in init_distributed
        say("stand-alone vLLM ...")
        result["standalone"] = run_standalone(args, model_dir)
        say("stand-alone", result["standalone"])
    topo = init_distributed(1, world, 1800)
    actor, engine, engine_gib = build(args, topo, hf_config, model_dir)
    say("built actor and engine; engine GiB", engine_gib)
    result["sync"] = sync_figures(args, topo, actor, engine, engine_gib)
    say("sync", result["sync"])
    if "throughput" not in skip:
        result["colocated"] = throughput(args, engine, hf_config)
        result["colocated"]["async_scheduling"] = _async_scheduling(engine.llm)
        say("colocated", result["colocated"])
        if "standalone" in result:
            result["rollout_vs_standalone"] = result["colocated"]["tokens_per_s"] / result["standalone"]["tokens_per_s"]
    engine.sleep()
    if "steps" not in skip:
        result["step"] = step_times(args, topo, actor, engine, hf_config)
    if topo.is_main:
        text = json.dumps(result, indent=1, default=str)
        print("BENCH " + text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
