"""Multi-turn rollouts with tool calls: generate, run the tools the policy called, append their
results as tool messages, generate again.

A turn is one ``engine.generate`` over every sample still going (prompt + its response so far, as
token ids), so the engine batches them and vLLM's prefix cache reuses the earlier turns. A turn
ends at the close of a tool call (``</tool_call>``) or EOS. The engines stop a row at the token ids
that spell the close in common contexts (``SamplingConfig.stop_sequences``; vLLM, which has no
tokenizer, only where the close is one token); a close spelled otherwise is found after generation
and the turn is truncated right after it: the tokens kept are exactly what a stop there would have
given (sampling is causal), the rest is discarded. The call
(``rollout/tools.py``) runs with every other call of the turn; its result is rendered through the
tokenizer's chat template as a tool message, and only the tokens after the assistant's text (end of
the assistant turn, the tool message, the next assistant header) are appended. A sample ends with
an answer (a turn without a tool call), after ``rollout.multi_turn.max_turns`` turns, or at
``rollout.max_new_tokens`` response tokens, tool messages included; a tool message that would not
leave room for one more generated token is not appended, so a response always ends with a token
the policy generated.

Per sample: the whole response (generated + inserted tokens), logprobs aligned with it (0 on
inserted tokens), ``loss_masks`` (1 generated, 0 inserted), and ``"stop"`` (answered with EOS) or
``"length"`` (budget or turn limit). Turn 0 is the single-turn call itself (same seeds); later
turns draw each sample from its own stream, keyed by (prompt index, sample, turn). With tensor
parallelism every rank of a replica must make the same engine calls, so with ``lockstep`` every
rank runs all ``max_turns`` calls (empty ones once its samples are done) with the whole budget.
"""

from __future__ import annotations

import atexit
import dataclasses
from dataclasses import dataclass, field

from ..config import Config, ConfigError
from ..config.schema import MultiTurnConfig
from ..data.datasets import PromptExample
from ..data.vision import VisionInputs
from .base import RolloutEngine, SamplingConfig, Samples, sample_seeds
from .toolbox import SandboxTools, build_toolbox
from .tools import CALL_CLOSE, CALL_OPEN, ERROR, TIMEOUT, ToolBox, ToolCall, ToolSettings, parse_tool_call

_ASSISTANT_END = "SPMDRLHFASSISTANTTURNEND"  # stands for the assistant's text when rendering a tool message
_TURN_SEED_SALT = 0x7001


@dataclass
class _Row:
    """One sample being generated."""

    prompt: list[int]
    key: int  # identifies the sample independently of batching: prompt index * n + sample
    allowed: dict[str, dict]  # tools this row may call -> their create_kwargs
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    finish: str | None = None
    turns: int = 0
    calls: int = 0
    errors: int = 0
    timeouts: int = 0


def render_tool_message(tokenizer, content: str) -> list[int]:
    """Token ids that follow the assistant's text when a tool message answers it: the end of the
    assistant turn, the tool message and the next assistant header, as the chat template writes them."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": _ASSISTANT_END},
                {"role": "tool", "content": content}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    head, sep, tail = text.partition(_ASSISTANT_END)
    assert sep, "the chat template dropped the assistant's text"
    return list(tokenizer(tail, add_special_tokens=False).input_ids)


def close_sequences(tokenizer) -> tuple[tuple[int, ...], ...]:
    """Token-id sequences whose text ends with ``</tool_call>``: the shortest tail of the close as the
    tokenizer spells it after nothing, a newline, a brace or a space (a BPE merge may take those in)."""
    found: list[tuple[int, ...]] = []
    for before in ("", "\n", "}", "}\n", " ", '"}'):
        ids = list(tokenizer(before + CALL_CLOSE, add_special_tokens=False).input_ids)
        tail = next((tuple(ids[-k:]) for k in range(1, len(ids) + 1)
                     if tokenizer.decode(ids[-k:]).endswith(CALL_CLOSE)), None)
        if tail is not None and tail not in found:
            found.append(tail)
    return tuple(found)


def check_chat_template(tokenizer) -> None:
    """``ConfigError`` unless the tokenizer's chat template renders a tool message."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("rollout.multi_turn.enable=true needs a tokenizer with a chat template (tool results go "
                          "back as tool messages); set model.tokenizer_path to one, or rollout.multi_turn.enable=false")
    probe = "417"
    try:
        ids = render_tool_message(tokenizer, probe)
    except Exception as exc:  # noqa: BLE001 (a template that raises on role "tool")
        raise ConfigError(f"rollout.multi_turn.enable=true: the tokenizer's chat template cannot render a tool "
                          f"message ({exc}); set model.tokenizer_path to a tokenizer whose template knows role "
                          "'tool'") from exc
    if probe not in tokenizer.decode(ids):
        raise ConfigError("rollout.multi_turn.enable=true: the tokenizer's chat template drops tool messages; set "
                          "model.tokenizer_path to a tokenizer whose template knows role 'tool'")


