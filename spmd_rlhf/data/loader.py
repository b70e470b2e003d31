"""A resumable prompt loader: every rank walks the same seeded permutation and takes its slice.

Global batch ``k`` of an epoch is ``perm[k*B : (k+1)*B]``; rank ``r`` of ``W`` takes rows
``[r*B/W, (r+1)*B/W)`` of it. The last partial batch of an epoch is dropped, so every rank always
gets the same number of prompts. ``state_dict`` / ``load_state_dict`` make it resumable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class PromptLoader(Generic[T]):
    def __init__(self, examples: Sequence[T], global_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True):
        assert global_batch % world_size == 0, "validated in config"
        if len(examples) < global_batch:
            raise ValueError(
                f"the dataset has {len(examples)} usable prompts, fewer than trainer.batch_size={global_batch}; "
                "lower trainer.batch_size or add data"
            )
        self.examples = examples
        self.global_batch = global_batch
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
        per_rank = self.global_batch // self.world_size
        return [self.examples[i] for i in batch[self.rank * per_rank : (self.rank + 1) * per_rank]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation()
