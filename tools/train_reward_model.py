"""Train a tiny Bradley-Terry reward model for the embedded arithmetic task, in code, on the CPU.

Usage::

    python tools/train_reward_model.py OUT_DIR [--steps 300] [--seed 0] [--hidden-size 64]
        [--num-layers 2] [--num-heads 2] [--negatives carry[,small]]

Each training pair shares a prompt of the train split (``"38+45="``): chosen = the correct answer
+ EOS (``083``), rejected = a wrong answer + EOS. Kinds of wrong answers (``--negatives``):

* ``carry`` (default): the carry-dropped sum of the embedded task's sloppy teacher
  (``add_without_carry``: ``073``), on the problems where it differs. These are the mistakes the
  warm-started policy makes, so this is the preference RL needs; the model learns it in seconds
  (held-out pairwise accuracy 0.98 / 1.00 / 0.94 for seeds 0 / 1 / 2 at the defaults).
* ``small``: the sum off by 1, 2 or 10. Ranking these needs an exact check of every digit, which
  the default 2-layer model does not learn in this budget (held-out accuracy stays near 0.5, also
  when trained on them); it is reported for every run so that the limit is visible.

The loss is Bradley-Terry's (Ouyang et al., 2022): ``-log sigmoid(r(chosen) - r(rejected))``, r
being the one-label head at the last token (EOS). All rows have the same length, so there is no
padding. The model is ``AutoModelForSequenceClassification`` on the task's tiny Qwen2 config; the
output directory (config.json with ``pad_token_id``, model.safetensors, the tokenizer) loads with
``spmd_rlhf.models.heads.load_reward_model``. Prints and returns held-out pairwise accuracies: the
fraction of pairs, on problems never trained on, whose correct answer scores higher.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spmd_rlhf.tasks.arithmetic import AdditionTask, add_without_carry, build_tokenizer, tiny_model_config  # noqa: E402

SMALL_ERRORS = (-10, -2, -1, 1, 2, 10)
NEGATIVES = ("carry", "small")


def wrong_answer(kind: str, a: int, b: int, rng: random.Random, digits: int) -> int:
    """``carry``: the sloppy teacher's carry-dropped sum; ``small``: the sum off by a little."""
    if kind == "carry":
        return add_without_carry(a, b)
    assert kind == "small", kind
    while True:
        wrong = a + b + rng.choice(SMALL_ERRORS)
        if 0 <= wrong < 10 ** (digits + 1):
            return wrong


def eligible(kind: str, problems: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Problems with a wrong answer of this kind (a carry-dropped sum differs only if a carry exists)."""
    return [(a, b) for a, b in problems if kind != "carry" or add_without_carry(a, b) != a + b]


def pair_tensors(rows: list[tuple[str, int, int]], task: AdditionTask, tokenizer, rng: random.Random) -> torch.Tensor:
    """Token ids ``[2, N, L]`` of (kind, a, b) rows: chosen rows, then rejected (prompt + answer + EOS)."""
    def encode(a: int, b: int, answer: int) -> list[int]:
        text = task.prompt(a, b) + task.answer(answer)
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    chosen = [encode(a, b, a + b) for _, a, b in rows]
    rejected = [encode(a, b, wrong_answer(kind, a, b, rng, task.digits)) for kind, a, b in rows]
    return torch.tensor([chosen, rejected], dtype=torch.long)


def reward_at_last_token(model: torch.nn.Module, ids_NL: torch.Tensor) -> torch.Tensor:
    """The head at the last position of unpadded rows ``[N]``."""
    return model(input_ids=ids_NL).logits[:, 0]


@torch.no_grad()
def pairwise_accuracy(model: torch.nn.Module, pairs_2NL: torch.Tensor) -> float:
    """Fraction of pairs whose chosen row scores strictly higher."""
    model.eval()
    margin_N = reward_at_last_token(model, pairs_2NL[0]) - reward_at_last_token(model, pairs_2NL[1])
    model.train()
    return float((margin_N > 0).float().mean())


def train_reward_model(out_dir: str, steps: int = 300, seed: int = 0, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 2, negatives: tuple[str, ...] = ("carry",), batch_size: int = 64,
                       lr: float = 3e-3) -> dict:
    """Train on ``negatives`` kinds, save to ``out_dir``; return held-out pairwise accuracies.

    ``heldout_pairwise_accuracy`` is over the held-out pairs of the trained kinds; the accuracy on
    every kind (trained or not) is reported as ``heldout_accuracy/<kind>``.
    """
    unknown = set(negatives) - set(NEGATIVES)
    if not negatives or unknown:
        raise ValueError(f"--negatives {','.join(negatives)}: choose one or more of {NEGATIVES}, comma-separated")
    if steps < 1:
        raise ValueError(f"--steps {steps}: train for at least one step")
    task = AdditionTask(seed=seed)
    tokenizer = build_tokenizer()
    train, heldout = task.split()
    pools = {kind: eligible(kind, train) for kind in negatives}
    model = _new_model(tokenizer, seed, hidden_size, num_layers, num_heads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup_then_linear = lambda step: min(1.0, (step + 1) / 20) * (1 - step / steps)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear)
    rng, losses = random.Random(seed), []
    for _ in range(steps):
        rows = [(kind, *rng.choice(pools[kind])) for kind in (rng.choice(negatives) for _ in range(batch_size))]
        rewards_2N = reward_at_last_token(model, pair_tensors(rows, task, tokenizer, rng).flatten(0, 1))
        rewards_2N = rewards_2N.view(2, batch_size)
        loss = -F.logsigmoid(rewards_2N[0] - rewards_2N[1]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    result = _heldout_accuracies(model, task, tokenizer, heldout, negatives, seed)
    result.update(train_loss_first=losses[0] if losses else float("nan"),
                  train_loss_last=sum(losses[-20:]) / max(1, len(losses[-20:])), steps=steps)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return result


def _new_model(tokenizer, seed: int, hidden_size: int, num_layers: int, num_heads: int) -> torch.nn.Module:
    config = tiny_model_config(len(tokenizer), hidden_size, num_layers, num_heads,
                               tokenizer.pad_token_id, tokenizer.eos_token_id)
    config.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _heldout_accuracies(model, task, tokenizer, heldout, negatives, seed: int) -> dict:
    result, correct, total = {}, 0.0, 0
    for kind in NEGATIVES:
        rows = [(kind, a, b) for a, b in eligible(kind, heldout)]
        accuracy = pairwise_accuracy(model, pair_tensors(rows, task, tokenizer, random.Random(seed + 1)))
        result[f"heldout_accuracy/{kind}"] = accuracy
        result[f"heldout_pairs/{kind}"] = len(rows)
        if kind in negatives:
            correct, total = correct + accuracy * len(rows), total + len(rows)
    result["heldout_pairwise_accuracy"] = correct / total
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=2)
    parser.add_argument("--negatives", default="carry", help=f"comma-separated kinds of wrong answers: {NEGATIVES}")
    args = parser.parse_args(argv)
    result = train_reward_model(args.out_dir, args.steps, args.seed, args.hidden_size, args.num_layers, args.num_heads,
                                tuple(args.negatives.split(",")))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
