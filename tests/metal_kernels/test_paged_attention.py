"""Paged decode attention: the reference against float64 numpy, the launch plan, the dispatcher's
trust rule, and (where the hardware exists) the Metal and CUDA kernels against both.

CI runs on a CPU: there the GPU kernels' parity tests skip with the reason, and everything else
runs, the CPU's own formulation included.
The GPU sweep is the same function ``gpu_check.py`` runs, so a GPU run and CI check the same cases.
"""

from __future__ import annotations

import itertools
import logging

import mlx.core as mx
import numpy as np
import pytest

from metal_kernels.paged_attention import cpu, dispatch, reference
from metal_kernels.paged_attention.dispatch import PagedAttentionDispatcher, Signature
from metal_kernels.paged_attention.gpu_check import (
    lengths_for,
    max_error,
    naive_attention,
    parity,
)
from metal_kernels.paged_attention.metal import MAX_SPLITS, LaunchPlan
from metal_kernels.paged_attention.reference import random_case

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def run(fn, case, **extra):
    return fn(*case.args(), **case.kwargs(), **extra)


@pytest.mark.parametrize(
    ("dtype", "gqa", "block_size", "window"),
    list(itertools.product(DTYPES, (1, 2, 4, 8), (8, 16, 32), (None, 7))),
)
def test_reference_matches_naive_attention(dtype, gqa, block_size, window):
    lens = [*lengths_for(block_size, np.random.default_rng(gqa * block_size)), 0]
    case = random_case(
        lens,
        num_kv_heads=2,
        gqa=gqa,
        head_dim=64,
        block_size=block_size,
        dtype=dtype,
        window=window,
    )
    err = max_error(run(reference.paged_decode_attention, case), naive_attention(case))
    assert err <= dispatch.TOLERANCE[dtype], case.describe()


def test_length_zero_gives_zeros_and_window_wider_than_context_sees_everything():
    case = random_case([0, 9], num_kv_heads=1, gqa=2, head_dim=32, block_size=8, dtype=mx.float32)
    out = np.array(run(reference.paged_decode_attention, case))
    assert np.all(out[0] == 0) and np.all(np.isfinite(out))
    wide = random_case(
        [0, 9], num_kv_heads=1, gqa=2, head_dim=32, block_size=8, dtype=mx.float32, window=100
    )
    np.testing.assert_allclose(
        np.array(run(reference.paged_decode_attention, wide)), out, atol=1e-6
    )


def test_window_of_one_returns_the_newest_value():
    case = random_case(
        [13], num_kv_heads=1, gqa=1, head_dim=32, block_size=8, dtype=mx.float32, window=1
    )
    slot = int(case.block_tables[0, 1]) * 8 + 4  # token 12 = block 1, offset 4
    want = np.array(case.v_pool[slot, 0])
    np.testing.assert_allclose(
        np.array(run(reference.paged_decode_attention, case))[0, 0, 0], want, atol=1e-5
    )


@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256, 512])
def test_launch_plan_bounds_registers_and_covers_the_head(head_dim):
    for gqa in (1, 2, 4, 7, 8, 16):
        plan = LaunchPlan.choose(head_dim=head_dim, gqa=gqa, rows=8, max_tokens=4096)
        e = head_dim // plan.tpg
        assert head_dim % plan.tpg == 0 and 32 % plan.tpg == 0
        assert gqa % plan.hpb == 0 and (plan.hpb * e <= 32 or plan.hpb == 1)


def test_launch_plan_splits_long_small_batches_only():
    assert LaunchPlan.choose(head_dim=128, gqa=4, rows=8, max_tokens=8192).num_splits > 1
    assert LaunchPlan.choose(head_dim=128, gqa=4, rows=4096, max_tokens=8192).num_splits == 1
    assert LaunchPlan.choose(head_dim=128, gqa=4, rows=1, max_tokens=64).num_splits == 1
    assert (
        LaunchPlan.choose(head_dim=128, gqa=1, rows=1, max_tokens=1 << 20).num_splits == MAX_SPLITS
    )


