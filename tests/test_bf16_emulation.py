"""bench/bf16_emulated.py: bf16 GEMMs done in float32 and rounded once stand in for native bf16 arithmetic."""
import torch

from conftest import load_bench


def test_emulated_bf16_is_much_closer_to_native_bf16_than_bf16_is_to_float32():
    bench = load_bench("bf16_emulated")
    before = bench.TensorCoreBf16.count
    errors = bench.compare(bench.tiny_dit(size=16, depth=2), batch=16)
    assert bench.TensorCoreBf16.count > before  # the DiT's GEMMs went through the emulation
    for i in (0, 1):  # output, gradient to the input
        assert errors["bf16"][i] > 1e-3  # bf16 really rounds
        assert abs(errors["emulated"][i] - errors["bf16"][i]) < 0.25 * errors["bf16"][i]
        assert errors["emulated vs bf16"][i] < 0.5 * errors["bf16"][i]


def test_float32_gemms_pass_through_unchanged():
    bench = load_bench("bf16_emulated")
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    expected, before = a @ b, bench.TensorCoreBf16.count
    with bench.TensorCoreBf16():
        assert torch.equal(a @ b, expected)
        assert bench.TensorCoreBf16.count == before
        assert (a.bfloat16() @ b.bfloat16()).dtype == torch.bfloat16
        assert bench.TensorCoreBf16.count == before + 1
