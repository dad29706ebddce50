"""On-device reductions: exact moments, sampled zero fraction, one host copy."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from provscope.pytorch import stats as ts  # noqa: E402

pytestmark = pytest.mark.torch


def test_large_cpu_activation_estimates_zero_fraction_and_keeps_exact_moments():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1024, generator=g)
    x[torch.rand(1024, 1024, generator=g) < 0.3] = 0.0
    m = ts.activation_moments(x)
    assert m.counted == ts.ZERO_SAMPLE < m.numel
    (fields,), extra = ts.to_host([m], [torch.tensor(2.0)], torch.device("cpu"))
    assert extra == [2.0]
    assert fields["activation_zero_fraction"] == pytest.approx(0.3, abs=0.02)
    assert fields["activation_mean"] == pytest.approx(x.mean().item(), abs=1e-6)
    assert fields["activation_abs_max"] == pytest.approx(x.abs().max().item())


def test_non_contiguous_activation_is_counted_exactly():
    x = torch.zeros(300, 200).t()  # a transposed view
    x[0, :100] = 1.0
    m = ts.activation_moments(x)
    (fields,), _ = ts.to_host([m], [], torch.device("cpu"))
    assert m.counted == x.numel()
    assert fields["activation_zero_fraction"] == pytest.approx(1 - 100 / x.numel())


@pytest.mark.parametrize("tensor", [
    torch.arange(6),
    torch.ones(3, dtype=torch.bool),
    torch.zeros(0),
    torch.ones(2, 2).to_sparse(),
    torch.ones(2, dtype=torch.complex64),
])
def test_tensors_without_activation_statistics_return_none(tensor):
    assert ts.activation_moments(tensor) is None


def test_activation_fields_turn_nan_into_nan_statistics_not_errors():
    fields = ts.activation_fields((math.nan, math.nan, math.nan, math.nan, 3, 1, 0), 4)
    assert math.isnan(fields["activation_mean"]) and math.isnan(fields["activation_std"])
    assert fields["activation_nan_elements"] == 1 and fields["activation_zero_fraction"] == 0.25


def test_first_tensor_prefers_floating_values_of_containers():
    mask, y = torch.ones(2, dtype=torch.bool), torch.ones(2)
    assert ts.first_tensor({"mask": mask, "y": y}) is y
    assert ts.first_tensor((None, mask)) is mask
    assert ts.first_tensor([None, "x"]) is None
    assert ts.first_tensor(None) is None


def test_update_difference_and_global_norm():
    before = ts.snapshot([torch.ones(3), torch.zeros(2)])
    after = [torch.full((3,), 2.0), torch.ones(2)]
    diff = ts.difference(after, before)
    assert [d.tolist() for d in diff] == [[1.0, 1.0, 1.0], [1.0, 1.0]]
    norms = ts.foreach_norms(diff)
    assert ts.total_norm(norms).item() == pytest.approx(math.sqrt(5))
