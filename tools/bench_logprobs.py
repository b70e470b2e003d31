"""lm_head + per-token logprobs (+ entropy): time, peak memory and numerics of three variants.

    python tools/bench_logprobs.py                        # H200: Qwen2 0.5B/1.5B heads, bf16
    python tools/bench_logprobs.py --device cpu --tiny    # smoke run of every code path

Variants, on N response tokens of random bf16 hidden states and a random bf16 [V, H] weight:
  dense     today's actor path: full [N, V] logits, ``.float() / T``, logprobs_from_logits,
            entropy_from_logits
  chunked   spmd_rlhf.models.logprobs.chunked_logprobs at several chunk sizes
  liger     liger-kernel's fused linear cross-entropy, reduction="none" (= -logprob per token;
            no entropy, T applied as hidden / T), only when liger_kernel imports
Each runs with the entropy detached (entropy_coef = 0) and with its gradient (liger: detached
only), is timed forward+backward and forward-only under no_grad (median of CUDA events), with the
peak memory above the inputs, and compared with an fp32 full-vocabulary reference (logprob/entropy max abs error, gradient
relative error). Prints one JSON line per variant, then a table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from spmd_rlhf.algorithms.losses import entropy_from_logits, logprobs_from_logits  # noqa: E402
from spmd_rlhf.models.logprobs import chunked_logprobs  # noqa: E402

SHAPES = {"qwen2-0.5b": (896, 151936), "qwen2-1.5b": (1536, 151936)}
TINY_SHAPES = {"tiny": (64, 1000)}


def dense(h_NH, w_VH, t_N, temperature, entropy_grad):
    """Today's path: [N, V] logits in the input dtype, then fp32 / T (as actor.token_logits)."""
    logits_1NV = (h_NH @ w_VH.T)[None].float() / temperature
    lp_N = logprobs_from_logits(logits_1NV, t_N[None])[0]
    return lp_N, entropy_from_logits(logits_1NV if entropy_grad else logits_1NV.detach())[0]


def chunked(chunk):
    def run(h_NH, w_VH, t_N, temperature, entropy_grad):
        return chunked_logprobs(h_NH, w_VH, t_N, temperature, chunk, True, entropy_grad)
    return run


def liger():
    """liger's fused linear CE with per-token losses, or None when liger_kernel is not importable."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as flce
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        print(f"# liger_kernel unavailable: {type(err).__name__}: {err}")
        return None
    extra = {"accum_dtype": torch.float32} if "accum_dtype" in inspect.signature(flce).parameters else {}

    def run(h_NH, w_VH, t_N, temperature, entropy_grad):
        return -flce(h_NH / temperature, w_VH, t_N, reduction="none", **extra).float(), None
    return run


def inputs(num, hidden, vocab, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    h_NH = torch.randn(num, hidden, generator=gen).to(device, dtype).requires_grad_()
    w_VH = (torch.randn(vocab, hidden, generator=gen) * hidden ** -0.5 * 4).to(device, dtype).requires_grad_()
    t_N = torch.randint(0, vocab, (num,), generator=gen).to(device)
    a_N, b_N = torch.randn(2, num, generator=gen).to(device)
    return h_NH, w_VH, t_N, a_N, b_N


def step(fn, h_NH, w_VH, t_N, a_N, b_N, temperature, entropy_grad):
    """Forward, the loss sum(a * logprob) [+ sum(b * entropy)], backward; returns outputs and grads."""
    h_NH.grad = w_VH.grad = None
    lp_N, ent_N = fn(h_NH, w_VH, t_N, temperature, entropy_grad)
    loss = (a_N * lp_N).sum()
    if entropy_grad and ent_N is not None:
        loss = loss + (b_N * ent_N).sum()
    loss.backward()
    return lp_N.detach(), (None if ent_N is None else ent_N.detach()), h_NH.grad, w_VH.grad


def reference(h_NH, w_VH, t_N, a_N, b_N, temperature, entropy_grad, rows=2048):
    """fp32 full-vocabulary truth (TF32 off) on fp32 copies of the inputs, by the dense path on
    ``rows`` tokens at a time (the loss is a sum over tokens, so the accumulated grads are exact)."""
    h32, w32 = (x.detach().float().requires_grad_() for x in (h_NH, w_VH))
    lps, ents = [], []
    for start in range(0, h_NH.shape[0], rows):
        part = slice(start, start + rows)
        lp, ent = dense(h32[part], w32, t_N[part], temperature, entropy_grad)
        loss = (a_N[part] * lp).sum() + ((b_N[part] * ent).sum() if entropy_grad else 0.0)
        loss.backward()
        lps.append(lp.detach())
        ents.append(ent.detach())
    return torch.cat(lps), torch.cat(ents), h32.grad, w32.grad.cpu()


def errors(got, want):
    rel = lambda g, r: float((g.float() - r.to(g.device)).norm() / r.norm())  # noqa: E731
    out = {"lp_max_abs_err": float((got[0] - want[0]).abs().max()), "lp_max": float(got[0].max())}
    out["ent_max_abs_err"] = None if got[1] is None else float((got[1] - want[1]).abs().max())
    out["grad_h_rel_err"], out["grad_w_rel_err"] = rel(got[2], want[2]), rel(got[3], want[3])
    return out


def timed(work, device, iters, warmup):
    """Median ms of ``work()`` and its peak GiB above what was allocated before (CUDA only)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        work()
    times = []
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(iters):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            work()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            work()
            times.append(1e3 * (time.perf_counter() - start))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
    return statistics.median(times), peak


