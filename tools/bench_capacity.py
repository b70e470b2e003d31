"""One GPU's capacity: the largest Qwen2-shape model whose GRPO step trains colocated with vLLM in
each memory mode (full fine-tuning, ``trainer.cpu_offload``, LoRA rank 16 on every projection), its
step time by phase, peak memory and tokens/s; and the longest response one GPU trains, with and
without activation checkpointing.

    python tools/bench_capacity.py --shapes 1.5b,3b,7b --modes full,offload,lora --out cap.json
    python tools/bench_capacity.py --context 1.5b --context-lens 2048,4096,8192,16384,32768 --out ctx.json
    python tools/bench_capacity.py --shapes tiny --modes lora --engine torch --steps 1   # CPU smoke

Plain ``python``, not torchrun: each case is a fresh ``torchrun --nproc-per-node 1`` child with its
own timeout, so an out-of-memory case cannot poison the next. A case is the trainer's own step
(``tools/bench_step.py``'s) on a random-init model: 16 prompts x 4 samples of 128 + 512 tokens (EOS
ignored), random reward, no KL, vLLM asleep (level 2) while training, ``--steps`` steps (the last
reported). Per case: ``fits`` (yes / oom / killed / timeout / error, with the last error line),
``timing/*``, peak ``torch.cuda.max_memory_allocated`` (the trainer's allocator, not vLLM's pool),
peak device memory in use sampled every 50 ms (nvidia-smi's figure) and tokens/s. Smallest first;
once a mode fails, its larger shapes are skipped, as are cases whose fp32 weights and optimizer
state alone exceed the memory, or that the rest of ``--budget-s`` cannot hold (estimated from the
mode's last case, scaled by size). ``--context``: 1 prompt x ``--context-samples``, longer and
longer responses, one row per micro-batch, checkpointing on and off, until the step fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench_colocate import SHAPES, qwen2_config  # noqa: E402
from bench_step import PHASES, build_trainer, make_config, run_steps  # noqa: E402

GiB = 2**30
MODES = {"full": {}, "offload": {"cpu_offload": True}, "lora": {"lora_rank": 16}}
OOM_MARKS = ("OutOfMemoryError", "CUDA out of memory", "out of memory", "Cannot allocate memory")


def param_count(shape: str) -> int:
    """Parameters of a Qwen2 shape (embeddings counted once when tied)."""
    s = SHAPES[shape]
    h, inter, layers, vocab = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = s["num_key_value_heads"] * (h // s["num_attention_heads"])
    attn = h * h + 2 * h * kv + h * h + h + 2 * kv  # q, k, v, o weights; q, k, v biases
    layer = attn + 3 * h * inter + 2 * h
    return layers * layer + vocab * h * (1 if s["tie_word_embeddings"] else 2) + h


def kv_bytes_per_token(shape: str) -> int:  # bf16 keys and values of every layer
    s = SHAPES[shape]
    return 2 * s["num_hidden_layers"] * s["num_key_value_heads"] * (s["hidden_size"] // s["num_attention_heads"]) * 2


# --- one case, in a torchrun child -------------------------------------------------------------------


def case_args(spec: dict) -> argparse.Namespace:
    """``bench_step``'s argument namespace for one case."""
    return argparse.Namespace(engine=spec["engine"], n=spec["n"], gen_len=spec["gen_len"],
                              prompt_len=spec["prompt_len"], train_prompts=spec["prompts"],
                              micro_batch=spec["micro_batch"], seed_per_request=1, gpu_memory_utilization=0.5,
                              ac_every=spec["ac_every"], compile=spec["compile"], chunk_tokens=4096)


def engine_memory_share(spec: dict) -> float:
    """vLLM's ``gpu_memory_utilization``: its bf16 weights + the case's KV cache (x2 headroom) + 3 GiB."""
    total = torch.cuda.get_device_properties(0).total_memory
    tokens = spec["prompts"] * spec["n"] * (spec["prompt_len"] + spec["gen_len"])
    need = 2 * param_count(spec["shape"]) + 2 * tokens * kv_bytes_per_token(spec["shape"]) + 3 * GiB
    return min(0.9, max(0.1, need / total))


