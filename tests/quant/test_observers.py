"""Observers against torch.quantile, hand-computed EMA sequences and min/max; empty tensors ignored."""

from __future__ import annotations

import pytest
import torch

from fqn.quant.fake_quant import calc_qparams, fake_quantize, quant_range
from fqn.quant.observers import EMAMinMaxObserver, HistogramObserver, MinMaxObserver, PercentileObserver
from fqn.quant.range_search import L2HistogramObserver


def calibration_batches(seed: int = 0) -> list[torch.Tensor]:
    """Batches whose ranges grow and shift, so the histogram must re-grid several times."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3000, generator=g) * (1 + i) + 0.5 * i for i in range(8)] + [
        torch.relu(torch.randn(2, 8, 16, 16, generator=g)) * 20,  # a ReLU-like batch with many exact zeros
        torch.empty(0),
    ]


@pytest.mark.parametrize("gamma", [0.999, 0.9973, 0.9545])
def test_percentile_matches_torch_quantile_within_one_bin(gamma):
    batches = calibration_batches()
    obs = PercentileObserver(gamma, bins=2048)
    for b in batches:
        obs(b)
    data = torch.cat([b.flatten() for b in batches]).double()
    lb, ub = obs.compute_range()
    w = obs.bin_width
    assert w <= (data.max() - data.min()) / 1024  # the grid is fine: at least half the bins in use
    assert abs(float(lb) - float(torch.quantile(data, 1 - gamma))) <= w
    assert abs(float(ub) - float(torch.quantile(data, gamma))) <= w
    assert obs.counts.sum() == data.numel()  # re-gridding lost no count


def test_histogram_counts_are_exact_after_regridding():
    g = torch.Generator().manual_seed(1)
    obs = HistogramObserver(bins=256)
    batches = [torch.rand(500, generator=g) * 0.01, torch.rand(500, generator=g) * 50 - 20, torch.randn(500) * 3]
    for b in batches:
        obs(b)
    data = torch.cat(batches).double()
    w, k0 = obs.bin_width, int(obs.kmin)
    edges = torch.arange(k0, k0 + 257, dtype=torch.float64) * w
    expected = torch.histogram(data, bins=edges).hist
    expected[-1] += (data == edges[-1]).sum()  # torch.histogram closes the last bin; ours is half-open
    assert torch.equal(obs.counts, expected)


def test_ema_matches_hand_computed_sequence():
    obs = EMAMinMaxObserver(momentum=0.9)
    xs = [torch.tensor([-1.0, 2.0]), torch.empty(0), torch.tensor([-3.0, 4.0, 0.5]), torch.tensor([0.0, 1.0])]
    for x in xs:
        obs(x)
    lo = -1.0
    hi = 2.0
    lo, hi = 0.9 * lo + 0.1 * -3.0, 0.9 * hi + 0.1 * 4.0
    lo, hi = 0.9 * lo + 0.1 * 0.0, 0.9 * hi + 0.1 * 1.0
    got_lo, got_hi = obs.compute_range()
    assert float(got_lo) == pytest.approx(lo, abs=1e-6)
    assert float(got_hi) == pytest.approx(hi, abs=1e-6)
    assert obs.has_data


@pytest.mark.parametrize("make", [MinMaxObserver, EMAMinMaxObserver, PercentileObserver, L2HistogramObserver])
def test_empty_tensors_are_ignored(make):
    obs = make()
    obs(torch.empty(0, 4))
    assert not obs.has_data
    x = torch.linspace(-2, 5, 1001)
    obs(x)
    before = [t.clone() for t in obs.compute_range()]
    obs(torch.empty(0))
    obs(torch.empty(0, 256, 7, 7))
    after = obs.compute_range()
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert obs.has_data
    empty = make()
    empty(torch.empty(0))
    assert not empty.has_data  # an empty tensor is not data: the quantizer keeps no range from it


def test_minmax_per_channel_matches_torch():
    w = torch.randn(5, 4, 3, 3)
    obs = MinMaxObserver(ch_axis=0, num_channels=5, accumulate=False)
    obs(w * 10)
    obs(w)
    lo, hi = obs.compute_range()
    assert torch.equal(lo, w.amin(dim=(1, 2, 3)))
    assert torch.equal(hi, w.amax(dim=(1, 2, 3)))
    acc = MinMaxObserver()
    acc(torch.tensor([1.0, 2.0]))
    acc(torch.tensor([-4.0, 0.0]))
    assert acc.compute_range() == (torch.tensor([-4.0]), torch.tensor([2.0]))


def quant_mse(x: torch.Tensor, lb: torch.Tensor, ub: torch.Tensor, bits: int) -> float:
    scale, zp = calc_qparams(lb, ub, bits, False)
    qmin, qmax = quant_range(bits, False)
    return float((fake_quantize(x, scale, zp, qmin, qmax) - x).pow(2).mean())


@pytest.mark.parametrize("bits", [4, 8])
def test_l2_histogram_range_beats_minmax_on_outliers(bits):
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(200000, generator=g), torch.tensor([40.0, -35.0])])  # two outliers
    l2 = L2HistogramObserver(bits=bits)
    mm = MinMaxObserver()
    l2(x)
    mm(x)
    lb, ub = l2.compute_range()
    mse_l2, mse_mm = quant_mse(x, lb, ub, bits), quant_mse(x, *mm.compute_range(), bits)
    assert mse_l2 <= mse_mm * 1.001  # never worse than the full range it could have chosen
    if bits == 4:  # at 4 bits clipping the two outliers pays: 16 levels over [-35, 40] are too coarse
        assert -35.0 < float(lb) < 0 < float(ub) < 40.0
        assert mse_l2 < 0.5 * mse_mm


def _torch_fq_mse(x: torch.Tensor, lb: float, ub: float, bits: int) -> float:
    """Reference: the MSE of torch's own fake quantizer on the data, for the scale/zero point of [lb, ub]."""
    scale, zp = calc_qparams(torch.tensor([lb]), torch.tensor([ub]), bits, False)
    y = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), 0, 2**bits - 1)
    return float((y.double() - x.double()).pow(2).mean())


