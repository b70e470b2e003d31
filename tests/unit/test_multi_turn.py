"""Multi-turn rollouts against a scripted engine: exact loss masks, logprob alignment, budgets,
turn limits, malformed calls and the tool metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from spmd_rlhf.config import Config, ConfigError
from spmd_rlhf.config.schema import MultiTurnConfig
from spmd_rlhf.data.batch import collate
from spmd_rlhf.data.datasets import PromptExample
from spmd_rlhf.rollout.base import EngineBase, SamplingConfig, Samples
from spmd_rlhf.rollout.multi_turn import (MultiTurn, check_multi_turn, close_sequences, render_tool_message,
                                          rollout_samples)
from spmd_rlhf.rollout.tools import CALL_CLOSE
from spmd_rlhf.tasks.arithmetic import CALL_PREFIX, CALL_SUFFIX, build_tokenizer

TOK = build_tokenizer(tools=True)
EOS = "<eos>"


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


def call(expression: str) -> str:
    return f"<tool_call>{CALL_PREFIX}{expression}{CALL_SUFFIX}</tool_call>"


@dataclass
class ScriptedEngine(EngineBase):
    """Answers each request with the next scripted text for its prompt text; logprob of the token at
    position t of a reply is -(t + 1) / 100 - turn (so turns and positions can be told apart)."""

    script: dict[str, list[str]]
    calls: list[tuple[list[str], SamplingConfig, list[int] | None]] = field(default_factory=list)

    def generate(self, prompt_token_ids, sampling, seeds=None, vision=None) -> Samples:
        texts = [TOK.decode(p) for p in prompt_token_ids]
        self.calls.append((texts, sampling, seeds))
        turn = len(self.calls) - 1
        out = Samples([], [], [])
        for text in texts:
            for _ in range(sampling.n):
                reply = ids(self.script[text].pop(0))[:sampling.max_new_tokens]
                out.token_ids.append(reply)
                out.logprobs.append([-(t + 1) / 100 - turn for t in range(len(reply))])
                stopped = bool(reply) and reply[-1] == TOK.eos_token_id
                out.finish_reasons.append("stop" if stopped else "length")
        return out


def make(max_turns: int = 3, tools=("calculator",)) -> MultiTurn:
    return MultiTurn(MultiTurnConfig(enable=True, max_turns=max_turns, tool_timeout_s=5, tools=list(tools)), TOK)


def example(prompt: str, index: int = 0, extra_info: dict | None = None) -> PromptExample:
    return PromptExample(ids(prompt), "arithmetic", "0", extra_info or {}, index)


def test_call_then_answer_masks_and_logprobs_exact() -> None:
    prompt = "437+548="
    first = call("437+548")
    engine = ScriptedEngine({prompt: [first + "<tool_response>1</tool_response>9" + EOS],  # runs on past the call
                             prompt + first + "<tool_response>985</tool_response>": ["985" + EOS]})
    samples, metrics = make().generate(engine, [example(prompt, index=3)], SamplingConfig(max_new_tokens=40, n=1))
    generated, inserted, answer = ids(first), render_tool_message(TOK, "985"), ids("985" + EOS)
    assert inserted == ids("<tool_response>985</tool_response>")
    assert samples.token_ids == [generated + inserted + answer]
    assert samples.loss_masks == [[1] * len(generated) + [0] * len(inserted) + [1] * len(answer)]
    expected_lp = ([-(t + 1) / 100 for t in range(len(generated))] + [0.0] * len(inserted)
                   + [-(t + 1) / 100 - 1 for t in range(len(answer))])
    assert samples.logprobs[0] == pytest.approx(expected_lp)
    assert samples.finish_reasons == ["stop"]
    assert metrics == {"rollout/turns": 2.0, "rollout/tool_calls": 1.0, "rollout/tool_errors": 0.0,
                       "rollout/tool_timeouts": 0.0}
    # turn 2: one request per sample (n=1), the rest of the budget, the sample's own seed key
    texts, sampling, seeds = engine.calls[1]
    assert sampling.n == 1 and sampling.max_new_tokens == 40 - len(generated) - len(inserted)
    assert seeds == [3] and engine.calls[0][2] == [3] and sampling.seed != engine.calls[0][1].seed
    # every turn asks the engine to stop at the close of a call
    assert all(tuple(ids(CALL_CLOSE)) in c[1].stop_sequences for c in engine.calls)


def test_close_sequences_spell_the_close_of_a_call() -> None:
    found = close_sequences(TOK)
    assert tuple(ids(CALL_CLOSE)) in found
    for seq in found:
        assert TOK.decode(list(seq)).endswith(CALL_CLOSE) and not TOK.decode(list(seq[1:])).endswith(CALL_CLOSE)


def test_collate_trains_only_on_generated_tokens() -> None:
    prompt = ids("12+34=")
    response = [5, 6, 7, 8, 9]
    batch = collate([prompt], [response], 0, [[1, 0, 0, 1, 1]])
    # column t predicts token t + 1: response token j sits at column len(prompt) + j - 1
    start = len(prompt) - 1
    assert batch.loss_mask_BT[0].tolist() == [0.0] * start + [1.0, 0.0, 0.0, 1.0, 1.0]


def test_samples_of_a_group_finish_independently() -> None:
    prompt = "100+200="
    first = call("100+200")
    follow = prompt + first + "<tool_response>300</tool_response>"
    engine = ScriptedEngine({prompt: ["300" + EOS, first + EOS, "299" + EOS], follow: ["300" + EOS]})
    samples, metrics = make().generate(engine, [example(prompt, index=5)], SamplingConfig(max_new_tokens=40, n=3))
    assert [TOK.decode(t) for t in samples.token_ids] == [
        "300" + EOS, first + "<tool_response>300</tool_response>300" + EOS, "299" + EOS]
    assert samples.loss_masks[0] == [1] * 4 and samples.loss_masks[2] == [1] * 4
    assert len(engine.calls) == 2 and engine.calls[1][0] == [follow]
    assert engine.calls[1][2] == [5 * 3 + 1], "sample 1 of prompt 5 draws from its own stream"
    assert metrics["rollout/turns"] == pytest.approx(4 / 3) and metrics["rollout/tool_calls"] == pytest.approx(1 / 3)


def test_budget_counts_tool_tokens_and_never_ends_on_them() -> None:
    prompt = "437+548="
    first = call("437+548")
    used = len(ids(first))
    room_for_message = len(render_tool_message(TOK, "985"))
    # the tool message would fill the budget exactly: not appended, the sample ends after the call
    engine = ScriptedEngine({prompt: [first]})
    sampling = SamplingConfig(max_new_tokens=used + room_for_message, n=1)
    samples, metrics = make().generate(engine, [example(prompt)], sampling)
    assert samples.token_ids == [ids(first)] and samples.loss_masks == [[1] * used]
    assert samples.finish_reasons == ["length"] and metrics["rollout/tool_calls"] == 1.0
    # room for two answer tokens: the answer is cut at the budget
    budget = used + room_for_message + 2
    engine = ScriptedEngine({prompt: [first], prompt + first + "<tool_response>985</tool_response>": ["985" + EOS]})
    samples, _ = make().generate(engine, [example(prompt)], SamplingConfig(max_new_tokens=budget, n=1))
    assert len(samples.token_ids[0]) == budget and TOK.decode(samples.token_ids[0]).endswith("</tool_response>98")
    assert samples.finish_reasons == ["length"] and samples.loss_masks[0][-2:] == [1, 1]


def test_call_cut_by_the_budget_is_not_run() -> None:
    prompt = "437+548="
    engine = ScriptedEngine({prompt: [call("437+548")]})
    samples, metrics = make().generate(engine, [example(prompt)], SamplingConfig(max_new_tokens=5, n=1))
    assert samples.token_ids == [ids(call("437+548"))[:5]] and samples.finish_reasons == ["length"]
    assert metrics["rollout/tool_calls"] == 0.0 and len(engine.calls) == 1


def test_max_turns_ends_after_a_call_without_running_it() -> None:
    prompt = "437+548="
    first = call("437+548")
    engine = ScriptedEngine({prompt: [first + EOS]})
    samples, metrics = make(max_turns=1).generate(engine, [example(prompt)], SamplingConfig(max_new_tokens=40, n=1))
    assert samples.token_ids == [ids(first)] and samples.finish_reasons == ["length"]
    assert metrics["rollout/turns"] == 1.0 and metrics["rollout/tool_calls"] == 0.0


def ascii_tokenizer():
    """Characters of printable ASCII, the tool-call markup as whole tokens, and the embedded chat template."""
    import string

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from spmd_rlhf.tasks.arithmetic import TOOL_CHAT_TEMPLATE

    vocab = {t: i for i, t in enumerate(["<pad>", EOS, "<unk>"] + sorted(set(string.printable)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token=EOS, unk_token="<unk>")
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in
                    ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]])
    tok.chat_template = TOOL_CHAT_TEMPLATE
    return tok


class Replies(EngineBase):
    """Replies in order, one call per turn; records the prompts it was given (as text)."""

    def __init__(self, tok, replies: list[str]):
        self.tok, self.replies, self.prompts = tok, list(replies), []

    def generate(self, prompt_token_ids, sampling, seeds=None, vision=None) -> Samples:
        self.prompts.append([self.tok.decode(p) for p in prompt_token_ids])
        reply = self.tok(self.replies.pop(0), add_special_tokens=False).input_ids
        out = [list(reply) for _ in prompt_token_ids]
        return Samples(out, [[-0.25] * len(o) for o in out], ["stop" if o[-1] == self.tok.eos_token_id else "length"
                                                              for o in out])


@pytest.mark.parametrize("body, message", [
    ("{not json", "Error: the tool call is not valid JSON"),
    ('{"name": "abacus", "arguments": {}}', "Error: unknown tool 'abacus'; the tools are: calculator"),
    ('{"name": "calculator", "arguments": {"expression": "__import__(\'os\')"}}', "Error: only numbers"),
    ('{"name": "calculator", "arguments": {"expression": "9**9**9"}}', "Error: exponent"),
    ('{"name": "calculator", "arguments": {"expression": "1/0"}}', "Error: division by zero"),
    ('{"name": "calculator", "arguments": {"formula": "1+1"}}', 'Error: the calculator takes {"expression"'),
    ('{"name": "calculator", "arguments": [1, 2]}', "Error: the tool call's arguments are not a JSON object"),
    ('["calculator"]', 'Error: the tool call needs a JSON object {"name"'),
    ("", "Error: the tool call is not valid JSON"),
])
def test_malformed_calls_get_an_error_message_and_the_rollout_goes_on(body: str, message: str) -> None:
    tok = ascii_tokenizer()
    rollout = MultiTurn(MultiTurnConfig(enable=True, max_turns=3, tools=["calculator"]), tok)
    prompt = f"Q?<tool_call>{body}</tool_call>"
    engine = Replies(tok, [f"<tool_call>{body}</tool_call>junk", "42" + EOS])
    row = PromptExample(tok("Q?", add_special_tokens=False).input_ids, "arithmetic", "42", {}, 0)
    samples, metrics = rollout.generate(engine, [row], SamplingConfig(max_new_tokens=400, n=1))
    shown = engine.prompts[1][0]
    assert shown.startswith(prompt + "<tool_response>" + message), shown
    assert shown.endswith("</tool_response>")
    assert tok.decode(samples.token_ids[0]) == shown[len("Q?"):] + "42" + EOS
    assert metrics["rollout/tool_errors"] == 1.0 and metrics["rollout/tool_calls"] == 1.0
    assert samples.finish_reasons == ["stop"]


def test_a_close_without_an_open_is_an_error() -> None:
    tok = ascii_tokenizer()
    rollout = MultiTurn(MultiTurnConfig(enable=True, max_turns=2, tools=["calculator"]), tok)
    engine = Replies(tok, ["7</tool_call>", "7" + EOS])
    row = PromptExample(tok("Q?", add_special_tokens=False).input_ids, "arithmetic", "7", {}, 0)
    samples, metrics = rollout.generate(engine, [row], SamplingConfig(max_new_tokens=400, n=1))
    error = "Error: </tool_call> without <tool_call>"
    assert engine.prompts[1][0] == f"Q?7</tool_call><tool_response>{error}</tool_response>"
    assert metrics["rollout/tool_errors"] == 1.0 and samples.finish_reasons == ["stop"]


def test_tools_kwargs_limit_a_row_to_the_tools_it_names() -> None:
    tok = ascii_tokenizer()
    rollout = MultiTurn(MultiTurnConfig(enable=True, max_turns=2, tools=["calculator", "python"]), tok)
    body = '{"name": "calculator", "arguments": {"expression": "1+1"}}'
    rows = [PromptExample(tok("Q?", add_special_tokens=False).input_ids, "arithmetic", "2", extra, i)
            for i, extra in enumerate([{"tools_kwargs": {"python": {"create_kwargs": {}}}}, {}])]
    engine = Replies(tok, [f"<tool_call>{body}</tool_call>", "2" + EOS])
    _, metrics = rollout.generate(engine, rows, SamplingConfig(max_new_tokens=400, n=1))
    limited, free = engine.prompts[1]
    assert limited.endswith("<tool_response>Error: unknown tool 'calculator'; the tools are: python</tool_response>")
    assert free.endswith("<tool_response>2</tool_response>")
    assert metrics["rollout/tool_errors"] == 0.5 and metrics["rollout/tool_calls"] == 1.0
    rollout.close()


def test_single_turn_when_disabled_and_config_errors() -> None:
    cfg = Config()
    engine = ScriptedEngine({"1+2=": ["3" + EOS]})
    samples, metrics = rollout_samples(cfg, engine, TOK, [example("1+2=")], SamplingConfig(max_new_tokens=4, n=1))
    assert samples.loss_masks is None and metrics == {} and TOK.decode(samples.token_ids[0]) == "3" + EOS
    with pytest.raises(ConfigError, match="chat template"):
        MultiTurn(MultiTurnConfig(enable=True, tools=["calculator"]), build_tokenizer())
    check_multi_turn(cfg, build_tokenizer())  # disabled: nothing to check
    cfg.rollout.multi_turn.enable, cfg.rollout.multi_turn.tools = True, ["calculator", "nowhere.tools:x"]
    with pytest.raises(ConfigError, match=r"rollout.multi_turn.tools\[1\]: cannot import 'nowhere.tools'"):
        check_multi_turn(cfg, TOK)
    with pytest.raises(ConfigError, match=r"rollout.multi_turn.tools\[0\]"):
        make(tools=["abacus"])
    with pytest.raises(ConfigError, match="no_such_module"):
        make(tools=["no_such_module:tool"])


@pytest.mark.parametrize("override, key", [
    ({"tools": []}, "rollout.multi_turn.tools is empty"),
    ({"max_turns": 0}, "rollout.multi_turn.max_turns=0"),
    ({"tool_timeout_s": 0}, "rollout.multi_turn.tool_timeout_s=0"),
    ({"ignore_eos": True}, "rollout.ignore_eos=false"),
])
def test_config_mistakes_name_the_key(override: dict, key: str) -> None:
    from spmd_rlhf.config import validate

    cfg = Config()
    cfg.rollout.multi_turn.enable = True
    cfg.rollout.multi_turn.tools = override.get("tools", ["calculator"])
    cfg.rollout.multi_turn.max_turns = override.get("max_turns", 5)
    cfg.rollout.multi_turn.tool_timeout_s = override.get("tool_timeout_s", 30.0)
    cfg.rollout.ignore_eos = override.get("ignore_eos", False)
    with pytest.raises(ConfigError, match=key):
        validate(cfg, world_size=1)


def test_group_picking_takes_multi_turn() -> None:
    """Dynamic sampling and replay carry the loss masks (``rollout/groups.py``): no refusal."""
    from spmd_rlhf.config import validate

    cfg = Config()
    cfg.rollout.multi_turn.enable, cfg.rollout.multi_turn.tools = True, ["calculator"]
    cfg.algorithm.dynamic_sampling.enable = True
    cfg.algorithm.filter.replay_capacity, cfg.algorithm.filter.replay_fraction = 8, 0.25
    validate(cfg, world_size=1)


class EndsWithTruth:
    """A rule scorer: 1.0 for a text that ends with the ground truth."""

    def score(self, sources, texts, truths, extras):
        return [float(t.endswith(g)) for t, g in zip(texts, truths)], {}


def test_remax_greedy_baseline_goes_through_the_tools() -> None:
    from spmd_rlhf.rollout.generation import Generation
    from spmd_rlhf.rollout.scoring import Scoring

    cfg = Config()
    cfg.rollout.multi_turn.enable, cfg.rollout.multi_turn.tools = True, ["calculator"]
    cfg.algorithm.adv_estimator, cfg.rollout.n, cfg.rollout.max_new_tokens = "remax", 2, 40
    prompt, first = "437+548=", call("437+548")
    # the sampled pair answers at once (one right); the greedy response calls the calculator, then answers
    engine = ScriptedEngine({prompt: ["984" + EOS, "985" + EOS, first + EOS],
                             prompt + first + "<tool_response>985</tool_response>": ["985" + EOS]})
    row = PromptExample(ids(prompt), "arithmetic", "985", {}, 0)
    rollout = Generation(cfg, None, engine, None, Scoring(cfg, TOK, EndsWithTruth())).generate([row], step=0)
    assert rollout.rewards.tolist() == [0.0, 1.0]
    assert [c[1].temperature for c in engine.calls] == [cfg.rollout.temperature, 0.0, 0.0], "greedy: 2 turns"
    assert rollout.greedy_rewards.tolist() == [1.0], "the greedy answer after the tool's result is scored"
    assert rollout.metrics["reward/greedy_baseline"] == 1.0
    from spmd_rlhf.config import validate

    validate(cfg, world_size=1)  # ReMax takes multi-turn rollouts: no refusal


QWEN_LIKE_TEMPLATE = (  # the message loop of Qwen2.5's template (tool results as a user turn of <tool_response>s)
    "{%- for message in messages %}{%- if message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_chatml_tool_message_appends_only_what_follows_the_assistant_text() -> None:
    tok = ascii_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_LIKE_TEMPLATE
    inserted = tok.decode(render_tool_message(tok, "985"))
    assert inserted == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n985\n</tool_response><|im_end|>\n"
                        "<|im_start|>assistant\n")
    rollout = MultiTurn(MultiTurnConfig(enable=True, max_turns=2, tools=["calculator"]), tok)
    body = '{"name": "calculator", "arguments": {"expression": "437+548"}}'
    engine = Replies(tok, [f"<tool_call>\n{body}\n</tool_call><|im_end|>", "985<|im_end|>"])
    prompt = tok.apply_chat_template([{"role": "user", "content": "437+548?"}], add_generation_prompt=True)
    row = PromptExample(list(prompt if isinstance(prompt, list) else prompt["input_ids"]), "arithmetic", "985", {}, 0)
    samples, _ = rollout.generate(engine, [row], SamplingConfig(max_new_tokens=400, n=1))
    whole = tok.decode(row.prompt_ids + samples.token_ids[0]) + "\n"  # the template's newline after the last EOS
    assert whole == tok.apply_chat_template(
        [{"role": "user", "content": "437+548?"},
         {"role": "assistant", "content": f"<tool_call>\n{body}\n</tool_call>"},
         {"role": "tool", "content": "985"}, {"role": "assistant", "content": "985"}], tokenize=False)
