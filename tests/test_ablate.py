"""The ablation grid runner on a tiny model: a 2-row grid, its outputs, and resuming an interrupted grid."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from fqn.commands.ablate import claim_grid, grid_spec, markdown, run_grid, table_rows
from fqn.commands.cli import main
from fqn.models import build_detector

from .train.tiny import DETECTOR, SIZE


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **DETECTOR)
    hp = {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE, "detector": DETECTOR,
          "quant": None}
    path = tmp_path_factory.mktemp("float") / "float.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp},
               path)
    return path


def _config() -> dict:
    return {"model": {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE,
                      "detector": DETECTOR, "lr": 0.01, "base_batch_size": 2, "warmup_steps": 1,
                      "quant": {"n_cal": 1}},
            "data": {"synthetic": {"image_size": SIZE, "num_classes": 3, "min_size": 8, "max_size": 48},
                     "num_train": 8, "num_val": 2, "batch_size": 2, "augment": False},
            "trainer": {"max_steps": 1, "log_every_n_steps": 1}}


def test_tables_have_the_papers_rows():
    fpc = table_rows("fpc", 400)
    assert [r.name for r in fpc] == ["[17] baseline", "F", "P", "C", "F+P", "F+C", "P+C", "F+P+C"]
    assert fpc[0].quant == {"freeze_bn": False, "percentile": False, "per_channel": False}
    assert fpc[-1].quant == {"freeze_bn": True, "percentile": True, "per_channel": True}
    assert [r.quant for r in table_rows("bn", 400)] == [{"freeze_bn": True},
                                                        {"freeze_bn": False, "freeze_bn_last_steps": 100}]
    assert [r.quant["gamma"] for r in table_rows("gamma", 400)] == [0.999, 0.9973, 0.9545]
    cal = table_rows("calibration", 400)
    assert [r.qat for r in cal] == [False] * 3 + [True] * 3 and cal[2].quant["act_observer"] == "histogram"
    beyond = table_rows("beyond", 400)
    assert [r.name for r in beyond] == ["FQN (F+P+C)", "+ learned ranges (LSQ+)",
                                        "+ learned ranges (LSQ+), range LR x100", "+ distillation",
                                        "+ mixed precision", "+ all three", "+ all three, range LR x100"]
    assert beyond[1].quant == {"learn_ranges": True} and beyond[2].module == {"range_lr_scale": 100.0}
    assert beyond[3].module["distill"]["cls"] > 0 and beyond[4].mixed_budget and not beyond[4].quant
    assert all(r.quant and r.module and r.mixed_budget for r in beyond[5:])
    with pytest.raises(ValueError, match="unknown table"):
        table_rows("nope", 1)


@pytest.mark.slow
def test_two_row_grid_runs_resumes_and_writes_its_tables(float_ckpt, tmp_path, capsys):
    spec = grid_spec(str(float_ckpt), str(tmp_path / "grid"), _config(), bits=4)
    rows = [r for r in table_rows("fpc", spec.steps) if r.name in ("[17] baseline", "F+P+C")]
    results = run_grid(spec, rows, threads=1)
    assert [r["row"] for r in results] == ["FP32", "[17] baseline", "F+P+C"]
    baseline = json.loads((tmp_path / "grid" / "rows" / "17_baseline.json").read_text())
    assert baseline["config"]["percentile"] is False and baseline["config"]["bits_w"] == 4
    assert (tmp_path / "grid" / "runs" / "f_p_c" / "last.ckpt").is_file()  # each row is a normal QAT run
    assert (tmp_path / "grid" / "int8" / "f_p_c.onnx").is_file()
    for r in results[1:]:
        assert all(isinstance(r[k], float) for k in ("AP", "AP50", "AP75", "int8_AP"))
    with open(tmp_path / "grid" / "table.csv") as f:
        assert [row["row"] for row in csv.DictReader(f)] == ["FP32", "[17] baseline", "F+P+C"]
    table = (tmp_path / "grid" / "table.md").read_text()
    assert "| 1 | [17] baseline |  |  |  |" in table and "| 2 | F+P+C | ✓ | ✓ | ✓ |" in table  # the paper's checks
    assert "Command: `" in table
    meta = json.loads((tmp_path / "grid" / "table.json").read_text())["meta"]
    assert meta["grid"]["steps"] == spec.steps and meta["grid"]["bits"] == 4  # a copied table.json says its steps
    assert meta["grid"]["batch_size"] == spec.data["batch_size"]
    assert list((tmp_path / "grid" / "tensorboard" / "hparams").rglob("events.*"))
    # an interrupted grid: one row's result is missing -> only that row runs again, from its checkpoint
    (tmp_path / "grid" / "rows" / "17_baseline.json").unlink()
    capsys.readouterr()
    again = run_grid(spec, rows, threads=1)
    printed = capsys.readouterr().out
    assert "1 done, 1 to run" in printed and "row 2/2: [17] baseline" in printed
    assert "17_baseline: reusing" in printed and "f_p_c" not in printed  # trained once, not again
    assert again[1]["AP"] == pytest.approx(baseline["AP"])
    assert markdown(again).count("\n") == 4


def test_a_grid_folder_refuses_rows_made_with_other_settings(tmp_path):
    """Re-running resumes a grid and keeps its finished rows, so another seed or step count (a second seed, a
    longer schedule) must go to its own folder: a clear error, not a table mixing the two."""
    rows = table_rows("fpc", 1)
    first = grid_spec("float.ckpt", str(tmp_path), _config(), bits=4)
    claim_grid(tmp_path, first, rows)
    claim_grid(tmp_path, first, rows[:2])  # the same settings, fewer rows: resumes
    second = grid_spec("float.ckpt", str(tmp_path), _config(), bits=4, seed=1)
    assert second.data["data_seed"] == 1 and "data_seed" not in first.data
    with pytest.raises(ValueError, match=r"other settings \(data\).*another --out"):
        claim_grid(tmp_path, second, rows)
    with pytest.raises(ValueError, match=r"other settings \(steps\)"):
        claim_grid(tmp_path, grid_spec("float.ckpt", str(tmp_path), _config(), bits=4, steps=5), rows)
    with pytest.raises(ValueError, match="seed must be an integer"):
        grid_spec("float.ckpt", str(tmp_path), _config(), bits=4, seed=-1)
    claim_grid(tmp_path / "seed1", second, rows)
    assert json.loads((tmp_path / "seed1" / "grid.json").read_text())["spec"]["data"]["data_seed"] == 1


def test_ablate_cli_rejects_unknown_rows(float_ckpt, tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump(_config()))
    with pytest.raises(SystemExit, match="unknown rows"):
        main(["ablate", "--table", "fpc", "--float", str(float_ckpt), "--out", str(tmp_path / "g"), "--config",
              str(config), "--qat-bits", "4", "--rows", "Q"])
    with pytest.raises(SystemExit) as exit_:  # a table is a recipe: no silent default config
        main(["ablate", "--table", "fpc", "--float", str(float_ckpt), "--out", str(tmp_path / "g")])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_beyond_fqn_row_learns_ranges_distills_and_mixes_bit_widths(float_ckpt, tmp_path):
    from fqn.models.checkpoint import load_detector
    from fqn.quant.fake_quant import quantizers

    spec = grid_spec(str(float_ckpt), str(tmp_path / "grid"), _config(), bits=4)
    row = table_rows("beyond", spec.steps)[-1]
    (result,) = run_grid(spec, [row], threads=1)[1:]
    cfg = result["config"]
    assert cfg["learn_ranges"] is True and result["module"]["distill"]
    high = cfg["layer_bits"]
    assert high and set(high.values()) == {8}
    model, _ = load_detector(result["checkpoint"])
    bits = {n: q.bits for n, q in quantizers(model, "weight")}
    assert {n.removesuffix(".weight_fq") for n, b in bits.items() if b == 8} == set(high)
    assert all(q.learnable for _, q in quantizers(model, "act"))
    weights = {n: m.weight.numel() for n, m in model.named_modules() if getattr(m, "weight_fq", None) is not None}
    expect = sum(v * (8 if n in high else 4) for n, v in weights.items()) / 8e6
    assert result["weight_MB"] == pytest.approx(expect)
    # the added 8-bit weights stay within the budget
    assert sum(weights[n] for n in high) * 4 <= row.mixed_budget * 4 * sum(weights.values())
    deploy = tmp_path / "grid" / "int8" / f"{row.slug}.onnx"
    assert result["file_MB"] * 1e6 < 0.8 * deploy.stat().st_size  # the 4-bit layers packed
    events = list((tmp_path / "grid" / "runs" / "tensorboard" / row.slug).rglob("events.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set().union(*(EventAccumulator(str(e)).Reload().Tags()["scalars"] for e in events))
    assert any(t.startswith("train/distill") for t in tags)
    # tools/int8_gap.py on this row: the float32 simulation reproduces the table's AP, the float64 one runs
    from .tools import load_tool

    (gap,) = load_tool("int8_gap").main([str(tmp_path / "grid"), row.slug, "--threads", "1",
                                         "--out", str(tmp_path / "gap.json")])
    assert gap["fake32_AP"] == pytest.approx(result["AP"]) and gap["int8_AP"] == result["int8_AP"]
    assert 0 <= gap["fake64_AP"] <= 1 and json.loads((tmp_path / "gap.json").read_text())[0]["row"] == row.name


@pytest.mark.slow
def test_reconstruction_table_rows_reconstruct_ptq_and_start_qat_from_it(float_ckpt, tmp_path):
    """A PTQ row learns its rounding (the row and the model record it); a QAT row starts from a reconstruction
    (its checkpoint records it) and trains with the weight ranges following the weights again."""
    from fqn.models.checkpoint import load_detector
    from fqn.quant.fake_quant import quantizers
    from fqn.quant.state import quant_state

    spec = grid_spec(str(float_ckpt), str(tmp_path / "grid"), _config(), bits=4, reconstruction_iters=2)
    rows = {r.name: r for r in table_rows("reconstruction", spec.steps)}
    assert list(rows) == ["PTQ nearest", "PTQ adaround", "PTQ brecq", "PTQ qdrop", "QAT from nearest (FQN)",
                          "QAT from nearest, + learned ranges", "QAT from brecq", "QAT from brecq, + learned ranges"]
    ptq, qat = run_grid(spec, [rows["PTQ qdrop"], rows["QAT from brecq"]], threads=1)[1:]
    assert ptq["reconstruction"]["reconstruction"] == "qdrop" and ptq["reconstruction"]["iters"] == 2
    assert ptq["config"]["act_observer"] == "search" and ptq["minutes"] > 0
    assert qat["module"]["reconstruction"] == "brecq"
    model, hp = load_detector(qat["checkpoint"])
    assert hp["reconstruction"] == "brecq" and hp["reconstruction_iters"] == 2
    assert quant_state(model).ptq["reconstruction"]["reconstruction"] == "brecq"
    assert not any(fq.range_held for _, fq in quantizers(model, "weight"))
    assert "| PTQ qdrop |" in (tmp_path / "grid" / "table.md").read_text()
    with pytest.raises(ValueError, match="iters"):
        grid_spec(str(float_ckpt), str(tmp_path / "g2"), _config(), bits=4, reconstruction_iters=-1)
