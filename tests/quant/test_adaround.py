"""AdaRound's primitives against the paper's formulas written out element by element, and learned rounding
lowering a layer's output error below nearest rounding on fixed data (an optimiser that does not move fails)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fqn.quant.adaround import (
    beta_schedule,
    hard_codes,
    initial_rounding,
    learn_rounding,
    rectified_sigmoid,
    rounding_regularizer,
    soft_quantize,
)
from fqn.quant.qparams import calc_qparams, fake_quantize


def _h(v: float) -> float:
    return min(max(1 / (1 + math.exp(-v)) * 1.2 - 0.1, 0.0), 1.0)  # zeta = 1.1, gamma = -0.1


def test_rectified_sigmoid_and_regulariser_match_the_paper():
    v = torch.tensor([-8.0, -2.5, -0.3, 0.0, 0.7, 2.5, 8.0])
    h = rectified_sigmoid(v)
    assert h.tolist() == pytest.approx([_h(x) for x in v.tolist()], abs=1e-6)
    assert h[0] == 0.0 and h[-1] == 1.0  # exactly 0 and 1 beyond the stretched ends
    for beta in (2.0, 20.0):
        ref = sum(1 - abs(2 * _h(x) - 1) ** beta for x in v.tolist())
        assert float(rounding_regularizer(v, beta)) == pytest.approx(ref, rel=1e-5)
    assert float(rounding_regularizer(torch.tensor([-9.0, 9.0]), 2.0)) == 0.0  # decided: no penalty
    assert float(rounding_regularizer(torch.tensor([0.0]), 2.0)) == pytest.approx(1.0)  # h = 1/2: the most


def test_soft_weight_starts_at_the_float_weight_and_hard_codes_at_nearest():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g) * 0.3
    scale, zp = calc_qparams(w.amin(1), w.amax(1), 4, True)
    v = initial_rounding(w, scale, axis=0)
    s = scale.reshape(-1, 1)
    soft = soft_quantize(w, scale, zp, v, -7, 7, axis=0)
    inside = (w / s).abs() < 7
    assert torch.allclose(soft[inside], w[inside], atol=2e-4 * float(s.max()))
    frac = w / s - torch.floor(w / s)
    away_from_half = (frac - 0.5).abs() > 1e-3
    nearest = torch.round(w / s).clamp(-7, 7)
    codes = hard_codes(w, scale, zp, v, -7, 7, axis=0)
    assert torch.equal(codes[away_from_half].float(), nearest[away_from_half])
    # per tensor, asymmetric: codes are floor(w / s) + [h >= 0.5] + z, clipped, written out by hand
    s1, z1 = calc_qparams(w.min().reshape(1), w.max().reshape(1), 4, False)
    v1 = torch.randn(w.shape, generator=g)
    hand = [[min(max(math.floor(x / float(s1)) + (_h(vv) >= 0.5) + int(z1), 0), 15) for x, vv in zip(rw, rv)]
            for rw, rv in zip(w.tolist(), v1.tolist())]
    assert hard_codes(w, s1, z1, v1, 0, 15).tolist() == hand


def test_beta_schedule_warms_up_then_anneals_from_20_to_2():
    assert [beta_schedule(i, 10) for i in (0, 1)] == [None, None]
    assert beta_schedule(2, 10) == pytest.approx(20.0) and beta_schedule(9, 10) == pytest.approx(2.0)
    assert beta_schedule(5, 10) == pytest.approx(20.0 - 18.0 * 3 / 7)
    with pytest.raises(ValueError):
        beta_schedule(0, 10, warmup=1.0)


@pytest.mark.parametrize("lr", [1e-2, 0.0])
def test_learned_rounding_beats_nearest_on_a_layer(lr):
    """4-bit linear layer, fixed inputs: the learned codes' output error is below nearest rounding's. With a
    learning rate of 0 (an optimiser that does not move), the codes stay nearest and the test must fail."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g) * 0.2
    x = torch.randn(256, 32, generator=g) + 0.3 * torch.randn(1, 32, generator=g)  # correlated, biased inputs
    target = F.linear(x, w)
    scale, zp = calc_qparams(w.amin(1), w.amax(1), 4, True)
    nearest = fake_quantize(w, scale, zp, -7, 7, axis=0)
    v = learn_rounding(w, scale, zp, -7, 7, 0, F.linear, x, target, iters=1000, lr=lr)
    learned = (hard_codes(w, scale, zp, v, -7, 7, axis=0).float() - zp.reshape(-1, 1)) * scale.reshape(-1, 1)
    err_nearest = float((F.linear(x, nearest) - target).pow(2).mean())
    err_learned = float((F.linear(x, learned) - target).pow(2).mean())
    decided = ((rectified_sigmoid(v) == 0) | (rectified_sigmoid(v) == 1)).float().mean()
    if lr == 0.0:
        assert err_learned == pytest.approx(err_nearest, rel=1e-6)  # what a no-op gives: no better than nearest
        return
    assert err_learned < 0.9 * err_nearest, (err_learned, err_nearest)  # measured: 0.858 of nearest's
    assert float(decided) > 0.95  # the regulariser drove the soft offsets to 0 or 1 (measured 0.98)
    assert (learned - w).abs().le(scale.reshape(-1, 1) * (1 + 1e-5)).all()  # each weight rounded down or up only