# --- the dispatcher -------------------------------------------------------------------------


class FakeKernel:
    """A kernel stand-in: the reference, optionally made wrong or broken; counts its calls."""

    def __init__(self, offset: float = 0.0, fail: bool = False):
        self.offset, self.fail, self.calls = offset, fail, 0

    def __call__(
        self,
        q,
        k_pool,
        v_pool,
        block_tables,
        seq_lens,
        *,
        block_size,
        window,
        scale,
        num_splits=None,
    ):
        self.calls += 1
        if self.fail:
            raise RuntimeError("compile error: unknown identifier 'simd_shuffle_xor'")
        out = reference.paged_decode_attention(
            q,
            k_pool,
            v_pool,
            block_tables,
            seq_lens,
            block_size=block_size,
            window=window,
            scale=scale,
        )
        return out + self.offset


def small_case(dtype=mx.float16, window=None):
    return random_case(
        [3, 20], num_kv_heads=2, gqa=2, head_dim=64, block_size=16, dtype=dtype, window=window
    )


def test_cpu_dispatcher_runs_the_cpu_path_once_it_agrees_with_the_reference():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert dispatch.device_kernel() == ("cpu", cpu.paged_decode_attention)
        d = PagedAttentionDispatcher(*dispatch.device_kernel())
        case = small_case(mx.float32)
        got = run(d, case)
        assert d.trusted == {Signature(mx.float32, 64, 16, 2, False): True}
        assert mx.array_equal(got, run(cpu.paged_decode_attention, case))
        want = run(reference.paged_decode_attention, case)
        assert max_error(got, want) <= 1e-5
    finally:
        mx.set_default_device(previous)


@pytest.mark.parametrize(
    "fake", [FakeKernel(offset=0.25), FakeKernel(fail=True)], ids=["wrong", "raises"]
)
def test_untrustworthy_kernel_falls_back_to_the_reference_and_says_why(fake, caplog):
    d = PagedAttentionDispatcher("fake", fake)
    case = small_case()
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        first = run(d, case)
        second = run(d, case)
    want = run(reference.paged_decode_attention, case)
    assert mx.array_equal(first, want) and mx.array_equal(second, want)
    assert fake.calls == 1  # checked once, never again
    (record,) = caplog.records
    assert "disagrees with the reference" in record.getMessage()
    assert ("relative error" if not fake.fail else "compile error") in record.getMessage()


def test_trustworthy_kernel_is_checked_once_per_signature_then_used():
    fake = FakeKernel()
    d = PagedAttentionDispatcher("fake", fake)
    run(d, small_case())
    assert fake.calls == 3 + 1  # three split plans in the check, then the call
    run(d, small_case())
    assert fake.calls == 5
    run(d, small_case(window=4))  # a new signature: checked again
    assert fake.calls == 9
    assert d.trusted == {
        Signature(mx.float16, 64, 16, 2, False): True,
        Signature(mx.float16, 64, 16, 2, True): True,
    }


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_the_first_use_check_trusts_a_correct_kernel_in_every_dtype(dtype):
    """The check itself must work in each dtype (numpy has no bfloat16): a correct kernel is
    trusted, never turned away by an error in the comparison."""
    fake = FakeKernel()
    d = PagedAttentionDispatcher("fake", fake)
    run(d, small_case(dtype=dtype))
    assert d.trusted == {Signature(dtype, 64, 16, 2, False): True}


def test_unsupported_shapes_go_to_the_reference_without_a_check():
    fake = FakeKernel()
    d = PagedAttentionDispatcher("fake", fake)
    case = random_case([5], num_kv_heads=1, gqa=1, head_dim=80, block_size=16, dtype=mx.float16)
    assert mx.array_equal(run(d, case), run(reference.paged_decode_attention, case))
    assert fake.calls == 0


