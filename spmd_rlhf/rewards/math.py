"""GSM8K-style rule reward: extract the final numeric answer and compare it to the ground truth."""

from __future__ import annotations

import re

from spmd_rlhf.rewards.registry import register_reward

# A number as it appears in model output: optional sign and "$", thousands separators or plain
# digits, optional decimals. Trailing "." / "%" are left outside the match.
_NUMBER = r"[-+]?\$?[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\$?[-+]?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(r"####\s*(" + _NUMBER + r")")
_BOXED = "\\boxed{"
_PLAIN_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRACTION_RE = re.compile(r"([-+]?\d+(?:\.\d+)?)\s*/\s*([-+]?\d+(?:\.\d+)?)")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None if there is none."""
    start = text.rfind(_BOXED)
    while start != -1:
        depth, i = 1, start + len(_BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len(_BOXED) : i - 1].strip()
        start = text.rfind(_BOXED, 0, start)  # unbalanced: try an earlier one
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``.

    Priority: the last ``#### <number>``, else the last ``\\boxed{...}`` content, else the last
    number anywhere in the text. Returns None when none of these is present.
    """
    strict = _STRICT_RE.findall(text)
    if strict:
        return strict[-1]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _clean(s: str) -> str:
    """Strip currency, separators, TeX escapes and trailing punctuation from a number string."""
    s = s.strip().replace("\\$", "").replace("\\%", "%").replace("\\!", "")
    s = s.replace("$", "").replace(",", "").replace(" ", "")
    s = s.replace("\u2212", "-")  # unicode minus
    while s and s[-1] in ".%":
        s = s[:-1]
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        s = s[1:-1]
    return s


def parse_number(s: str) -> float | None:
    """Parse ``s`` as a number (``-1,234.5``, ``$18``, ``50%``, ``3/4``); None when it is not one."""
    s = _clean(s)
    if _PLAIN_NUMBER_RE.fullmatch(s):
        return float(s)
    frac = _FRACTION_RE.fullmatch(s)
    if frac:
        denominator = float(frac.group(2))
        if denominator != 0.0:
            return float(frac.group(1)) / denominator
    return None


@register_reward("gsm8k", "openai/gsm8k", "arithmetic")
def compute_score(solution_str: str, ground_truth: str, extra_info: dict | None = None) -> float:
    """1.0 if the answer extracted from ``solution_str`` equals ``ground_truth``, else 0.0.

    Numbers compare with tolerance ``1e-6 * max(1, |ground_truth|)``; when neither side parses as a
    number the stripped strings are compared.
    """
    del extra_info  # part of the reward signature; unused by this rule
    answer = extract_answer(solution_str)
    if answer is None:
        return 0.0
    predicted, expected = parse_number(answer), parse_number(str(ground_truth))
    if predicted is not None and expected is not None:
        return 1.0 if abs(predicted - expected) <= 1e-6 * max(1.0, abs(expected)) else 0.0
    if predicted is None and expected is None:
        return 1.0 if answer.strip() == str(ground_truth).strip() else 0.0
    return 0.0
