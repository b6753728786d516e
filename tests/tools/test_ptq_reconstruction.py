"""tools/ptq_reconstruction.py: nearest rounding and learned rounding measured on the same calibration images,
each row with its images, its time, its share of FP32 and (``--int8``) its int8 file's AP."""

from __future__ import annotations

import json

import pytest

from . import load_tool, tiny_float_checkpoint


@pytest.mark.slow  # PTQ, reconstruction and conversion of a detector, end to end
def test_rows_state_their_images_share_of_fp32_and_int8_gap(tmp_path, capsys, monkeypatch):
    ckpt, config = tiny_float_checkpoint(tmp_path)
    tool = load_tool("ptq_reconstruction")
    tool.main([str(ckpt), "--config", str(config), "--out", str(tmp_path / "out"), "--ptq-bits", "8",
               "--methods", "nearest", "adaround", "--iters", "2", "--n-cal", "1", "--threads", "1", "--int8",
               "--layer-bits", "rpn.head.*=4"])
    saved = json.loads((tmp_path / "out" / "ptq_reconstruction.json").read_text())
    rows = saved["rows"]
    assert [(r["model"], r["rounding"], r.get("iters")) for r in rows] == [
        ("FP32", "-", None), ("PTQ w8a8", "nearest", None), ("PTQ w8a8", "adaround", 2)]
    assert saved["cal_images"] == 2 and all(r["cal_images"] == 2 for r in rows[1:])  # one batch of two images
    for row in rows[1:]:
        assert row["pct_fp32"] == pytest.approx(100 * row["AP"] / rows[0]["AP"])
        assert row["int8_gap"] == pytest.approx(row["int8_AP"] - row["AP"])
        assert 0 < row["ptq_minutes"] <= row["minutes"]
    assert all(r["scope"] == "rpn.head.*: 4-bit" and r["layer_bits"] == {"rpn.head.*": 4} for r in rows[1:])
    assert rows[1]["error_ratio"] is None and isinstance(rows[2]["error_ratio"], float)
    table = (tmp_path / "out" / "ptq_reconstruction.md").read_text()
    assert "| PTQ w8a8 | rpn.head.*: 4-bit | adaround | 2 | 2 |" in table
    assert "| FP32 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown methods"):
        tool.run(ckpt, str(config), tmp_path / "o2", bits=[8], methods=["stochastic"], iters=[1])

    # --resume: every row is in the file, so nothing is quantized or evaluated again, and the rows are the same
    def measured(*args, **kwargs):
        raise AssertionError("a row the file already has was measured again")

    monkeypatch.setattr(tool, "post_training_quantize", measured)
    monkeypatch.setattr(tool, "evaluate_map", measured)
    again = tool.run(ckpt, str(config), tmp_path / "out", bits=[8], methods=["nearest", "adaround"], iters=[2],
                     n_cal=1, threads=1, int8=True, layer_bits={"rpn.head.*": 4}, resume=True, progress=False)
    assert again == rows
    with pytest.raises(ValueError, match=r"other inputs \(scope\)"):  # another scope is another experiment
        tool.run(ckpt, str(config), tmp_path / "out", bits=[8], methods=["nearest"], iters=[2], n_cal=1,
                 threads=1, resume=True, progress=False)


def test_scope_options_parse_and_name_the_scope():
    tool = load_tool("ptq_reconstruction")
    assert tool.parse_layer_bits(["rpn.head.*=8", "roi_heads.box_predictor.*=8"]) == {
        "rpn.head.*": 8, "roi_heads.box_predictor.*": 8}
    for bad in ("rpn.head.*", "=8", "rpn.head.*=eight"):
        with pytest.raises(ValueError, match="PATTERN=BITS"):
            tool.parse_layer_bits([bad])
    assert tool.scope_label({}, []) == "every layer"
    assert tool.scope_label({"rpn.head.*": 8}, ["roi_heads.*"]) == "rpn.head.*: 8-bit; roi_heads.*: float"
