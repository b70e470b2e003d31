"""Shared by the critic and reward-model tests: a tiny config, a random reward-model directory, a batch."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from spmd_rlhf.data.batch import TokenBatch, collate
from spmd_rlhf.tasks.arithmetic import build_tokenizer, tiny_model_config
from tests.distributed.workers.tiny import spread_weights

ROWS = 8  # global rows of the fixed batch


def tiny_config(pad_token_id: int | None = None):
    """The task's tiny Qwen2 (vocab 15: uneven shards on 2 ranks), hidden 32, 4 heads."""
    tokenizer = build_tokenizer()
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    return tiny_model_config(len(tokenizer), 32, 2, 4, pad, tokenizer.eos_token_id)


def save_random_reward_model(path: str, pad_is_eos: bool = False, seed: int = 0) -> None:
    """A one-label sequence classifier with weights large enough that scores differ clearly by position."""
    config = tiny_config(build_tokenizer().eos_token_id if pad_is_eos else None)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = spread_weights(AutoModelForSequenceClassification.from_config(config, dtype=torch.float32))
    model.save_pretrained(path, safe_serialization=True)


def fixed_rows(seed: int = 1234) -> tuple[list[list[int]], list[list[int]]]:
    """ROWS prompts (2-6 tokens) and responses (1-7 tokens, every other one ending with EOS)."""
    eos = build_tokenizer().eos_token_id
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(ROWS):
        prompts.append(torch.randint(3, 15, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist())
        body = torch.randint(3, 15, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist()
        responses.append(body + [eos] if i % 2 == 0 else body)
    return prompts, responses


def fixed_batch(pad_id: int) -> TokenBatch:
    prompts, responses = fixed_rows()
    return collate(prompts, responses, pad_id)


def rank_rows(rank: int, world: int) -> slice:
    """This rank's contiguous share of the ROWS global rows."""
    per_rank = ROWS // world
    return slice(rank * per_rank, (rank + 1) * per_rank)