def measure(fn, h, w, t, a, b, temperature, entropy_grad, device, opts):
    """fwd+bwd time and peak, then the forward alone under no_grad (scoring passes; entropy included)."""
    def train():
        step(fn, h, w, t, a, b, temperature, entropy_grad)
        h.grad = w.grad = None  # no gradient outlives the step: the peak is the step's own

    @torch.no_grad()
    def score():
        fn(h, w, t, temperature, False)

    row = dict(zip(("ms_fwd_bwd", "peak_GiB"), timed(train, device, opts.iters, opts.warmup)))
    row["ms_fwd_nograd"], row["peak_GiB_nograd"] = timed(score, device, opts.iters, opts.warmup)
    return row


def run_case(name, hidden, vocab, num, variants, opts, device):
    h, w, t, a, b = inputs(num, hidden, vocab, device, torch.bfloat16)
    rows = []
    for entropy_grad in (False, True):
        want = reference(h, w, t, a, b, opts.temperature, entropy_grad)
        for label, fn in variants:
            if label == "liger" and entropy_grad:
                continue  # no entropy in liger's fused CE
            try:
                got = step(fn, h, w, t, a, b, opts.temperature, entropy_grad)
                row = {"shape": name, "H": hidden, "V": vocab, "N": num, "variant": label,
                       "entropy_grad": entropy_grad, **errors(got, want)}
                del got
                h.grad = w.grad = None
                row.update(measure(fn, h, w, t, a, b, opts.temperature, entropy_grad, device, opts))
            except Exception as err:  # noqa: BLE001 - an OOM or a kernel failure ends the variant, not the run
                row = {"shape": name, "N": num, "variant": label, "entropy_grad": entropy_grad,
                       "error": f"{type(err).__name__}: {str(err)[:100]}"}
                h.grad = w.grad = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(json.dumps(row), flush=True)
            rows.append(row)
        del want
    return rows


def table(rows):
    print(f"\n{'shape':<11}{'N':>6} {'variant':<14}{'ent_grad':>9}{'ms':>10}{'peak GiB':>10}{'ms nograd':>10}"
          f"{'lp err':>10}{'ent err':>10}{'dh rel':>10}{'dW rel':>10}")
    fmt = lambda v, f: f"{'-':>10}" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"{r['shape']:<11}{r['N']:>6} {r['variant']:<14}{str(r['entropy_grad']):>9}"
              f"{fmt(r.get('ms_fwd_bwd'), '10.2f')}{fmt(r.get('peak_GiB'), '10.3f')}{fmt(r.get('ms_fwd_nograd'), '10.2f')}"
              f"{fmt(r.get('lp_max_abs_err'), '10.2e')}{fmt(r.get('ent_max_abs_err'), '10.2e')}"
              f"{fmt(r.get('grad_h_rel_err'), '10.2e')}{fmt(r.get('grad_w_rel_err'), '10.2e')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run, e.g. on the CPU)")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="N values (default 8*512 32*512)")
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="chunk_tokens values")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    opts = parser.parse_args()
    device = torch.device(opts.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
    shapes = TINY_SHAPES if opts.tiny else SHAPES
    tokens = opts.tokens or ([64, 200] if opts.tiny else [8 * 512, 32 * 512])
    chunks = opts.chunks or ([32, 128] if opts.tiny else [1024, 2048, 4096, 8192])
    variants = [("dense", dense)] + [(f"chunked-{c}", chunked(c)) for c in chunks]
    liger_fn = liger() if device.type == "cuda" else None  # liger's kernels are Triton (GPU) only
    variants += [("liger", liger_fn)] if liger_fn is not None else []
    rows = []
    for name, (hidden, vocab) in shapes.items():
        for num in tokens:
            rows += run_case(name, hidden, vocab, num, variants, opts, device)
    table(rows)


if __name__ == "__main__":
    main()
