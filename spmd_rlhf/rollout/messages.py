"""What crosses between training and generation ranks in split placement (object messages).

Training rank 0 directs the generation ranks: one ``Start`` and then one ``Control`` before the
first step and after every step. Each ``Control`` says whether weights follow (``CrossReshard``),
whether to evaluate the held-out prompts with them, how far to generate ahead and whether to stop.
Generation ranks send every training rank its groups of every batch as a ``GroupsMessage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Samples
from .groups import Rollout


@dataclass
class Start:
    """Where the run starts: the step, the loader's state and how many batches after ``step`` the
    training ranks already hold (in-flight batches restored from a checkpoint)."""

    step: int
    loader: dict
    in_flight: int
    weight_version: int


@dataclass
class Control:
    """Training rank 0 -> every generation rank, once before the first step and after each step."""

    version: int  # policy version (updates done) of the weights that follow
    weights: bool  # weights follow
    evaluate: bool  # evaluate the held-out prompts with them; tallies to training rank 0
    generate_until: int  # generate every batch below this index
    stop: bool


@dataclass
class GroupsMessage:
    """One generation rank's groups of batch ``batch`` for one training rank.

    ``order`` is the training rank's whole list of global group indices (the same from every
    generation rank), ``groups`` maps those this generation rank drew to (token ids, logprobs,
    finish reasons) of their ``n`` samples, that of the prompt's greedy response (ReMax) or None,
    and the samples' loss masks (multi-turn) or None."""

    batch: int
    version: int  # policy version of the weights that generated it
    order: list[int]
    groups: dict[int, tuple]
    metrics: dict[str, float] = field(default_factory=dict)


def share(count: int, parts: int, index: int) -> range:
    """Part ``index`` of ``parts`` near-equal contiguous parts of ``range(count)``."""
    return range(index * count // parts, (index + 1) * count // parts)


def split_groups(samples: Samples, n: int, first: int, greedy: Samples | None = None) -> dict[int, tuple]:
    """Samples (prompt-major, ``n`` per prompt; ``greedy``: one per prompt) keyed by global group
    index from ``first``: (token ids, logprobs, finish reasons, greedy response, loss masks)."""
    out = {}
    for g in range(len(samples) // n):
        rows = slice(g * n, (g + 1) * n)
        best = None if greedy is None else (greedy.token_ids[g], greedy.logprobs[g], greedy.finish_reasons[g])
        masks = None if samples.loss_masks is None else samples.loss_masks[rows]
        out[first + g] = (samples.token_ids[rows], samples.logprobs[rows], samples.finish_reasons[rows], best, masks)
    return out


def assemble(order: list[int], groups: dict[int, tuple], examples, n: int) -> tuple[Rollout, Samples | None]:
    """A training rank's rollout: its groups in ``order`` with their prompts (``examples[g]``) and
    loss masks (None when no group has any), and the greedy responses of those prompts when the
    groups carry them."""
    samples, greedy = Samples([], [], []), Samples([], [], [])
    masks: list[list[int]] = []
    masked = False
    for g in order:
        tokens, logprobs, reasons, best, *rest = groups[g]  # 4 fields: a batch checkpointed without masks
        samples.token_ids.extend(tokens)
        samples.logprobs.extend(logprobs)
        samples.finish_reasons.extend(reasons)
        group_masks = rest[0] if rest else None
        masked = masked or group_masks is not None
        masks.extend(group_masks if group_masks is not None else [[1] * len(t) for t in tokens])
        if best is not None:
            greedy.token_ids.append(best[0])
            greedy.logprobs.append(best[1])
            greedy.finish_reasons.append(best[2])
    if masked:
        samples.loss_masks = masks  # a group without masks (every token generated): all ones
    rollout = Rollout([examples[g] for g in order for _ in range(n)], samples, n)
    return rollout, (greedy if len(greedy) else None)
