"""QuantConfig validation and its round trip through a plain dict."""

from __future__ import annotations

import json

import pytest

from fqn import QuantConfig


def test_defaults_are_the_papers():
    cfg = QuantConfig()
    assert (cfg.freeze_bn, cfg.percentile, cfg.per_channel) == (True, True, True)
    assert cfg.gamma == 0.999 and cfg.n_cal == 20
    assert cfg.activation_observer == "percentile" and cfg.flags == "FPC"
    assert QuantConfig(freeze_bn=False, percentile=False, per_channel=False).flags == "-"
    assert QuantConfig(percentile=False).activation_observer == "ema"


def test_round_trips_through_json():
    cfg = QuantConfig(bits_w=4, bits_a=4, freeze_bn=False, freeze_bn_last_steps=100, keep_float=["roi_heads.*"],
                      percentile=False, act_observer="histogram")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert QuantConfig.from_dict(d) == cfg
    assert d["keep_float"] == ["roi_heads.*"]


@pytest.mark.parametrize("kwargs,match", [
    ({"bits_w": 1}, "bits_w"),
    ({"bits_a": 9}, "bits_a"),
    ({"bits_w": 4.0}, "bits_w"),
    ({"bits_w": True}, "bits_w"),
    ({"gamma": 1.0}, "gamma"),
    ({"gamma": 0.3}, "gamma"),
    ({"n_cal": 0}, "n_cal"),
    ({"ema_momentum": 1.0}, "ema_momentum"),
    ({"freeze_bn_last_steps": 10}, "freeze_bn=false"),
    ({"freeze_bn": False, "freeze_bn_last_steps": 0}, "freeze_bn_last_steps"),
    ({"keep_float": "roi_heads.*"}, "list"),
    ({"keep_float": [""]}, "keep_float"),
    ({"act_observer": "kl"}, "act_observer"),
    ({"act_observer": "minmax"}, "percentile=false"),
    ({"per_channel": "yes"}, "per_channel"),
    ({"histogram_bins": 8}, "histogram_bins"),
])
def test_invalid_values_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantConfig(**kwargs)


def test_unknown_keys_are_errors():
    with pytest.raises(ValueError, match="unknown QuantConfig keys"):
        QuantConfig.from_dict({"bits": 4})
