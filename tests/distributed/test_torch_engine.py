"""TorchEngine and the tensor-parallel plan.

Single-process tests run in a world of one (gloo, in this process); the multi-process test
syncs an FSDP2 actor into tp=2 and tp=1 engines and compares them token for token.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from spmd_rlhf.distributed.tp_plan import apply_tensor_parallel, param_shard_dims, replicated_dims
from spmd_rlhf.rollout.base import RolloutEngine, SamplingConfig
from spmd_rlhf.rollout.torch_engine import TorchEngine, sample_tokens
from tests.distributed.workers.tiny import ARCHS, hf_logprobs, random_prompts, tiny_config, tiny_model
from tests.launch import REPO_ROOT, torchrun, world_of_one

WORKER = REPO_ROOT / "tests" / "distributed" / "workers" / "engine_worker.py"


@pytest.fixture(scope="module")
def topology():
    """A 1-rank gloo world in this process, torn down (and the environment restored) after."""
    with world_of_one() as topo:
        yield topo


def make_engine(topology, model, eos: list[int], max_batch_size: int = 256) -> TorchEngine:
    engine = TorchEngine(model.config, topology.gen_mesh, torch.device("cpu"), torch.float32, eos, 0, max_batch_size)
    engine.load_weights([list(model.named_parameters())])  # tp == 1: slices are whole tensors
    return engine


@pytest.fixture(scope="module")
def llama():
    return tiny_model(tiny_config("llama", 40, False), seed=0)


# -- sampling ------------------------------------------------------------------------------


def test_greedy_and_logprobs_before_filtering():
    logits_BV = torch.randn(4, 11, generator=torch.Generator().manual_seed(0))
    greedy = SamplingConfig(max_new_tokens=1, temperature=0.0)
    tokens_B, logprobs_B = sample_tokens(logits_BV, greedy, None)
    assert torch.equal(tokens_B, logits_BV.argmax(-1))
    torch.testing.assert_close(logprobs_B, torch.log_softmax(logits_BV, -1).max(-1).values)

    filtered = SamplingConfig(max_new_tokens=1, temperature=0.5, top_k=3, top_p=0.5)
    tokens_B, logprobs_B = sample_tokens(logits_BV, filtered, torch.Generator().manual_seed(1))
    expected_B = torch.log_softmax(logits_BV / 0.5, -1).gather(-1, tokens_B[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs_B, expected_B)


def test_top_k_and_top_p_keep_the_right_tokens():
    probs_V = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits_BV = probs_V.log().expand(4000, 4).clone()
    gen = torch.Generator().manual_seed(0)

    def drawn(**kwargs) -> torch.Tensor:
        tokens_B, _ = sample_tokens(logits_BV, SamplingConfig(max_new_tokens=1, **kwargs), gen)
        return torch.bincount(tokens_B, minlength=4) / len(tokens_B)

    # top_p 0.8: mass before token 3 is 0.5 < 0.8 (kept), before token 2 is 0.8 (dropped)
    torch.testing.assert_close(drawn(top_p=0.8), torch.tensor([0.0, 0.625, 0.0, 0.375]), atol=0.03, rtol=0)
    torch.testing.assert_close(drawn(top_p=1e-6), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(drawn(top_k=1), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(drawn(top_k=3), torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95, atol=0.03, rtol=0)
    torch.testing.assert_close(drawn(), probs_V, atol=0.03, rtol=0)


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rollout.top_p"):
        SamplingConfig(max_new_tokens=4, top_p=0.0)
    with pytest.raises(ValueError, match="rollout.max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="rollout.temperature"):
        SamplingConfig(max_new_tokens=4, temperature=-1.0)


# -- tensor-parallel plan ------------------------------------------------------------------


@pytest.mark.parametrize("arch, vocab, tied", ARCHS)
def test_plan_covers_supported_architectures(arch, vocab, tied):
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab, tied))
    dims = param_shard_dims(model)
    assert list(dims) == [name for name, _ in model.named_parameters()]
    assert ("lm_head.weight" in dims) == (not tied)
    for name, dim in dims.items():
        if any(part in name for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")):
            assert dim == 0, name
        elif any(part in name for part in ("o_proj", "down_proj")):
            assert dim == (1 if name.endswith("weight") else None), name
        else:
            assert "norm" in name and dim is None, name
    if arch == "qwen3":
        assert dims["model.layers.0.self_attn.q_norm.weight"] is None


def test_plan_rejects_unknown_architecture():
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match=r"no tensor-parallel plan.*transformer\.wte\.weight.*rollout\.weight_sync=full"):
        param_shard_dims(model)
    assert set(replicated_dims(model).values()) == {None}


def test_apply_tensor_parallel_is_noop_at_tp1(topology, llama):
    before = {name: p for name, p in llama.named_parameters()}
    assert apply_tensor_parallel(llama, topology.gen_mesh["tp"]) is llama
    assert all(p is before[name] for name, p in llama.named_parameters())


# -- engine, world of one --------------------------------------------------------------------


def test_logprobs_match_plain_forward(topology, llama):
    engine = make_engine(topology, llama, eos=[39])
    assert isinstance(engine, RolloutEngine) and engine.weight_version == 1
    prompts = random_prompts(5, 40, seed=3)
    for sampling in (
        SamplingConfig(max_new_tokens=12, temperature=0.0),
        SamplingConfig(max_new_tokens=12, n=2, temperature=0.7, top_k=8, top_p=0.9, seed=4),
    ):
        samples = engine.generate(prompts, sampling)
        assert len(samples) == len(prompts) * sampling.n
        temperature = sampling.temperature or 1.0
        for row, (tokens, logprobs) in enumerate(zip(samples.token_ids, samples.logprobs)):
            expected = hf_logprobs(llama, prompts[row // sampling.n], tokens, temperature)
            torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


def test_chunking_n_and_reproducibility(topology, llama):
    prompts = random_prompts(5, 40, seed=5)
    whole, chunked = make_engine(topology, llama, [39]), make_engine(topology, llama, [39], max_batch_size=2)
    greedy = SamplingConfig(max_new_tokens=8, n=3, temperature=0.0)
    reference = whole.generate(prompts, greedy)
    assert chunked.generate(prompts, greedy).token_ids == reference.token_ids
    for i in range(len(prompts)):  # prompt-major: the n greedy samples of a prompt are equal
        assert reference.token_ids[3 * i] == reference.token_ids[3 * i + 1] == reference.token_ids[3 * i + 2]
    sampled = SamplingConfig(max_new_tokens=8, n=3, temperature=1.0, seed=9)
    first = whole.generate(prompts, sampled)
    assert whole.generate(prompts, sampled).token_ids == first.token_ids
    assert whole.generate(prompts, SamplingConfig(max_new_tokens=8, n=3, seed=10)).token_ids != first.token_ids
    top1 = whole.generate(prompts, SamplingConfig(max_new_tokens=8, n=3, top_k=1, seed=9))
    assert top1.token_ids == reference.token_ids


def test_eos_stops_and_length(topology, llama):
    prompts = random_prompts(4, 40, seed=7)
    reference = make_engine(topology, llama, [39]).generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    stop_token = reference.token_ids[0][1]
    engine = make_engine(topology, llama, [stop_token])
    samples = engine.generate(prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert samples.finish_reasons[0] == "stop"
    assert samples.token_ids[0][-1] == stop_token and len(samples.token_ids[0]) <= 2
    for tokens, reason in zip(samples.token_ids, samples.finish_reasons):
        assert (reason == "stop") == (tokens[-1] == stop_token)
        assert reason == "stop" or len(tokens) == 6
        assert stop_token not in tokens[:-1]
    short = engine.generate(prompts, SamplingConfig(max_new_tokens=1, temperature=0.0))
    assert [len(t) for t in short.token_ids] == [1] * 4
    assert short.finish_reasons[0] == ("stop" if reference.token_ids[0][0] == stop_token else "length")


def test_engine_bookkeeping(topology, llama):
    engine = make_engine(topology, llama, [39])
    engine.load_weights([list(llama.named_parameters())[:3], list(llama.named_parameters())[3:]])
    assert engine.weight_version == 2
    engine.sleep()
    engine.wake()
    assert engine.generate([], SamplingConfig(max_new_tokens=3)).token_ids == []
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[1], []], SamplingConfig(max_new_tokens=3))
    with pytest.raises(ValueError, match="EOS"):
        TorchEngine(llama.config, topology.gen_mesh, torch.device("cpu"), torch.float32, [], 0)


# -- engine, two ranks -----------------------------------------------------------------------


@pytest.mark.slow
def test_tp2_matches_tp1_across_ranks(tmp_path):
    torchrun([str(WORKER), str(tmp_path / "result")], 2, timeout=150)
    checks = ["slices", "greedy_tp2_equals_tp1", "sampling_reproducible_and_tp_consistent", "top_k1_is_greedy", "eos_stops"]
    expected = [f"{arch}:{check}" for arch, _, _ in ARCHS for check in checks]
    for rank in range(2):
        assert json.loads((tmp_path / f"result.rank{rank}.json").read_text()) == expected


def test_sync_after_a_no_grad_actor_forward_sees_sharded_weights(topology):
    """FSDP2 leaves the root's parameters gathered after a forward with no backward; the actor
    must reshard so the next weight sync still streams DTensors (found on GPU, guarded here)."""
    from torch.distributed.tensor import DTensor

    from spmd_rlhf.data.batch import collate
    from spmd_rlhf.distributed.reshard import reshard_stream
    from spmd_rlhf.models.parallelize import parallelize
    from spmd_rlhf.distributed.tp_plan import replicated_dims
    from spmd_rlhf.trainer.actor import Actor

    model = tiny_model(tiny_config("qwen2", vocab=37, tied=True), seed=3)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    actor_model = parallelize(model, topology.fsdp_mesh, torch.device("cpu"))
    actor = Actor(actor_model, None, None, 1, 1.0, torch.device("cpu"))
    batch = collate([[3, 4, 5], [6, 7]], [[8, 9], [10, 11, 12]], 0)
    actor.logprobs(batch, micro_batch_size=1, temperature=1.0)
    assert all(isinstance(p, DTensor) for p in actor_model.parameters())
    engine = make_engine(topology, tiny_model(tiny_config("qwen2", vocab=37, tied=True), seed=4), [1])
    engine.load_weights(reshard_stream(actor_model.named_parameters(), replicated_dims(actor_model),
                                       topology.reshard_mesh, 2**20))
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, full[name]), name
