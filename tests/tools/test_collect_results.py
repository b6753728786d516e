"""tools/collect_results.py reads FP32/PTQ/QAT rows back from TensorBoard event files."""

from __future__ import annotations

import json

from torch.utils.tensorboard import SummaryWriter

from . import load_tool


def test_collects_last_values_and_ptq_rows(tmp_path, capsys):
    for run, scalars in {"f": {"val/AP": [(10, 0.2), (20, 0.4)]},
                         "q_w4a4": {"ptq/AP": [(0, 0.1)], "val/AP": [(5, 0.3)], "val/AP50": [(5, 0.6)]}}.items():
        writer = SummaryWriter(str(tmp_path / run / "version_0"))
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()
    tool = load_tool("collect_results")
    tool.main([str(tmp_path), "--float", "f", "--qat", "q_w4a4"])
    out = capsys.readouterr().out
    assert "| FP32 | 0.400 |" in out and "| PTQ w4a4 | 0.100 |" in out and "| QAT w4a4 | 0.300 | 0.600 |" in out
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in rows] == ["FP32", "PTQ w4a4", "QAT w4a4"]
    assert abs(rows[2]["AP50"] - 0.6) < 1e-6 and "AP75" not in rows[2]