def test_modes_force_either_side(monkeypatch):
    wrong = FakeKernel(offset=1.0)
    case = small_case()
    forced = run(PagedAttentionDispatcher("fake", wrong, mode="kernel"), case)
    assert mx.array_equal(forced, run(reference.paged_decode_attention, case) + 1.0)
    assert run(PagedAttentionDispatcher("fake", wrong, mode="reference"), case) is not None
    assert wrong.calls == 1
    monkeypatch.setenv(dispatch.ENV_VAR, " Reference ")
    assert dispatch.mode_from_env() == "reference"
    monkeypatch.delenv(dispatch.ENV_VAR)
    assert dispatch.mode_from_env() == "auto"
    with pytest.raises(ValueError, match="expected one of auto, reference, kernel"):
        PagedAttentionDispatcher("fake", wrong, mode="fast")
    with pytest.raises(ValueError, match="has no kernel"):
        PagedAttentionDispatcher("cpu", None, mode="kernel")


# --- the kernels, where their hardware exists -------------------------------------------------


def assert_parity(kernel) -> None:
    report = parity(kernel, full=True)
    failures = [f for row in report.values() for f in row["failures"]]
    assert not failures, "\n".join(failures[:20])
    assert all(row["cases"] > 0 for row in report.values())


def test_cpu_path_rebuilds_its_row_index_when_the_tables_change():
    a = random_case([5, 40], num_kv_heads=2, gqa=2, head_dim=32, block_size=8, dtype=mx.float32)
    b = random_case([33, 2, 17], num_kv_heads=2, gqa=2, head_dim=32, block_size=8, dtype=mx.float32)
    c = random_case([9], num_kv_heads=4, gqa=1, head_dim=32, block_size=4, dtype=mx.float32)
    for case in (a, a, b, a, c, b):
        want = run(reference.paged_decode_attention, case)
        assert max_error(run(cpu.paged_decode_attention, case), want) <= 1e-5, case.describe()


def head_major(q, k_pool, v_pool, block_tables, seq_lens, *, block_size, window, scale):
    """The head-major CPU path behind the slot-major contract: the pools laid out as the
    CPU's store keeps them, [Hkv, slots, D]."""
    k, v = (mx.contiguous(p.transpose(1, 0, 2)) for p in (k_pool, v_pool))
    kw = {"block_size": block_size, "window": window, "scale": scale}
    return cpu.paged_decode_attention_head_major(q, k, v, block_tables, seq_lens, **kw)


def test_head_major_cpu_path_matches_naive_attention():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert_parity(head_major)
    finally:
        mx.set_default_device(previous)


def test_both_cpu_layouts_rebuild_their_index_when_tables_or_layout_change():
    """One step index per thread serves both layouts: each call with other tables, another
    block size or the other layout gets its own rows."""
    a = random_case([5, 40], num_kv_heads=2, gqa=2, head_dim=32, block_size=8, dtype=mx.float32)
    b = random_case([33, 2, 17], num_kv_heads=2, gqa=2, head_dim=32, block_size=8, dtype=mx.float32)
    c = random_case([9], num_kv_heads=4, gqa=1, head_dim=32, block_size=4, dtype=mx.float32)
    rows = cpu.paged_decode_attention
    for case, path in [(a, head_major), (a, rows), (a, head_major), (b, head_major),
                       (c, head_major), (c, rows)]:  # fmt: skip
        want = run(reference.paged_decode_attention, case)
        assert max_error(run(path, case), want) <= 1e-5, case.describe()


def test_cpu_path_matches_naive_attention():
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        assert_parity(cpu.paged_decode_attention)
    finally:
        mx.set_default_device(previous)


@pytest.mark.skipif(
    not mx.metal.is_available(), reason="needs a Metal GPU (macOS on Apple silicon)"
)
def test_metal_kernel_matches_naive_attention():
    from metal_kernels.paged_attention import metal

    assert_parity(metal.paged_decode_attention)


@pytest.mark.skipif(not mx.cuda.is_available(), reason="needs MLX's CUDA backend and an NVIDIA GPU")
def test_cuda_kernel_matches_naive_attention():
    from metal_kernels.paged_attention import cuda

    assert_parity(cuda.paged_decode_attention)
