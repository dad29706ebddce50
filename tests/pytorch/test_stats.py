"""On-device reductions: exact statistics through the bounded workspace, one host copy."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from provscope.pytorch import stats as ts  # noqa: E402

pytestmark = pytest.mark.torch


def _reference(x: torch.Tensor) -> dict[str, float]:
    v = x.detach().double()
    return {"activation_mean": v.mean().item(),
            "activation_std": v.std(correction=0).item(),
            "activation_abs_max": v.abs().max().item(),
            "activation_zero_fraction": (v == 0).double().mean().item()}


def _collect(tensors: list[torch.Tensor], stats: ts.ActivationStats | None = None,
             steps: int = 2) -> dict[int, dict[str, float]]:
    """Take every tensor as one layer's activation, ``steps`` sampled steps in a row (the
    first without a workspace, the next ones through it); the last step's fields."""
    stats = stats or ts.ActivationStats()
    out: dict[int, dict[str, float]] = {}
    for _ in range(steps):
        for i, x in enumerate(tensors):
            assert stats.add(i, x)
        out = stats.collect()
    return out


def _assert_matches(fields: dict[str, float], x: torch.Tensor, rel: float = 1e-5) -> None:
    ref = _reference(x)
    for key, value in ref.items():
        # std comes from fp32 first and second moments: exact to about 1e-3 of |mean|
        # when the spread is far below the mean (a constant tensor).
        slack = 1e-3 * abs(ref["activation_mean"]) if key == "activation_std" else 1e-6
        assert fields[key] == pytest.approx(value, rel=rel, abs=max(slack, 1e-6)), key
    assert fields["activation_nan_elements"] == fields["activation_inf_elements"] == 0


def test_statistics_are_exact_for_small_big_low_precision_and_strided_activations():
    g = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(8, 300, generator=g))  # zeros: a real zero fraction
    big = torch.randn(3 * ts.SMALL_ROWS * ts.ROW + 7, generator=g)  # reduced in pieces
    bf16 = torch.randn(64, 129, generator=g).bfloat16()
    strided = torch.randn(200, 300, generator=g).t()  # a transposed view
    big_strided = torch.randn(600, 400, generator=g).t()
    tensors = [relu, big, bf16, strided, big_strided, torch.ones(1) * 3.0]
    fields = _collect(tensors)
    for i, x in enumerate(tensors):
        _assert_matches(fields[i], x)
    assert fields[0]["activation_zero_fraction"] == pytest.approx(
        (relu == 0).double().mean().item())


def test_the_copy_is_taken_at_once_so_later_in_place_changes_do_not_count():
    x = torch.arange(1.0, 2049.0)
    stats = ts.ActivationStats()
    for _ in range(2):  # the second step goes through the workspace slot
        before = x.clone()
        stats.add(0, x)
        x.zero_()  # an in-place ReLU after the layer
        fields = stats.collect()
        _assert_matches(fields[0], before)
        x.copy_(before)


def test_nan_and_inf_are_counted_exactly_in_slots_and_in_pieces():
    small = torch.randn(100)
    small[[3, 7]] = math.nan
    small[9] = math.inf
    big = torch.randn(2 * ts.SMALL_ROWS * ts.ROW)
    big[::1000] = -math.inf
    fields = _collect([small, big])
    assert fields[0]["activation_nan_elements"] == 2
    assert fields[0]["activation_inf_elements"] == 1
    assert math.isnan(fields[0]["activation_mean"])
    assert fields[1]["activation_inf_elements"] == len(range(0, big.numel(), 1000))
    assert fields[1]["activation_nan_elements"] == 0


def test_a_shape_change_between_steps_leaves_no_stale_padding():
    stats = ts.ActivationStats()
    _collect([torch.randn(4, 1000)], stats, steps=2)
    smaller = torch.full((2, 300), 2.0)
    fields = _collect([smaller], stats, steps=1)
    _assert_matches(fields[0], smaller)


def test_the_workspace_is_bounded_and_overflow_is_reduced_directly():
    stats = ts.ActivationStats(capacity_rows=3)  # room for three one-row layers
    tensors = [torch.randn(500) + i for i in range(10)]
    fields = _collect(tensors, stats, steps=3)
    for i, x in enumerate(tensors):
        _assert_matches(fields[i], x)
    (space,) = stats._spaces.values()
    assert space.block.numel() == 3 * ts.ROW


@pytest.mark.parametrize("tensor", [
    torch.arange(6),
    torch.ones(3, dtype=torch.bool),
    torch.zeros(0),
    torch.ones(2, 2).to_sparse(),
    torch.ones(2, dtype=torch.complex64),
])
def test_tensors_without_activation_statistics_are_refused(tensor):
    assert ts.ActivationStats().add(0, tensor) is False


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


def test_norms_of_low_precision_tensors_need_no_fp32_copy_and_are_close():
    w = torch.randn(300, 300).bfloat16()
    (norm,) = ts.param_norms([w])
    # The CPU reduces bf16 in fp32 and rounds the result to bf16: no full-size copy.
    assert norm.dtype == torch.bfloat16
    assert float(norm) == pytest.approx(w.double().norm().item(), rel=2 ** -7)


def test_update_difference_and_global_norm():
    before = ts.snapshot([torch.ones(3), torch.zeros(2)])
    after = [torch.full((3,), 2.0), torch.ones(2)]
    diff = ts.difference(after, before)
    assert [d.tolist() for d in diff] == [[-1.0, -1.0, -1.0], [-1.0, -1.0]]
    norms = ts.param_norms(diff)
    assert ts.total_norm(norms).item() == pytest.approx(math.sqrt(5))


def test_big_cpu_activations_estimate_the_zero_fraction_and_keep_exact_moments():
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(512, 2048, generator=g))  # reduced in pieces
    fields = _collect([x])[0]
    assert fields["activation_zero_fraction"] == pytest.approx(
        (x == 0).double().mean().item(), abs=0.02)
    ref = _reference(x)
    for key in ("activation_mean", "activation_std", "activation_abs_max"):
        assert fields[key] == pytest.approx(ref[key], rel=1e-5)
