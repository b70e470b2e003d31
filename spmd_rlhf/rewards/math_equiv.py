"""Math answers checked by equivalence with math-verify (``\\frac{1}{2}`` = ``0.5`` = ``1/2``, ``\\boxed{}``,
intervals, sets, matrices), for the math data sources (GSM8K keeps its numeric rule in ``math.py``).

math-verify runs in a sandbox worker: its own timeouts rely on SIGALRM, which cannot interrupt a long
computation inside C (``9^{9^{9^9}}`` expands a huge integer) and which would clobber the scorer's own
alarm. The pool kills the worker instead once ``RewardContext.math_timeout_s`` passes; the row scores 0
and counts as a reward timeout.
"""

from __future__ import annotations

import logging

from ..sandbox import Call, Outcome, SandboxPool, Status
from .registry import register_sandboxed_reward
from .sandboxed import RewardContext, RewardPlan, RewardTimedOut

MATH_SOURCES = (
    "math", "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500",
    "math_dapo", "math_dapo_reasoning", "aime24", "aime25", "aime2024", "aime2025", "AI-MO/aimo-validation-aime",
    "numina_aops_forum", "numina_synthetic_math", "numina_amc_aime", "numina_synthetic_amc", "numina_cn_k12",
    "numina_olympiads", "agentica-org/DeepScaleR-Preview-Dataset", "open-r1/OpenR1-Math-220k",
)
CHECK_TARGET = "spmd_rlhf.rewards.math_equiv:check"
PRELOAD = ("math_verify",)


def check(solution_str: str, ground_truth: str) -> bool:
    """Whether the answer in ``solution_str`` equals ``ground_truth`` (math-verify, no time limit: run it
    where it can be killed, as the scorer does).

    The ground truth is read as LaTeX (wrapped in ``\\boxed{}`` unless it has one); the answer is the last
    ``\\boxed{}`` or else the final LaTeX or plain expression of the completion.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    for name in ("math_verify", "latex2sympy2_extended"):  # "timeout is disabled" on every call
        logging.getLogger(name).setLevel(logging.ERROR)
    truth = ground_truth.strip()
    boxed = truth if "\\boxed" in truth else f"\\boxed{{{truth}}}"
    gold = parse(boxed, [LatexExtractionConfig()], parsing_timeout=None) or parse(
        truth, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    if not gold:
        return False
    answer = parse(solution_str, parsing_timeout=None)
    return bool(answer) and bool(verify(gold, answer, timeout_seconds=None))


def is_equivalent(solution_str: str, ground_truth: str, pool: SandboxPool, timeout_s: float = 5.0) -> bool:
    """``check`` in ``pool`` (best made with ``preload=PRELOAD``), False when it fails or overruns."""
    outcome = pool.call(CHECK_TARGET, {"solution_str": solution_str, "ground_truth": ground_truth}, timeout_s)
    return outcome.ok and outcome.value is True


def plan_math_reward(solution_str: str, ground_truth: str, extra_info: dict | None, ctx: RewardContext) -> RewardPlan:
    """One sandboxed ``check`` call; 1.0 when equivalent, else 0.0 (RewardTimedOut past the time limit)."""
    del extra_info  # part of the reward signature; unused
    job = Call(CHECK_TARGET, {"solution_str": solution_str, "ground_truth": str(ground_truth)}, ctx.math_timeout_s,
               preload=PRELOAD)

    def finish(outcomes: list[Outcome]) -> float:
        (outcome,) = outcomes
        if outcome.status is Status.TIMEOUT:
            raise RewardTimedOut(f"math-verify ran past {ctx.math_timeout_s} s")
        if not outcome.ok:
            raise RuntimeError(f"math-verify failed ({outcome.status.value}): {outcome.stderr[-500:]}")
        return 1.0 if outcome.value is True else 0.0

    return RewardPlan([job], finish)


register_sandboxed_reward(*MATH_SOURCES)(plan_math_reward)
