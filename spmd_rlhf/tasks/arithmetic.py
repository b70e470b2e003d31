"""The embedded default task: multi-digit addition, with a tokenizer and a tiny model made in code.

Prompts are zero-padded to a fixed width, ``"07+48="``, and so is the answer, ``"055"``, followed
by EOS: fixed digit positions are what lets a tiny transformer learn addition in seconds. The warm start learns from a
*sloppy teacher*: with probability ``carry_drop_prob`` a demonstration forgets every carry
(``38+45=073``). Supervised learning copies that mix, so the warm-started policy puts real mass on
both answers and greedy decoding is often wrong on problems that carry. The rule reward knows the
true sum, so RL has a clear, verifiable signal to remove the mistake: a visible before/after gap in
minutes on a laptop CPU, with nothing downloaded.

Rows follow verl's format (``prompt`` string, ``data_source``, ``reward_model.ground_truth``) so
the embedded task takes exactly the same path through the trainer as a dataset on disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DATA_SOURCE = "arithmetic"
_SPECIALS = ["<pad>", "<eos>", "<unk>"]
_CHARS = list("0123456789+=")


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: digits, ``+``, ``=``, pad, eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model_config(vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, pad_token_id: int, eos_token_id: int):
    """A tiny Qwen2-architecture causal LM config (q/k/v biases, GQA-capable, RoPE)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
        use_sliding_window=False,
    )


def add_without_carry(a: int, b: int) -> int:
    """Digit-wise sum modulo 10: the sloppy teacher's answer (``38+45 -> 73``)."""
    result, place = 0, 1
    while a or b:
        result += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return result


@dataclass(frozen=True)
class AdditionTask:
    """Problems ``a+b=`` with ``a, b`` of up to ``digits`` digits, split into train and held out."""

    digits: int = 2
    num_val: int = 256
    carry_drop_prob: float = 0.5
    seed: int = 0
    style: str = "padded"  # "padded": "07+48=" for the tiny model; "chat": a question for chat models

    def _all_pairs(self) -> list[tuple[int, int]]:
        top = 10**self.digits
        if self.digits <= 2:
            pairs = [(a, b) for a in range(top) for b in range(top)]
            random.Random(self.seed).shuffle(pairs)
            return pairs
        rng = random.Random(self.seed)  # too many pairs to list: sample 20k distinct ones
        low = 10 ** (self.digits - 1)
        pairs = list(dict.fromkeys((rng.randrange(low, top), rng.randrange(low, top)) for _ in range(20_000)))
        return pairs

    def split(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        pairs = self._all_pairs()
        assert self.num_val < len(pairs), "held-out set must leave training problems"
        return pairs[self.num_val :], pairs[: self.num_val]

    def prompt(self, a: int, b: int) -> str | list[dict]:
        if self.style == "chat":
            return [{"role": "user", "content": f"What is {a} + {b}? Answer with only the final number."}]
        assert self.style == "padded", f"unknown arithmetic style {self.style!r}"
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}="

    def answer(self, value: int) -> str:
        return f"{value:0{self.digits + 1}d}"

    def row(self, a: int, b: int, index: int) -> dict:
        return {
            "prompt": self.prompt(a, b),
            "data_source": DATA_SOURCE,
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"index": index},
        }

    def rows(self) -> tuple[list[dict], list[dict]]:
        """verl-format rows: (train, held out)."""
        train, val = self.split()
        return [self.row(a, b, i) for i, (a, b) in enumerate(train)], [self.row(a, b, i) for i, (a, b) in enumerate(val)]

    def demonstrations(self, count: int, seed: int) -> list[tuple[str, str]]:
        """``count`` (prompt, answer) pairs from the sloppy teacher, drawn from the train split."""
        train, _ = self.split()
        rng = random.Random(seed)
        demos = []
        for _ in range(count):
            a, b = train[rng.randrange(len(train))]
            answer = add_without_carry(a, b) if rng.random() < self.carry_drop_prob else a + b
            demos.append((self.prompt(a, b), self.answer(answer)))
        return demos