class MultiTurn:
    """Multi-turn tool-use generation for one run (see the module docstring); ``close`` ends the
    tools' sandbox."""

    def __init__(self, cfg: MultiTurnConfig, tokenizer, lockstep: bool = False):
        check_chat_template(tokenizer)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.lockstep = lockstep
        self.toolbox: ToolBox
        self.sandbox: SandboxTools
        self.toolbox, self.sandbox = build_toolbox(list(cfg.tools), ToolSettings(timeout_s=cfg.tool_timeout_s))
        self.close_ids = list(tokenizer(CALL_CLOSE, add_special_tokens=False).input_ids)
        self.stop_sequences = close_sequences(tokenizer)

    def close(self) -> None:
        self.sandbox.close()

    def generate(self, engine: RolloutEngine, examples: list[PromptExample],
                 sampling: SamplingConfig) -> tuple[Samples, dict[str, float]]:
        """``sampling.n`` multi-turn samples per example, prompt-major, and the ``rollout/*`` tool metrics."""
        n = sampling.n
        sampling = dataclasses.replace(sampling, stop_sequences=sampling.stop_sequences + self.stop_sequences)
        rows = [_Row(e.prompt_ids, e.index * n + j, self.toolbox.allowed(e.extra_info)) for e in examples
                for j in range(n)]
        first = engine.generate([e.prompt_ids for e in examples], sampling, seeds=[e.index for e in examples])
        self._take_turn(rows, first, sampling.max_new_tokens)
        for turn in range(1, self.cfg.max_turns):
            active = [r for r in rows if r.finish is None]
            if not active and not self.lockstep:
                break
            budget = sampling.max_new_tokens  # lockstep: the tp ranks of a replica must make the same call
            if not self.lockstep:  # the most any sample still going may generate; each is cut at its own
                budget = max(sampling.max_new_tokens - len(r.tokens) for r in active)
            turn_sampling = dataclasses.replace(sampling, n=1, max_new_tokens=budget,
                                                seed=sample_seeds(sampling.seed, [_TURN_SEED_SALT], turn)[-1])
            out = engine.generate([r.prompt + r.tokens for r in active], turn_sampling, seeds=[r.key for r in active])
            self._take_turn(active, out, sampling.max_new_tokens)
        for row in rows:
            if row.finish is None:  # its last turn called a tool: max_turns reached
                row.finish = "length"
        samples = Samples([r.tokens for r in rows], [r.logprobs for r in rows], [r.finish for r in rows],
                          [r.mask for r in rows])
        return samples, tool_metrics(rows)

    def _take_turn(self, rows: list[_Row], out: Samples, max_new_tokens: int) -> None:
        """Append each row's generated tokens; run the tool calls; append their messages."""
        assert len(out) == len(rows)
        pending: list[_Row] = []
        calls = []
        for row, tokens, logprobs, reason in zip(rows, out.token_ids, out.logprobs, out.finish_reasons):
            end = self.call_end(tokens)
            room = max_new_tokens - len(row.tokens)
            kept = tokens[:room] if end is None else tokens[:min(end, room)]
            row.tokens += kept
            row.logprobs += logprobs[:len(kept)]
            row.mask += [1] * len(kept)
            row.turns += 1
            if end is None or end > room:
                row.finish = "length" if reason == "length" or len(tokens) > room or end is not None else "stop"
                continue
            if row.turns >= self.cfg.max_turns:
                row.finish = "length"
                continue
            pending.append(row)
            call = parse_tool_call(self.tokenizer.decode(kept)) or ToolCall(error=f"{CALL_CLOSE} without {CALL_OPEN}")
            calls.append((call, row.allowed))
        for row, result in zip(pending, self.toolbox.run(calls)):
            row.calls += 1
            row.errors += result.status == ERROR
            row.timeouts += result.status == TIMEOUT
            inserted = render_tool_message(self.tokenizer, result.text)
            if len(row.tokens) + len(inserted) >= max_new_tokens:
                row.finish = "length"
                continue
            row.tokens += inserted
            row.logprobs += [0.0] * len(inserted)
            row.mask += [0] * len(inserted)

    def call_end(self, tokens: list[int]) -> int | None:
        """The number of leading tokens up to and including the first ``</tool_call>``; None without one."""
        k = len(self.close_ids)
        for i in range(len(tokens) - k + 1):
            if tokens[i:i + k] == self.close_ids:
                return i + k
        if CALL_CLOSE not in self.tokenizer.decode(tokens):
            return None
        low, high = 1, len(tokens)  # the tag spans tokens split differently in context: shortest prefix with it
        while low < high:
            mid = (low + high) // 2
            if CALL_CLOSE in self.tokenizer.decode(tokens[:mid]):
                high = mid
            else:
                low = mid + 1
        return low