def _logit_like(seed: int = 5) -> torch.Tensor:
    """Class-logit-like data: a mass of low scores and a rare tail of confident ones (the top detections)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(200000, generator=g) - 5.0, 6.0 + 4.0 * torch.rand(60, generator=g)])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["outliers", "logits", "relu"])
def test_search_measures_the_error_torch_fake_quantize_makes_and_picks_the_least(bits, kind):
    from fqn.quant.range_search import SearchObserver

    g = torch.Generator().manual_seed(11)
    x = {"outliers": torch.cat([torch.randn(200000, generator=g), torch.tensor([40.0, -35.0])]),
         "logits": _logit_like(),
         "relu": torch.relu(torch.randn(200000, generator=g) * 2)}[kind]
    obs = SearchObserver(bits)
    for part in x.split(50000):
        obs(part)
    ranges = obs.candidate_ranges()
    reference = {name: _torch_fq_mse(x, *r, bits) for name, r in ranges.items()}
    for name, (lb, ub) in ranges.items():  # the histogram's estimate is the real error, within 10%
        assert obs.quant_error(lb, ub) == pytest.approx(reference[name], rel=0.1), name
    lb, ub = obs.compute_range()
    chosen = _torch_fq_mse(x, float(lb), float(ub), bits)
    assert chosen <= min(reference.values()) * 1.1
    assert obs.chosen in SearchObserver.CANDIDATES and ranges[obs.chosen] == (float(lb), float(ub))


def test_search_keeps_the_confident_logits_that_percentile_clips():
    """At 8 bits the 0.999 percentile cuts the rare large logits (the top detections). MSE alone still clips
    a fifth of them (they are 0.03% of the values), so head outputs search with ``keep_top``."""
    from fqn.quant.range_search import SearchObserver

    x = _logit_like()
    tail = x[x > 5.0]
    pct, mse_only, head = PercentileObserver(0.999), SearchObserver(8), SearchObserver(8)
    head.keep_top = True
    for obs in (pct, mse_only, head):
        obs(x)
    assert float(pct.compute_range()[1]) < 0  # every confident score would be clipped below zero
    assert float((tail > float(mse_only.compute_range()[1])).float().mean()) > 0.05
    lb, ub = head.compute_range()
    assert float(ub) == float(x.max()) and float(lb) >= float(x.min())
    assert _torch_fq_mse(x, float(lb), float(ub), 8) <= _torch_fq_mse(x, float(x.min()), float(x.max()), 8)


def test_search_choice_is_saved_and_reset():
    from fqn.quant.range_search import SearchObserver

    obs = SearchObserver(8)
    assert obs.chosen is None
    obs(_logit_like())
    obs.compute_range()
    again = SearchObserver(8)
    again.load_state_dict(obs.state_dict())
    assert again.chosen == obs.chosen is not None
    again.reset()
    assert again.chosen is None and not again.has_data


def test_prepare_marks_exactly_the_head_outputs_for_keep_top():
    from fqn import QuantConfig, build_detector, prepare_qat
    from fqn.quant.fake_quant import quantizers

    model = prepare_qat(build_detector("resnet18", 3, min_size=64, max_size=64),
                        QuantConfig(percentile=False, act_observer="search"))
    marked = {n for n, fq in quantizers(model, "act") if fq.observer.keep_top}
    rpn = model.rpn.head
    expected = {f"rpn.head.{table}.0.{i}" for table in ("cls_fq", "bbox_fq") for i in range(len(rpn.cls_fq[0]))}
    expected |= {"roi_heads.box_predictor.cls_score.act_fq", "roi_heads.box_predictor.bbox_pred.act_fq"}
    assert marked == expected
    four_bit = prepare_qat(build_detector("resnet18", 3, min_size=64, max_size=64),
                           QuantConfig(bits_w=4, bits_a=4, percentile=False, act_observer="search"))
    assert not any(fq.observer.keep_top for _, fq in quantizers(four_bit, "act"))  # 16 levels: keep the bulk
