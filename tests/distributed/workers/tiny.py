"""Tiny random causal LMs and a plain-HF logprob reference, shared by engine tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

# (architecture, vocab, tied embeddings). The Llama variant has biases everywhere (row-parallel
# o/down biases included), Qwen2 q/k/v biases, Qwen3 q_norm/k_norm; vocab 37 does not divide by 2.
ARCHS: list[tuple[str, int, bool]] = [("llama", 40, False), ("qwen2", 37, True), ("qwen3", 37, False)]


def tiny_config(arch: str, vocab: int, tied: bool) -> PretrainedConfig:
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    if arch == "llama":
        return LlamaConfig(attention_bias=True, mlp_bias=True, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    raise AssertionError(arch)


def tiny_model(config: PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """fp32 model with weights large enough that greedy choices are far from ties."""
    torch.manual_seed(seed)
    return spread_weights(AutoModelForCausalLM.from_config(config, dtype=torch.float32)).eval()


@torch.no_grad()
def spread_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains in [0.5, 1.5], every other weight N(0, 0.3): outputs differ clearly by input."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.uniform_(0.5, 1.5)
        else:
            param.normal_(0.0, 0.3)
    return model


def random_prompts(count: int, vocab: int, seed: int, low: int = 1, max_len: int = 9) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randint(low, vocab - 1, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def hf_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of ``tokens`` after ``prompt``, by one unpadded forward."""
    ids_1T = torch.tensor([prompt + tokens])
    logits_TV = model(input_ids=ids_1T).logits[0, len(prompt) - 1 : -1].float()
    logprobs_TV = torch.log_softmax(logits_TV / temperature, dim=-1)
    return logprobs_TV.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)
