"""The actor's update and logprob passes alone, over a grid of the knobs that pay on GPUs:
activation checkpointing (off / every k-th layer / full), ``torch.compile`` per decoder layer,
padded micro-batches of R rows or packed ones of a token budget. Picks the defaults.

    torchrun --nproc-per-node 1 tools/bench_update.py --shape 1.5b --rows 128 \
        --grid "ac=1,compile=0,mb=8" "ac=0,compile=1,tokens=16384"
    torchrun --nproc-per-node 1 tools/bench_update.py --shape tiny --rows 8 --grid "ac=1,compile=0,mb=4"  # CPU

Each grid point rebuilds the FSDP2 actor (fp32 master weights, bf16 compute on CUDA), then times
one ``Actor.update`` (one optimizer step over ``--rows`` sequences of ``--prompt-len`` +
``--gen-len`` tokens, random advantages, on-policy) and one no-grad logprob pass, after a warm-up
of each: seconds, tokens/s, MFU (model FLOPs, ``trainer/flops.py``) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_colocate import SHAPES, qwen2_config, random_prompts  # noqa: E402


def parse_point(text: str) -> dict:
    point = {"ac": 1, "compile": 0, "mb": 8, "tokens": 0, "chunk": 4096}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        assert key in point, f"unknown grid key {key!r}; known: {sorted(point)}"
        point[key] = int(value)
    return point


def synthetic_batch(args, vocab: int):
    from spmd_rlhf.data.batch import collate

    rng = random.Random(7)
    prompts = random_prompts(args.rows, args.prompt_len, vocab, seed=9)
    lengths = [args.gen_len if args.workload == "fixed" else rng.randint(args.gen_len // 16, args.gen_len)
               for _ in range(args.rows)]
    responses = [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]
    return collate(prompts, responses, pad_id=1)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_point(point: dict, args, topo, hf_config, batch) -> dict:
    from transformers import AutoModelForCausalLM

    from spmd_rlhf.config import AlgorithmConfig
    from spmd_rlhf.models.parallelize import parallelize
    from spmd_rlhf.train import build_optimizer
    from spmd_rlhf.trainer.actor import Actor, PolicyTargets
    from spmd_rlhf.trainer.flops import flops_model, mfu, peak_flops
    from spmd_rlhf.trainer.micro import MicroBatcher
    from spmd_rlhf.trainer.schedule import build_scheduler

    device = topo.device
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="sdpa")
    model = parallelize(model, topo.fsdp_mesh, device, point["ac"] > 0, trainable=True,
                        checkpoint_every=max(point["ac"], 1), compile_layers=bool(point["compile"]))
    optimizer, _ = build_optimizer(model, 1e-6, 0.0, (0.9, 0.999), 0, 100, 0.0, None, device)
    actor = Actor(model, optimizer, build_scheduler(optimizer, 0, 100), topo.dp_size, 1.0, device,
                  batcher=MicroBatcher(point["tokens"], point["chunk"]))
    targets = PolicyTargets(torch.randn(batch.loss_mask_BT.shape), None)
    algo = AlgorithmConfig(use_kl_loss=False, kl_coef=0.0)
    update = lambda: actor.update(batch, targets, algo, point["mb"], 1.0)  # noqa: E731
    logprobs = lambda: actor.logprobs(batch, point["mb"], 1.0)  # noqa: E731
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = timed(update, device)
    update_s = min(timed(update, device) for _ in range(args.repeats))
    timed(logprobs, device)
    logprobs_s = min(timed(logprobs, device) for _ in range(args.repeats))
    seq_lens = batch.attention_mask_BT.sum(1).tolist()
    scored = batch.loss_mask_BT.sum(1).int().tolist()
    flops = flops_model(hf_config)
    peak = peak_flops(torch.cuda.get_device_name() if device.type == "cuda" else "cpu", args.peak_tflops)
    tokens = sum(seq_lens)
    out = {**point, "first_update_s": warm, "update_s": update_s, "logprobs_s": logprobs_s,
           "update_tokens_per_s": tokens / update_s, "logprobs_tokens_per_s": tokens / logprobs_s,
           "mfu_update": mfu(flops.train(seq_lens, scored), update_s, peak),
           "mfu_logprobs": mfu(flops.forward(seq_lens, scored), logprobs_s, peak)}
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--workload", default="fixed", choices=["fixed", "spread"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--grid", nargs="+", default=["ac=1,compile=0,mb=8"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from spmd_rlhf.distributed.topology import init_distributed

    topo = init_distributed(1, 1, 1800)
    hf_config = qwen2_config(args.shape)
    batch = synthetic_batch(args, hf_config.vocab_size)
    rows = []
    for text in args.grid:
        point = parse_point(text)
        try:
            rows.append(run_point(point, args, topo, hf_config, batch))
        except Exception as err:  # a knob that fails here (an OOM, a compile error) is a result too
            rows.append({**point, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            if topo.device.type == "cuda":
                torch.cuda.empty_cache()
        print("[bench_update] " + json.dumps(rows[-1]), flush=True)
    if topo.is_main:
        print(f"{'point':<36} {'update s':>9} {'tok/s':>9} {'mfu':>6} {'logp s':>7} {'mfu':>6} {'peak GiB':>8}")
        for r in rows:
            name = f"ac={r['ac']},compile={r['compile']},mb={r['mb']},tokens={r['tokens']}"
            if "error" in r:
                print(f"{name:<36} {r['error'][:80]}")
                continue
            print(f"{name:<36} {r['update_s']:9.3f} {r['update_tokens_per_s']:9.0f} {r['mfu_update'] or 0:6.3f} "
                  f"{r['logprobs_s']:7.3f} {r['mfu_logprobs'] or 0:6.3f} {r.get('peak_gib', 0):8.1f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"shape": args.shape, "args": vars(args), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                          f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
