"""``tools/bench_capacity.py``'s plan: shape sizes against the published Qwen2.5 counts, which
cases it skips (a smaller failure, memory, budget), and how a failed child is classified."""

from __future__ import annotations

import importlib.util

import pytest

from tests.launch import REPO_ROOT

_spec = importlib.util.spec_from_file_location("bench_capacity", REPO_ROOT / "tools" / "bench_capacity.py")
cap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cap)


@pytest.mark.parametrize("shape, published", [("0.5b", 0.49e9), ("1.5b", 1.54e9), ("3b", 3.09e9), ("7b", 7.61e9),
                                               ("14b", 14.7e9), ("32b", 32.5e9)])
def test_shapes_have_the_published_parameter_counts(shape, published):
    assert cap.param_count(shape) == pytest.approx(published, rel=0.01)


def _args(**over):
    return cap.parse_args(["--shapes", "7b,1.5b,3b", "--modes", "full,lora", *sum(over.items(), ())])


def test_cases_run_smallest_shape_first_with_the_mode_settings():
    cases = cap.shape_cases(_args())
    assert [(c["shape"], c["mode"]) for c in cases] == [("1.5b", "full"), ("1.5b", "lora"), ("3b", "full"),
                                                        ("3b", "lora"), ("7b", "full"), ("7b", "lora")]
    assert all(c.get("lora_rank") == (16 if c["mode"] == "lora" else None) for c in cases)


def test_a_mode_that_failed_skips_its_larger_shapes_only():
    small, large = (dict(shape=s, group="full", prompt_len=128, gen_len=512) for s in ("1.5b", "7b"))
    failed = {"full": cap.size_of(small)}
    assert "smaller size" in cap.skip_reason(large, failed, {}, 1e9, 60)
    assert cap.skip_reason(dict(large, group="lora"), failed, {}, 1e9, 60) is None


def test_budget_skips_a_case_its_mode_predicts_too_long():
    small, large = (dict(shape=s, group="lora", prompt_len=128, gen_len=512) for s in ("1.5b", "7b"))
    done = {"lora": (50.0, cap.size_of(small))}  # 50 s at 1.5B: ~250 s at 7.6B
    assert "budget" in cap.skip_reason(large, {}, done, 200, 60)
    assert cap.skip_reason(large, {}, done, 300, 60) is None
    assert "budget" in cap.skip_reason(small, {}, {}, 30, 60)  # a mode's first case needs min_case_s


def test_weights_and_optimizer_state_beyond_memory_are_skipped():
    full32 = dict(shape="32b", group="full", prompt_len=128, gen_len=512)
    assert "device memory" in cap.skip_reason(full32, {}, {}, 1e9, 60, (139.8, 1000.0))
    offload14 = dict(shape="14b", group="offload", prompt_len=128, gen_len=512, cpu_offload=True)
    assert "host memory" in cap.skip_reason(offload14, {}, {}, 1e9, 60, (139.8, 125.0))
    lora14 = dict(shape="14b", group="lora", prompt_len=128, gen_len=512, lora_rank=16)
    assert cap.skip_reason(lora14, {}, {}, 1e9, 60, (139.8, 125.0)) is None  # 55 GiB fp32 base + 27.5 bf16
    assert "device memory" in cap.skip_reason(lora14, {}, {}, 1e9, 60, (79.2, 125.0))  # an H100
    lora32 = dict(lora14, shape="32b")
    assert "device memory" in cap.skip_reason(lora32, {}, {}, 1e9, 60, (139.8, 125.0))
    full7 = dict(full32, shape="7b")
    assert cap.skip_reason(full7, {}, {}, 1e9, 60, (139.8, 125.0)) is None  # 113.5 + 14.2 GiB: try it


def test_a_failed_child_is_classified_with_its_error_line():
    oom = "step\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nexit\n"
    assert cap.classify(1, oom) == ("oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    fits, line = cap.classify(1, "a\nValueError: bad shape\nb\n")
    assert fits == "error" and "ValueError: bad shape" in line
    assert cap.classify(1, "exitcode: -9 (pid: 3)\nSignals.SIGKILL\n")[0] == "killed"