def tool_metrics(rows: list[_Row]) -> dict[str, float]:
    """Per sample, on average: turns, tool calls made, calls that failed, calls that timed out."""
    count = max(1, len(rows))
    return {"rollout/turns": sum(r.turns for r in rows) / count,
            "rollout/tool_calls": sum(r.calls for r in rows) / count,
            "rollout/tool_errors": sum(r.errors for r in rows) / count,
            "rollout/tool_timeouts": sum(r.timeouts for r in rows) / count}


_runs: dict[tuple, MultiTurn] = {}


def multi_turn_for(cfg: Config, tokenizer) -> MultiTurn:
    """The ``MultiTurn`` of this run's config and tokenizer, made on first use (closed at exit)."""
    m = cfg.rollout.multi_turn
    key = (id(tokenizer), tuple(m.tools), m.max_turns, m.tool_timeout_s, cfg.distributed.tp > 1)
    if key not in _runs:
        _runs[key] = MultiTurn(m, tokenizer, lockstep=cfg.distributed.tp > 1)
    return _runs[key]


def check_multi_turn(cfg: Config, tokenizer) -> None:
    """With ``rollout.multi_turn.enable``: ``ConfigError`` for a chat template without tool messages or
    a tool that does not load, before any process group (the run's ``MultiTurn`` is kept for later)."""
    if cfg.rollout.multi_turn.enable:
        multi_turn_for(cfg, tokenizer)


def close_all() -> None:
    """End every run's tool sandbox (also at interpreter exit)."""
    while _runs:
        _runs.popitem()[1].close()


atexit.register(close_all)


def prompt_visions(examples: list[PromptExample]) -> list[VisionInputs | None] | None:
    """The prompts' images for ``engine.generate`` (one per prompt); None when no prompt has any."""
    visions = [e.vision for e in examples]
    return visions if any(v is not None for v in visions) else None


def rollout_samples(cfg: Config, engine: RolloutEngine, tokenizer, examples: list[PromptExample],
                    sampling: SamplingConfig) -> tuple[Samples, dict[str, float]]:
    """The samples of ``examples`` (seeded per prompt) and their metrics: one ``engine.generate``, or
    the multi-turn rollout when ``rollout.multi_turn.enable``."""
    if not cfg.rollout.multi_turn.enable:
        return engine.generate([e.prompt_ids for e in examples], sampling, seeds=[e.index for e in examples],
                               vision=prompt_visions(examples)), {}
    return multi_turn_for(cfg, tokenizer).generate(engine, examples, sampling)
