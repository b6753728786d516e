"""tools/bench_train_step.py: a row per (precision, quant, pooler), times measured, ratios and JSON written."""

from __future__ import annotations

import json

import pytest

from . import load_tool

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out


def test_times_float_and_qat_steps_per_precision(tmp_path, capsys):
    tool = load_tool("bench_train_step")
    rows = tool.main(["--size", "64", "--batch", "1", "--steps", "1", "--warmup", "0", "--quant", "8",
                      "--poolers", "fqn", "--precision", "32-true", "bf16-mixed", "--cal-batches", "2",
                      "--threads", "1", "--out", str(tmp_path / "t.json")])
    assert [(r["precision"], r["quant"]) for r in rows] == [("32-true", "float"), ("32-true", "w8a8"),
                                                             ("bf16-mixed", "float"), ("bf16-mixed", "w8a8")]
    assert all(r["s_per_step"] > 0 and r["peak_MB"] is None for r in rows)  # no GPU memory on a CPU
    for flt, qat in (rows[:2], rows[2:]):  # each QAT row against the float row of its own precision
        assert flt["qat_over_fp32"] is None and flt["cal_s"] is None
        assert qat["qat_over_fp32"] == pytest.approx(qat["s_per_step"] / flt["s_per_step"]) and qat["cal_s"] > 0
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["device"].startswith("CPU")
    assert "| resnet18 | 64 | 1 | bf16-mixed | – | w8a8 | fqn |" in capsys.readouterr().out


def test_a_compiled_backbone_is_timed_too():
    rows = load_tool("bench_train_step").main(["--size", "64", "--batch", "1", "--steps", "1", "--warmup", "0",
                                               "--quant", "4", "--poolers", "fqn", "--compile", "eager",
                                               "--threads", "1"])
    assert [(r["quant"], r["compile"]) for r in rows] == [("float", "eager"), ("w4a4", "eager")]
    assert all(r["s_per_step"] > 0 for r in rows)


def test_a_cuda_device_is_refused_where_there_is_none(capsys):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        load_tool("bench_train_step").main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
