"""What users log becoming numpy (normlog._convert, normlog.torch._convert): torch tensors of
any dtype read as torch reads them, bfloat16 and float8 without a full-size copy, and the
tensors that hold no readable values refused with a TypeError that names the tag and says
what to pass instead."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import normlog
from helpers import requires

torch = requires("torch")

BIT_VIEWS = ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"]
METHODS = ["add_histogram", "add_norm", "add_stats", "add_scalar"]


def every_bit_pattern(name: str) -> torch.Tensor:
    dtype = getattr(torch, name, None)
    if dtype is None:
        pytest.skip(f"torch {torch.__version__} has no {name}")
    if dtype.itemsize == 2:
        return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)


@pytest.mark.parametrize("name", BIT_VIEWS)
def test_bfloat16_and_float8_values_are_torchs_own_every_bit_pattern(name: str) -> None:
    from normlog._convert import to_numpy

    values = every_bit_pattern(name)
    expected = values.double().numpy()  # torch's own conversion is the reference
    with warnings.catch_warnings():
        # numpy warns casting bfloat16's signalling NaNs (bit patterns torch never makes)
        warnings.simplefilter("ignore", RuntimeWarning)
        got = np.asarray(to_numpy(values), dtype=np.float64)
        got_histogram = normlog.histogram(to_numpy(values))
    np.testing.assert_array_equal(got, expected)  # NaN where NaN, Inf where Inf
    numbers = ~np.isnan(expected)  # the fnuz formats' one NaN (0x80) has its sign bit set in torch only
    np.testing.assert_array_equal(np.signbit(got[numbers]), np.signbit(expected[numbers]))  # -0.0 too
    # and what the Writer bins: the histogram of torch's float32 values, bucket for bucket
    expected_histogram = normlog.histogram(values.float().numpy())
    np.testing.assert_array_equal(got_histogram.counts, expected_histogram.counts)
    assert (got_histogram.nan, got_histogram.posinf, got_histogram.neginf) == (
        expected_histogram.nan,
        expected_histogram.posinf,
        expected_histogram.neginf,
    )


def test_bfloat16_views_of_strided_and_device_tensors(tmp_path) -> None:
    # a transposed, sliced bfloat16 tensor is read through its strides, never reordered wrong
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(300, 200, generator=generator).to(torch.bfloat16)
    view = base.t()[5:150:3]
    writer = normlog.Writer(str(tmp_path))
    got = writer.add_histogram("w/bf16", view, 0, bins=17)
    expected = normlog.histogram(view.float().contiguous().numpy(), 17)
    np.testing.assert_array_equal(got.counts, expected.counts)
    assert (got.min, got.max, got.num) == (expected.min, expected.max, expected.num)
    assert writer.add_norm("w/bf16_norm", view, 0) == pytest.approx(float(view.double().norm()), rel=1e-12)
    writer.close()


def test_lazy_negative_and_conjugate_views_are_read_resolved(tmp_path) -> None:
    values = torch.linspace(-3, 5, 101)
    negative = values._neg_view()  # what torch's autograd can hand back for -x
    writer = normlog.Writer(str(tmp_path))
    got = writer.add_stats("w/negated", negative, 0)
    assert (got.min, got.max) == (-5.0, 3.0)
    with pytest.raises(TypeError, match=r"tag 'w/conj': complex values"):  # the core's refusal, not torch's
        writer.add_histogram("w/conj", torch.ones(3, dtype=torch.complex64).conj(), 0)
    writer.close()


def unreadable_tensors() -> dict[str, tuple[object, str]]:
    """name -> (a tensor that holds no readable values, what its error must advise)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested and quantized tensors' prototype/deprecation notes
        cases: dict[str, tuple[object, str]] = {
            "meta": (torch.empty(4, 4, device="meta"), "meta tensor .*holds data"),
            "nested": (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), r"tensor\.unbind\(\)"),
            "nested jagged": (
                torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
                r"tensor\.unbind\(\)",
            ),
            "quantized": (torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8), r"tensor\.dequantize\(\)"),
        }
        with FakeTensorMode():
            fake = torch.ones(3)
        cases["fake"] = (fake, "outside the compiled function")
        if hasattr(torch, "float4_e2m1fn_x2"):
            packed = torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
            cases["float4 packed"] = (packed, "convert them to float32")
    return cases


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(unreadable_tensors()))
def test_tensors_without_readable_values_raise_type_error_naming_the_tag(tmp_path, case: str, method: str) -> None:
    tensor, advice = unreadable_tensors()[case]
    writer = normlog.Writer(str(tmp_path))
    with pytest.raises(TypeError, match=rf"^normlog: tag 'layer/bad': .*{advice}"):
        getattr(writer, method)("layer/bad", tensor, 0)
    writer.close()


def test_tensors_inside_torch_func_transforms_raise_type_error_naming_the_tag(tmp_path) -> None:
    writer = normlog.Writer(str(tmp_path))
    raised: list[BaseException] = []

    def log(x: torch.Tensor) -> torch.Tensor:
        try:
            writer.add_histogram("layer/batched", x, 0)
        except BaseException as error:
            raised.append(error)
        return x

    torch.vmap(log)(torch.ones(2, 3))
    writer.close()
    assert len(raised) == 1 and isinstance(raised[0], TypeError)
    assert str(raised[0]).startswith("normlog: tag 'layer/batched': ") and "torch.func" in str(raised[0])


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=os.environ
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


PEAK = """
    import resource, tempfile
    import torch, normlog
    dtype = getattr(torch, {name!r})
    n = 20_000_000
    # made without a float32 step, so that the high-water mark is where the memory is
    if dtype.itemsize == 2:
        values = torch.empty(n, dtype=dtype).normal_()
    else:
        values = torch.randint(0, 120, (n,), dtype=torch.uint8).view(dtype)
    writer = normlog.Writer(tempfile.mkdtemp())
    writer.add_histogram("warm", values[:1000].clone(), 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    histogram = writer.add_histogram("big", values, 0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    writer.close()
    print(histogram.num + histogram.nan + histogram.posinf + histogram.neginf, (after - before) / 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kB on Linux")
@pytest.mark.parametrize("name", ["bfloat16", "float8_e4m3fn"])
def test_bfloat16_and_float8_cost_no_full_size_copy(name: str) -> None:
    # 20M values: a float32 copy alone is 80 MB (the conversion used to make one: +116 MB
    # peak); the core's float64 chunks cost ~40 MB whatever the size, as for float16
    requires("ml_dtypes")
    count, extra_megabytes = run_python(PEAK.format(name=name)).split()
    assert int(count) == 20_000_000
    assert float(extra_megabytes) < 64


def test_without_ml_dtypes_bfloat16_is_read_through_a_float32_copy() -> None:
    out = run_python(
        """
        import sys
        sys.modules["ml_dtypes"] = None  # not installed
        import torch
        values = torch.linspace(-7, 9, 1001).to(torch.bfloat16)
        from normlog._convert import to_numpy
        array = to_numpy(values)
        print(array.dtype, bool((array == values.float().numpy()).all()))
        """
    )
    assert out == "float32 True"
