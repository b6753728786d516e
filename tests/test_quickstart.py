"""`fqn quickstart` end to end on a tiny schedule: trains, reuses its checkpoints, converts and compares."""

from __future__ import annotations

import json

import pytest
import torch

from fqn.commands.cli import main
from fqn.commands.quickstart import QuickstartConfig, _train, run_quickstart


def test_tiny_quickstart_runs_and_reuses_its_checkpoints(tmp_path, capsys):
    cfg = QuickstartConfig(out=str(tmp_path / "qs"), size=96, float_steps=2, qat_steps=1, qat_bits=(4,), ptq_bits=(4,),
                           batch_size=2, num_val=2, n_cal=1, peers=("ort",), runs=1)
    out = run_quickstart(cfg)
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [(r["name"], r["runtime"]) for r in rows] == [
        ("FP32", "PyTorch eager"), ("FP32 (ONNX Runtime)", "ONNX Runtime"), ("FP32 (OpenVINO)", "OpenVINO"),
        ("fqn PTQ w4a4", "ONNX Runtime int8"), ("fqn PTQ w4a4", "OpenVINO int8"),
        ("fqn QAT w4a4", "ONNX Runtime int8"), ("fqn QAT w4a4", "OpenVINO int8"),
        ("ORT quantize_static w8a8", "ONNX Runtime int8")]
    qat = next(r for r in rows if r["name"] == "fqn QAT w4a4")
    assert qat["ranges"] == "percentile, then learned (L)" and qat["config"]["learn_ranges"]
    state = torch.load(tmp_path / "qs" / "float" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.backbone.fpn.layer_blocks.0.0.weight"].shape[0] == 128  # the quickstart's narrow FPN
    assert (out / "fqn_qat_w4a4.onnx").is_file() and (out / "fqn_ptq_w4a4.onnx").is_file()
    assert (out / "fqn_qat_w4a4.int4.onnx").is_file()  # the packed storage file beside the deployable one
    assert list((tmp_path / "qs" / "tensorboard" / "float" / "version_0").glob("events.*"))
    printed = capsys.readouterr().out
    assert "| fqn QAT w4a4 |" in printed and "done in" in printed
    assert printed.count("reusing") == 0
    again = _train("qat_w4a4", cfg, cfg.qat_steps)  # a second quickstart trains nothing
    assert again == tmp_path / "qs" / "qat_w4a4" / "last.ckpt" and "reusing" in capsys.readouterr().out


def test_quickstart_rejects_bad_settings():
    with pytest.raises(SystemExit, match="must be >= 1"):
        main(["quickstart", "--float-steps", "0"])
