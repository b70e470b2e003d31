"""A resumable prompt loader: every rank walks the same seeded permutation and takes its slice.

Global batch ``k`` of an epoch is ``perm[k*B : (k+1)*B]``, cut into mini-batches of ``M`` rows
(one optimizer step each); rank ``r`` of ``W`` takes rows ``[r*M/W, (r+1)*M/W)`` of every
mini-batch, in order. The trainer splits a rank's prompts into ``B/M`` contiguous mini-batches, so
optimizer step ``m`` sees the same prompts on any number of ranks (with plain contiguous rank
slices it would see ``W`` different pieces of the batch instead). ``M = B`` (the default) is the
plain slice ``[r*B/W, (r+1)*B/W)``. The last partial batch of an epoch is dropped, so every rank
always gets the same number of prompts. ``state_dict`` / ``load_state_dict`` make it resumable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class PromptLoader(Generic[T]):
    def __init__(self, examples: Sequence[T], global_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, mini_batch: int | None = None):
        mini_batch = global_batch if mini_batch is None else mini_batch
        assert global_batch % mini_batch == 0 and mini_batch % world_size == 0, "validated in config"
        if len(examples) < global_batch:
            raise ValueError(
                f"the dataset has {len(examples)} usable prompts, fewer than trainer.batch_size={global_batch}; "
                "lower trainer.batch_size or add data"
            )
        self.examples = examples
        self.global_batch = global_batch
        self.mini_batch = mini_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self) -> list[T]:
        """This rank's prompts of the next global batch."""
        if self.position + self.global_batch > len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation()
        batch = self._order[self.position : self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.mini_batch // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        mine = [i for start in range(0, self.global_batch, self.mini_batch) for i in batch[start + lo : start + hi]]
        return [self.examples[i] for i in mine]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation()
