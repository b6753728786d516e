"""tools/ptq_calibrations.py: every PTQ row measured on the same data, files rewritten after each row."""

from __future__ import annotations

import json

import pytest
import torch

from fqn.models import build_detector

from ..train.tiny import DETECTOR, SIZE
from . import load_tool, tiny_float_checkpoint


@pytest.mark.slow  # the PTQ pipeline end to end, every row
def test_rows_for_every_rule_and_correction_with_their_gap_to_fp32(tmp_path, capsys):
    ckpt, config = tiny_float_checkpoint(tmp_path)
    tool = load_tool("ptq_calibrations")
    tool.main([str(ckpt), "--config", str(config), "--out", str(tmp_path / "out"), "--ptq-bits", "8",
               "--rules", "search", "percentile", "--n-cal", "1", "--threads", "1"])
    saved = json.loads((tmp_path / "out" / "ptq_calibrations.json").read_text())
    rows = saved["rows"]
    assert [(r["model"], r.get("rule"), r.get("bias_correction")) for r in rows] == [
        ("FP32", None, None), ("PTQ w8a8", "search", False), ("PTQ w8a8", "search", True),
        ("PTQ w8a8", "percentile", False), ("PTQ w8a8", "percentile", True)]
    for row in rows[1:]:
        assert row["gap_AP"] == pytest.approx(row["AP"] - rows[0]["AP"])
    assert rows[1]["ranges"].startswith("search: ") and rows[4]["ranges"] == "percentile + bias correction"
    assert "| PTQ w8a8 | percentile + bias correction |" in (tmp_path / "out" / "ptq_calibrations.md").read_text()
    assert "| FP32 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="quantized checkpoint"):
        from fqn import QuantConfig, prepare_qat

        q = prepare_qat(build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **DETECTOR), QuantConfig())
        torch.save({"state_dict": {f"model.{k}": v for k, v in q.state_dict().items()},
                    "hyper_parameters": {**torch.load(ckpt)["hyper_parameters"], "quant": QuantConfig().to_dict()}},
                   tmp_path / "q.ckpt")
        tool.run(tmp_path / "q.ckpt", str(config), tmp_path / "o2", bits=[8], rules=["search"],
                 bias_correction=[False], n_cal=1, progress=False)