class PeakSampler:
    """The device memory in use (``mem_get_info``, what nvidia-smi shows), sampled every 50 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / GiB


def build_case(spec: dict, topo, hf_config, model_dir: str):
    """The trainer (random-init actor, LoRA / CPU offload as the mode asks, vLLM colocated) and the
    actor's parameter counts."""
    from spmd_rlhf.models.build import build_models
    from spmd_rlhf.rollout.build import build_engine

    args = case_args(spec)
    if topo.device.type == "cuda":
        args.gpu_memory_utilization = spec["engine_share"] or engine_memory_share(spec)
    cfg = make_config(args, spec["max_tokens"], False)
    cfg.model.lora.rank = spec.get("lora_rank", 0)
    cfg.trainer.cpu_offload = spec.get("cpu_offload", False)
    cfg.data.max_prompt_length = spec["prompt_len"]
    actor = build_models(cfg, topo, hf_config).actor  # model.path unset: a seeded random init of hf_config
    cfg.model.path = model_dir  # vLLM reads the config (dummy weights; the first sync sends the actor's)
    engine = build_engine(cfg, topo, hf_config, [hf_config.eos_token_id], 1)
    params = {"params": sum(p.numel() for p in actor.parameters()),
              "trainable_params": sum(p.numel() for p in actor.parameters() if p.requires_grad)}
    return build_trainer(args, topo, hf_config, actor, engine, cfg), params


def run_case(spec: dict) -> dict:
    from spmd_rlhf.distributed.topology import init_distributed

    hf_config = qwen2_config(spec["shape"])
    hf_config.max_position_embeddings = max(4096, spec["prompt_len"] + spec["gen_len"])
    model_dir = tempfile.mkdtemp(prefix="bench_capacity_")
    hf_config.save_pretrained(model_dir)
    topo = init_distributed(1, 1, 600)
    cuda = topo.device.type == "cuda"
    sampler = PeakSampler() if cuda else None
    trainer, params = build_case(spec, topo, hf_config, model_dir)
    last = run_steps(trainer, spec["steps"], topo.device)[-1]
    out = {k: v for k, v in last.items() if k.startswith("timing/") or k == "perf/tokens_per_s_per_gpu"}
    out.update(params)
    out["tokens"] = spec["prompts"] * spec["n"] * (spec["prompt_len"] + spec["gen_len"])
    out["tokens_per_s"] = out["tokens"] / last["timing/step"]
    if cuda:
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["peak_used_gib"] = sampler.stop()
        out["device"] = torch.cuda.get_device_name()
    trainer.close()  # the engine stops while the process group is alive
    return out


def child_main(spec_json: str) -> None:
    print("CASE " + json.dumps(run_case(json.loads(spec_json))), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the plan and the driver ---------------------------------------------------------------------------


def base_spec(args) -> dict:
    return dict(engine=args.engine, prompts=args.prompts, n=args.samples, prompt_len=args.prompt_len,
                gen_len=args.gen_len, micro_batch=args.micro_batch, ac_every=1, compile=args.compile,
                steps=args.steps, max_tokens=args.max_tokens, engine_share=args.engine_share)


def shape_cases(args) -> list[dict]:
    """(shape, mode) cases, smallest shape first."""
    shapes = sorted(filter(None, args.shapes.split(",")), key=param_count)
    modes = list(filter(None, args.modes.split(",")))
    return [dict(base_spec(args), shape=s, mode=m, group=m, **MODES[m]) for s in shapes for m in modes]


def context_cases(args) -> list[dict]:
    """Response lengths for ``--context``, shortest first, with each checkpointing setting."""
    lens = sorted(int(x) for x in args.context_lens.split(","))
    return [dict(base_spec(args), shape=args.context, mode=args.context_mode, prompts=1, n=args.context_samples,
                 gen_len=length, micro_batch=1, ac_every=ac, steps=args.context_steps,
                 max_tokens=args.prompt_len + length,  # one sequence per micro-batch
                 group=f"context,ac={'on' if ac else 'off'}", **MODES[args.context_mode])
            for length in lens for ac in [int(a == "on") for a in args.context_ac.split(",")]]


def classify(rc: int, output: str) -> tuple[str, str]:
    """``fits`` and the last error line of a failed child."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln] or lines[-1:] or [""]
    oom = [ln for ln in lines if any(mark in ln for mark in OOM_MARKS)]
    if oom:
        return "oom", oom[-1][:300]
    if rc in (-9, 137) or "Signals.SIGKILL" in output:
        return "killed", f"exit {rc}: killed (host out of memory?): {errors[-1][:200]}"
    return "error", f"exit {rc}: {errors[-1][:300]}"


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers call setsid, so they leave torchrun's process group)."""
    parent = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, pp in parent.items() if pp in frontier]
        found += frontier
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM torchrun (it stops its worker), then SIGKILL whatever of the case is left."""
    tree = descendants(proc.pid)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def launch(spec: dict, timeout_s: float) -> dict:
    """One case in a fresh ``torchrun --nproc-per-node 1`` process, its output in a file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           os.path.abspath(__file__), "--child", json.dumps(spec)]
    start, timed_out = time.perf_counter(), False
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop(proc)
            timed_out = True
        log.seek(0)
        output = log.read()
    wall = time.perf_counter() - start
    for line in output.splitlines():  # a case that measured but hung in teardown still fit
        if line.startswith("CASE "):
            return {"fits": "yes", "wall_s": wall, "teardown_timed_out": timed_out, **json.loads(line[5:])}
    fits, error = ("timeout", f"over {timeout_s:.0f} s") if timed_out else classify(proc.returncode, output)
    return {"fits": fits, "error": error, "wall_s": wall, "log_tail": output[-3000:]}


