"""tools/bench_train_step.py: a row per (quant, pooler), times measured, JSON written."""

from __future__ import annotations

import json

from . import load_tool


def test_times_float_and_qat_steps_with_both_poolers(tmp_path, capsys):
    tool = load_tool("bench_train_step")
    rows = tool.main(["--size", "64", "--batch", "1", "--steps", "1", "--warmup", "0", "--quant", "8",
                      "--threads", "1", "--out", str(tmp_path / "t.json")])
    assert [(r["quant"], r["pooler"]) for r in rows] == [("float", "fqn"), ("float", "torchvision"),
                                                          ("w8a8", "fqn"), ("w8a8", "torchvision")]
    assert all(r["s_per_step"] > 0 for r in rows)
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "| resnet18 | 64 | 1 | w8a8 | torchvision |" in capsys.readouterr().out
