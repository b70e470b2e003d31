"""Sequence parallel's pure parts: ``distributed.sp`` validation (errors name the key and a fix)
and the padding of a packed row to a multiple of sp."""

from __future__ import annotations

import re

import pytest
import torch

from spmd_rlhf.config import Config, ConfigError, check_tp_shapes, validate
from spmd_rlhf.config.layout import check_sp_shapes
from spmd_rlhf.data.batch import collate
from spmd_rlhf.data.packing import pack


def _config(sp: int, max_tokens: int | None = 256, placement: str = "colocate", generation_ranks: int = 0) -> Config:
    cfg = Config()
    cfg.distributed.sp, cfg.distributed.placement, cfg.distributed.generation_ranks = sp, placement, generation_ranks
    cfg.trainer.max_tokens_per_micro_batch = max_tokens
    return cfg


def _raises(fn, key: str, fix: str) -> str:
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        fn()
    assert re.search(fix, str(info.value)), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("sp, world, placement, gen", [(1, 1, "colocate", 0), (2, 2, "colocate", 0),
                                                       (2, 4, "colocate", 0), (4, 4, "colocate", 0),
                                                       (2, 3, "split", 1)])
def test_valid_layouts(sp, world, placement, gen):
    validate(_config(sp, placement=placement, generation_ranks=gen), world)


def test_sp_must_divide_the_training_ranks():
    _raises(lambda: validate(_config(2), 3), "distributed.sp=2", r"divisor of 3")
    # split: the 3 training ranks of 4 (1 generates) count, not the world
    _raises(lambda: validate(_config(2, placement="split", generation_ranks=1), 4), "distributed.sp=2",
            r"3 training ranks")


def test_sp_needs_packed_micro_batches():
    message = _raises(lambda: validate(_config(2, max_tokens=0), 2), "trainer.max_tokens_per_micro_batch",
                      r"distributed.sp=1")
    assert "distributed.sp=2" in message
    if not torch.cuda.is_available():  # null means padded on a CPU
        _raises(lambda: validate(_config(2, max_tokens=None), 2), "trainer.max_tokens_per_micro_batch", "e.g.")
    validate(_config(1, max_tokens=0), 2)


def test_sp_below_one():
    _raises(lambda: validate(_config(0), 2), "distributed.sp=0", r"distributed.sp=1")


def test_sp_must_divide_the_heads():
    cfg = _config(2)
    check_sp_shapes(cfg, 4, 2)
    check_tp_shapes(cfg, 4, 2, 64)
    message = _raises(lambda: check_sp_shapes(cfg, 4, 1), "distributed.sp=2", r"distributed.sp=1\)")
    assert "num_attention_heads=4" in message and "num_key_value_heads=1" in message
    # check_tp_shapes (what train.run calls before the process group) applies the sp rule too
    _raises(lambda: check_tp_shapes(_config(4), 6, 6, 64), "distributed.sp=4", r"distributed.sp=3\)")
    _raises(lambda: check_tp_shapes(_config(3), 4, 4, 64), "num_key_value_heads=4", r"distributed.sp=2\)")


def test_padded_row_keeps_layout_and_adds_a_filler_segment():
    batch = collate([[5, 6], [10], [12, 13, 14]], [[7, 8, 9], [11], [15]], pad_id=0)
    p = pack(batch, [2, 0, 1])  # N = 11
    assert p.padded(1) is p and p.padded(11) is p
    q = p.padded(4)
    assert q.num_tokens == 12 and q.input_ids_1N[0, :11].tolist() == p.input_ids_1N[0].tolist()
    assert q.position_ids_1N.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 0]]
    assert q.cu_seqlens.tolist() == [0, 4, 9, 11, 12] and q.cu_seqlens.dtype == torch.int32
    assert q.loss_mask_1M.tolist() == [p.loss_mask_1M[0].tolist() + [0.0]]
    assert q.max_seqlen == p.max_seqlen and q.width == p.width and q.rows == p.rows
    values_1M = torch.arange(1.0, 12.0).unsqueeze(0)
    torch.testing.assert_close(q.unpack(values_1M), p.unpack(values_1M[:, :10]))
    r = p.padded(8)  # 5 filler tokens: their own segment, longer than no sequence here
    assert r.num_tokens == 16 and r.cu_seqlens.tolist()[-2:] == [11, 16] and r.max_seqlen == 5
    assert r.position_ids_1N[0, 11:].tolist() == [0, 1, 2, 3, 4]
