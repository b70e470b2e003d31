"""The embedded default task: multi-digit addition, with a tokenizer and a tiny model made in code.

Prompts are zero-padded to a fixed width, ``"07+48="``, and so is the answer, ``"055"``, followed
by EOS: fixed digit positions are what lets a tiny transformer learn addition in seconds. The warm start learns from a
*sloppy teacher*: with probability ``carry_drop_prob`` a demonstration forgets every carry
(``38+45=073``). Supervised learning copies that mix, so the warm-started policy puts real mass on
both answers and greedy decoding is often wrong on problems that carry. The rule reward knows the
true sum, so RL has a clear, verifiable signal to remove the mistake: a visible before/after gap in
minutes on a laptop CPU, with nothing downloaded.

The ``tools`` style (``recipe=tiny_arithmetic_tools``) keeps the padded prompts and lets the model
call a calculator: the tokenizer gets whole tokens for the Qwen/Hermes tool-call markup and a chat
template that renders tool messages as ``<tool_response>985</tool_response>``, and a share of the
warm-start demonstrations (``tool_demo_fraction``) call the calculator and copy its answer::

    437+548=<tool_call>{"name": "calculator", "arguments": {"expression": "437+548"}}</tool_call>
            <tool_response>985</tool_response>985                  (one line, no spaces between)

the rest answer directly from the sloppy teacher. Calling is then the reliable way to be right,
which RL can discover from the reward alone.

Rows follow verl's format (``prompt`` string, ``data_source``, ``reward_model.ground_truth``) so
the embedded task takes exactly the same path through the trainer as a dataset on disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DATA_SOURCE = "arithmetic"
_SPECIALS = ["<pad>", "<eos>", "<unk>"]
_CHARS = list("0123456789+=")


CALL_PREFIX = '{"name": "calculator", "arguments": {"expression": "'
CALL_SUFFIX = '"}}'
# the tools style's extra tokens: the tool-call markup as whole tokens (as a real tokenizer has them)
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", CALL_PREFIX, CALL_SUFFIX]
# user and assistant text as it is (the prompts stay "07+48="); a tool message as <tool_response>...</tool_response>
TOOL_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}<tool_response>{{ m['content'] }}</tool_response>"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def build_tokenizer(tools: bool = False):
    """A character-level ``PreTrainedTokenizerFast``: digits, ``+``, ``=``, pad, eos; with ``tools``
    also the tool-call markup (``TOOL_TOKENS``) and a chat template for tool messages."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + _CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    if tools:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
        tokenizer.chat_template = TOOL_CHAT_TEMPLATE
    return tokenizer


def tool_demonstration(expression: str, value: int) -> str:
    """The answer of a demonstration that calls the calculator on ``expression`` and copies its result."""
    return (f"<tool_call>{CALL_PREFIX}{expression}{CALL_SUFFIX}</tool_call>"
            f"<tool_response>{value}</tool_response>{value}")


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
    style: str = "padded"  # "padded": "07+48=" for the tiny model; "chat": a question for chat models; "tools"
    tool_demo_fraction: float = 0.3  # tools style: share of demonstrations that call the calculator

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
        assert self.style in ("padded", "tools"), f"unknown arithmetic style {self.style!r}"
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
            if self.style == "tools" and rng.random() < self.tool_demo_fraction:
                prompt = self.prompt(a, b)
                demos.append((prompt, tool_demonstration(prompt.rstrip("="), a + b)))
                continue
            answer = add_without_carry(a, b) if rng.random() < self.carry_drop_prob else a + b
            demos.append((self.prompt(a, b), self.answer(answer)))
        return demos
