"""Scores from a learned reward model (``AutoModelForSequenceClassification``, one label).

A Bradley-Terry reward model (Ouyang et al., 2022, InstructGPT) is trained to give one scalar to a
whole prompt + response: its head's output at the response's LAST token, the only position that
has read everything. We score exactly that position, found from the attention mask (the last
attended column of each row), never from ``pad_token_id`` as HF's own pooling does: the pad id may
equal EOS, and a finished response ends with EOS, which HF would then skip. HF's pooled output is
therefore ignored; the per-position scores are read from the ``score`` head as it runs.

The model is FSDP2-sharded, so every forward is a collective: every rank of the training mesh
calls ``score`` together with the same number of micro-batches (the caller's guarantee, as for
the actor's logprobs). Each rank scores only its own rows.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import FSDPModule

from ..data.batch import TokenBatch, micro_batches


def last_attended_index(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Column of the last attended token of each row ``[B]`` (works for left or right padding)."""
    columns_BT = torch.arange(attention_mask_BT.shape[1], device=attention_mask_BT.device).expand_as(attention_mask_BT)
    return torch.where(attention_mask_BT.bool(), columns_BT, -1).amax(dim=1)


class RewardModel:
    def __init__(self, model: torch.nn.Module, device: torch.device, micro_batch_size: int):
        assert hasattr(model, "score"), f"{type(model).__name__} has no score head; add its head's name here"
        self.model = model
        self.device = device
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def score(self, batch: TokenBatch) -> torch.Tensor:
        """One float32 score per row of ``batch`` (on the CPU): the head at the last attended token."""
        scores_B = torch.zeros(batch.size, dtype=torch.float32)
        for rows in micro_batches(batch.size, self.micro_batch_size):
            micro = batch.select(rows).to(self.device)
            scores_BT = self._token_scores(micro)
            last_B = last_attended_index(micro.attention_mask_BT)
            assert bool((last_B >= 0).all()), "a row with no attended token has nothing to score"
            scores_B[rows] = scores_BT.gather(1, last_B[:, None]).squeeze(1).float().cpu()
        if isinstance(self.model, FSDPModule):
            self.model.reshard()  # FSDP2 keeps the root gathered after a forward that no backward follows
        return scores_B

    def _token_scores(self, micro: TokenBatch) -> torch.Tensor:
        """The head's output at every position ``[B, T]``, captured as HF's forward runs it."""
        captured: list[torch.Tensor] = []
        handle = self.model.score.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.model(
                input_ids=micro.input_ids_BT,
                attention_mask=micro.attention_mask_BT,
                position_ids=micro.position_ids_BT,
                use_cache=False,
            )
        finally:
            handle.remove()
        assert len(captured) == 1 and captured[0].shape[-1] == 1, "one forward of a one-label head"
        return captured[0][..., 0]