def lower_bound_gib(spec: dict) -> tuple[float, float]:
    """(device, host) GiB a case needs at least: the actor's fp32 weights (+ fp32 gradients and two
    Adam moments where they train) on the device, beside vLLM's bf16 weights, or, offloaded, on the
    host, which holds the fp32 random init in any case while the model is built."""
    p = param_count(spec["shape"])
    state = 4 * p if spec.get("lora_rank") else 16 * p
    offload = spec.get("cpu_offload", False)
    return (2 * p + (0 if offload else state)) / GiB, (state if offload else 4 * p) / GiB


def memory_gib() -> tuple[float | None, float]:
    """(device, host) memory in GiB: the first GPU's as nvidia-smi reports it (None without one)."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return float(out.split()[0]) / 1024, host
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None, host


def size_of(spec: dict) -> float:
    return param_count(spec["shape"]) * (spec["prompt_len"] + spec["gen_len"])


def skip_reason(spec: dict, failed: dict, done: dict, left: float, min_case_s: float,
                memory: tuple[float | None, float] = (None, float("inf"))) -> str | None:
    """Why a case is not run: its group failed at a smaller size, its weights and optimizer state
    alone exceed the device or host memory, or the budget cannot hold it."""
    group = spec["group"]
    if group in failed and size_of(spec) >= failed[group]:
        return "skipped: failed at a smaller size"
    for need, have, where in zip(lower_bound_gib(spec), memory, ("device", "host")):
        if have is not None and need > have:
            return f"skipped: needs >= {need:.0f} GiB of {where} memory, has {have:.0f}"
    previous = done.get(group)
    estimate = min_case_s if previous is None else previous[0] * max(1.0, size_of(spec) / previous[1])
    if left < estimate:
        return f"skipped: budget ({left:.0f} s left, ~{estimate:.0f} s needed)"
    return None


def run_all(cases: list[dict], args) -> list[dict]:
    deadline = time.perf_counter() + args.budget_s
    failed: dict[str, float] = {}  # group -> smallest failing size
    done: dict[str, tuple[float, float]] = {}  # group -> (wall s, size) of its last case that fit
    results, memory = [], memory_gib()
    for spec in cases:
        left = deadline - time.perf_counter()
        reason = skip_reason(spec, failed, done, left, args.min_case_s, memory)
        result = {"fits": reason} if reason else launch(spec, min(args.case_timeout_s, left))
        if result["fits"] == "yes":
            done[spec["group"]] = (result["wall_s"], size_of(spec))
        elif not reason:
            failed[spec["group"]] = min(failed.get(spec["group"], float("inf")), size_of(spec))
        results.append({"case": spec, **result})
        save(args, results)  # after every case: a run cut short keeps what it measured
        print(f"[bench_capacity] {spec['shape']} {spec['group']} {spec['prompt_len']}+{spec['gen_len']}: "
              f"{result['fits']} {result.get('error', '')} ({result.get('wall_s', 0):.0f} s)", flush=True)
    return results


def save(args, results: list[dict], table: str | None = None) -> None:
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "args": vars(args), "results": results, "markdown": table},
                      f, indent=1, default=str)


def markdown(results: list[dict]) -> str:
    head = ("| shape | params | mode | tokens/seq | fits | " + " | ".join(p.split("/")[1] for p in PHASES)
            + " | tok/s | peak alloc GiB | peak used GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c = r["case"]
        mode = c["mode"] if c["group"] == c["mode"] else f"{c['mode']}, {c['group']}"
        fits = r["fits"] if r["fits"] == "yes" else f"{r['fits']}: {r.get('error', '')[:80]}"
        phases = " | ".join(f"{r[p]:.2f}" if p in r else "" for p in PHASES)
        figures = [(f"{r[k]:.0f}" if k == "tokens_per_s" else f"{r[k]:.1f}") if k in r else ""
                   for k in ("tokens_per_s", "peak_allocated_gib", "peak_used_gib")]
        n = param_count(c["shape"])
        lines.append(f"| {c['shape']} | {f'{n / 1e9:.2f}B' if n >= 1e8 else f'{n / 1e6:.1f}M'} | {mode} | "
                     f"{c['prompt_len']}+{c['gen_len']} | {fits} | {phases} | " + " | ".join(figures) + " |")
    return "\n".join(lines + [""] + summary(results))


def summary(results: list[dict]) -> list[str]:
    """Per mode (or context setting): the largest case that fit."""
    lines = []
    for group in dict.fromkeys(r["case"]["group"] for r in results):
        fit = [r for r in results if r["case"]["group"] == group and r["fits"] == "yes"]
        r = max(fit, key=lambda r: size_of(r["case"]), default=None)
        what = (f"{r['case']['shape']}, {r['case']['prompt_len']}+{r['case']['gen_len']} tokens, step "
                f"{r['timing/step']:.2f} s" if r else "nothing fit")
        lines.append(f"- largest that trains, {group}: {what}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1.5b,3b,7b,14b", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--modes", default="full,offload,lora", help=f"comma list of {sorted(MODES)}")
    p.add_argument("--context", default=None, help="a shape: find the longest response it trains instead")
    p.add_argument("--context-lens", default="2048,4096,8192,16384,32768")
    p.add_argument("--context-mode", default="full", choices=sorted(MODES))
    p.add_argument("--context-ac", default="on,off", help="activation checkpointing settings to try")
    p.add_argument("--context-samples", type=int, default=2)
    p.add_argument("--context-steps", type=int, default=1, help="steps per context case (decoding 32k is slow)")
    p.add_argument("--engine", default="vllm", choices=["vllm", "torch"])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=4, help="samples per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16384, help="trainer.max_tokens_per_micro_batch")
    p.add_argument("--engine-share", type=float, default=0.0,
                   help="rollout.vllm.gpu_memory_utilization; 0 = the case's bf16 weights + its KV cache x2 + 3 GiB")
    p.add_argument("--compile", type=int, default=0, help="compile decoder layers (slower first step)")
    p.add_argument("--steps", type=int, default=2, help="steps per case: warm-up(s) + the timed last one")
    p.add_argument("--budget-s", type=float, default=540.0, help="all cases (a case cut short adds <= 30 s)")
    p.add_argument("--case-timeout-s", type=float, default=400.0)
    p.add_argument("--min-case-s", type=float, default=60.0, help="a group's first case needs at least this")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = [s for s in (args.shapes.split(",") + [args.context or "tiny"]) if s and s not in SHAPES]
    unknown += [m for m in args.modes.split(",") if m and m not in MODES]
    if unknown:
        p.error(f"unknown shapes or modes {unknown}; shapes: {sorted(SHAPES)}, modes: {sorted(MODES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    cases = context_cases(args) if args.context else shape_cases(args)
    results = run_all(cases, args)
    table = markdown(results)
    save(args, results, table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
