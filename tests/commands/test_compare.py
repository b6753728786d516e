"""`fqn compare` and `fqn convert` end to end on a tiny detector and tiny synthetic data."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
import yaml

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.commands.cli import main
from fqn.commands.compare import ROW_FIELDS, run_compare
from fqn.int8 import load_int8
from fqn.models import build_detector
from fqn.models.checkpoint import load_detector
from fqn.quant.state import quant_config

from ..train.tiny import DETECTOR, SIZE, tiny_data

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out


def _save(model, path, quant=None, data=True):
    """A checkpoint as the trainer writes it: the model's hyper-parameters and, with ``data``, the data's."""
    hp = {"backbone": "resnet18", "num_classes": 4, "min_size": SIZE, "max_size": SIZE, "detector": DETECTOR,
          "quant": quant}
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}
    if data:
        ckpt["datamodule_hyper_parameters"] = dict(tiny_data(num_val=2).hparams)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    model = build_detector("resnet18", 4, min_size=SIZE, max_size=SIZE, **DETECTOR).eval()
    float_ckpt = _save(model, root / "float.ckpt")
    cfg = QuantConfig(bits_w=4, bits_a=4)
    qat = prepare_qat(model, cfg)
    calibrate(qat, tiny_data().calibration_batches(2), 2, progress=False)
    return float_ckpt, _save(qat, root / "qat_w4a4.ckpt", cfg.to_dict())


@pytest.fixture(scope="module")
def qat_int8(checkpoints, tmp_path_factory):
    """`fqn convert QAT_CKPT --out OUT` once for the tests that read its files: the folder and what it printed."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("convert") / "int8", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["convert", str(checkpoints[1]), "--out", str(out)]) == 0
    return out, printed.getvalue()


QAT = "fqn QAT w4a4 (qat_w4a4)"  # a QAT row is named after its run


PTQ = "fqn PTQ w4a4 (heads 8-bit, qdrop)"  # every PTQ option of the command: the row says which


def test_compare_writes_every_row_with_finite_numbers(checkpoints, tmp_path):
    """Every row, with every PTQ option on (range search, bias correction, 8-bit heads, QDrop's reconstruction)."""
    from fqn.ptq import reconstruction_config

    float_ckpt, qat_ckpt = checkpoints
    cmp = run_compare(float_ckpt, [qat_ckpt], tmp_path, tiny_data(num_val=4), ptq_bits=(4,), n_cal=2,
                      peers=("onnxruntime",), runs=2, warmup=1, threads=1, progress=False,
                      runtimes=("onnxruntime", "openvino"), bias_correction=True, head_bits=8,
                      reconstruction=reconstruction_config("qdrop", 2))
    saved = json.loads((tmp_path / "compare.json").read_text())
    names = [r["name"] for r in saved["rows"]]
    assert names == ["FP32", "FP32 (ONNX Runtime)", "FP32 (OpenVINO)", PTQ, PTQ,
                     "fqn QAT w4a4 (qat_w4a4)", "fqn QAT w4a4 (qat_w4a4)", "ORT quantize_static w8a8"]
    # the ORT peer quantizes the network, not the glue: 8-bit anchors, box decoding or RoI level mapping cost
    # the quickstart's model 17 AP points
    graph = onnx.load(str(tmp_path / "ort_quantize_static.onnx")).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    fed_dq = {node.name: any(made_by.get(i) == "DequantizeLinear" for i in node.input) for node in graph.node}
    glue = [n.name for n in graph.node if n.op_type in ("Add", "MatMul", "Gemm", "Conv")
            and any(k in n.name for k in ("anchor_generator", "/rpn/Add", "box_roi_pool", "/roi_heads/Add"))]
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    assert glue and not any(fed_dq[n] for n in glue)
    assert len(convs) > 20 and all(fed_dq[n] for n in convs)
    assert [r["runtime"] for r in saved["rows"] if r["name"] == "fqn QAT w4a4 (qat_w4a4)"] == [
        "ONNX Runtime int8", "OpenVINO int8"]
    for row in saved["rows"]:
        assert set(ROW_FIELDS) <= set(row), row
        for key in ("AP", "AP50", "AP75", "AR100", "size_mb", "latency_ms", "backbone_ms", "speedup",
                    "backbone_speedup"):
            assert isinstance(row[key], (int, float)) and math.isfinite(row[key]), (row["name"], key)
    rows = {r["name"]: r for r in saved["rows"]}  # the OpenVINO row of each name
    assert rows["FP32"]["speedup"] == pytest.approx(1.0)
    for name in (PTQ, QAT):  # the row's fields; that the int8 model finds what the
        # fake-quant one finds is tested on a trained model in test_agreement.py
        assert math.isfinite(rows[name]["int8_gap_AP"]) and math.isfinite(rows[name]["fake_quant_AP"])
    assert rows[PTQ]["size_mb"] < 0.3 * rows["FP32"]["size_mb"]
    assert (tmp_path / "fqn_ptq_w4a4_heads8_qdrop.onnx").is_file() and "qdrop" in cmp.markdown()
    # the rows say how their ranges were set: PTQ by the per-layer search, QDrop and bias correction, QAT by P
    suffix = ", qdrop (2 iterations) + bias correction"
    assert rows[PTQ]["ranges"].endswith(suffix)
    counts = rows[PTQ]["ranges"].removeprefix("search: ").removesuffix(suffix)
    assert sum(int(part.split()[-1]) for part in counts.split(", ")) == 60  # every activation quantizer of R18-FPN
    assert rows[QAT]["ranges"] == "percentile"
    # the deployable 4-bit file holds its codes in INT8; the packed storage file beside it is about half
    assert rows[QAT]["packed_mb"] < 0.6 * rows[QAT]["size_mb"]
    assert (tmp_path / rows[QAT]["packed_file"]).is_file()
    assert saved["machine"]["threads"] == 1 and saved["machine"]["torch"] == torch.__version__
    assert saved["machine"]["val_images"] == 4 and saved["machine"]["command"]  # the record of what made it
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    table = cmp.markdown()
    assert all(name in table for name in names) and "threads" in table


def test_convert_cli_qat_ptq_and_bad_input(checkpoints, qat_int8, tmp_path, capsys):
    float_ckpt, qat_ckpt = checkpoints
    out, printed = qat_int8
    deployed = load_int8(out / "qat_w4a4.onnx")
    assert deployed.metadata["fqn.bits"] == "w4a4"
    # the file records what it came from: class names for `fqn predict`, the data for `fqn evaluate`
    assert json.loads(deployed.metadata["fqn.class_names"]) == tiny_data().class_names
    assert json.loads(deployed.metadata["fqn.data"])["num_val"] == 2
    # at 4 bits: the deployable file and the packed storage file, each named
    assert "qat_w4a4.onnx" in printed and "deploy" in printed and "qat_w4a4.int4.onnx" in printed
    assert "storage" in printed
    assert load_int8(out / "qat_w4a4.int4.onnx").metadata["fqn.weights"] == "int4-packed"
    assert json.loads((out / "qat_w4a4.json").read_text())["provenance"]["command"]
    with pytest.raises(SystemExit, match="already exists"):  # never over an earlier result
        main(["convert", str(qat_ckpt), "--out", str(out)])
    with pytest.raises(SystemExit, match="float checkpoint: give --ptq-bits"):
        main(["convert", str(float_ckpt), "--out", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["convert", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "m")])
    (tmp_path / "junk.ckpt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="cannot be read"):
        main(["convert", str(tmp_path / "junk.ckpt"), "--out", str(tmp_path / "j")])
    with pytest.raises(SystemExit, match="already quantized"):
        main(["convert", str(qat_ckpt), "--out", str(tmp_path / "q"), "--ptq-bits", "8"])
    assert main(["convert", str(float_ckpt), "--out", str(tmp_path / "ptq"), "--ptq-bits", "8", "4",
                 "--n-cal", "2", "--calibration", "percentile", "--bias-correction"]) == 0
    assert load_int8(tmp_path / "ptq" / "ptq_w8a8.onnx").metadata["fqn.bits"] == "w8a8"
    assert load_int8(tmp_path / "ptq" / "ptq_w4a4.onnx").metadata["fqn.bits"] == "w4a4"
    assert json.loads((tmp_path / "ptq" / "ptq_w4a4.json").read_text())["calibration"] == "percentile"
    assert "wrote" in capsys.readouterr().out
    # a float checkpoint that records no data: PTQ needs --config, and says so
    bare = _save(load_detector(float_ckpt)[0], tmp_path / "bare.ckpt", data=False)
    with pytest.raises(SystemExit, match="does not record the data it was trained on; pass --config"):
        main(["convert", str(bare), "--out", str(tmp_path / "b"), "--ptq-bits", "8"])


def test_evaluate_scores_the_int8_file_and_the_checkpoint_alike(checkpoints, qat_int8, tmp_path):
    """`fqn evaluate` on the int8 file (its recorded data) and on the checkpoint: the int8 file's mAP is
    the one `evaluate_map` gives on the same images, computed here independently of the command."""
    from fqn.evaluation import evaluate_map

    _, qat_ckpt = checkpoints
    onnx_file = qat_int8[0] / "qat_w4a4.onnx"
    assert main(["evaluate", str(onnx_file), "--out", str(tmp_path / "e8"), "--threads", "1"]) == 0
    record = json.loads((tmp_path / "e8" / "metrics.json").read_text())
    data = tiny_data(num_val=2, augment=False)
    data.setup("validate")
    expected = evaluate_map(load_int8(onnx_file), data.val_dataloader(), progress=False)
    assert record["metrics"] == pytest.approx(expected) and record["images"] == 2
    assert record["runtime"] == "onnxruntime" and record["images_per_second"] > 0
    assert main(["evaluate", str(onnx_file), "--out", str(tmp_path / "ov"), "--runtime", "openvino",
                 "--threads", "1"]) == 0
    assert json.loads((tmp_path / "ov" / "metrics.json").read_text())["runtime"] == "openvino"
    assert main(["evaluate", str(qat_ckpt), "--out", str(tmp_path / "ck"), "--threads", "1"]) == 0
    record = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    assert record["kind"] == "fake-quant w4a4" and record["runtime"] == "pytorch"
    with pytest.raises(SystemExit, match="already exists"):
        main(["evaluate", str(qat_ckpt), "--out", str(tmp_path / "ck")])


def test_analyze_cli_writes_its_report(checkpoints, tmp_path, capsys):
    float_ckpt, qat_ckpt = checkpoints
    assert main(["analyze", str(qat_ckpt), "--out", str(tmp_path / "an"), "--images", "1",
                 "--layer-bits", "0.2"]) == 0
    assert (tmp_path / "an" / "report.md").is_file() and (tmp_path / "an" / "maps_average.png").is_file()
    printed = capsys.readouterr().out
    assert "| layer | SQNR dB |" in printed and "layers at 8 bits within 0.2" in printed
    layer_bits = yaml.safe_load((tmp_path / "an" / "layer_bits.yaml").read_text())["layer_bits"]
    model, _ = load_detector(qat_ckpt)  # the file is a valid config value naming real layers
    modules = dict(model.named_modules())
    assert layer_bits and all(modules[n].weight_fq is not None and b == 8 for n, b in layer_bits.items())
    QuantConfig(**{**quant_config(model).to_dict(), "layer_bits": layer_bits})
    # against the int8 model: converted on the fly, every image-aligned layer found in the file
    assert main(["analyze", str(qat_ckpt), "--out", str(tmp_path / "i8"), "--images", "1", "--int8"]) == 0
    assert (tmp_path / "i8" / "model_int8.onnx").is_file()
    saved = json.loads((tmp_path / "i8" / "layers.json").read_text())
    assert saved["source"].startswith("int8 model") and len(saved["layers"]) >= 20
    with pytest.raises(SystemExit, match="float checkpoint: give --ptq-bits"):
        main(["analyze", str(float_ckpt), "--out", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="already quantized"):
        main(["analyze", str(qat_ckpt), "--out", str(tmp_path / "f"), "--ptq-bits", "4"])
    assert main(["analyze", str(float_ckpt), "--out", str(tmp_path / "p"), "--images", "1", "--ptq-bits", "4",
                 "--n-cal", "1", "--calibration", "percentile"]) == 0
    assert json.loads((tmp_path / "p" / "layers.json").read_text())["layers"]


def test_reconstruction_and_head_bits_through_convert(checkpoints, tmp_path):
    """`--reconstruction` and `--head-bits`: the files of `fqn convert` are the reconstructed model's with its heads
    at 8 bits, named and recorded as such; a QAT checkpoint refuses both (they are PTQ options). `fqn compare`'s
    rows with both: test_compare_writes_every_row_with_finite_numbers."""
    from onnx import numpy_helper


    float_ckpt, qat_ckpt = checkpoints
    out = tmp_path / "ptq"
    assert main(["convert", str(float_ckpt), "--out", str(out), "--ptq-bits", "4", "--n-cal", "1", "--head-bits", "8",
                 "--reconstruction", "brecq", "--reconstruction-iters", "2"]) == 0
    saved = json.loads((out / "ptq_w4a4_heads8_brecq.json").read_text())
    record = saved["reconstruction"]
    assert record["reconstruction"] == "brecq" and record["iters"] == 2 and record["calibration_batches"] == 1
    assert saved["head_bits"] == 8
    assert saved["config"]["layer_bits"] == {"rpn.head.*": 8, "roi_heads.box_predictor.*": 8}
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(out / "ptq_w4a4_heads8_brecq.onnx")).graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and np.prod(i.dims) > 1]
    spans = [int(np.abs(w).max()) for w in weights]
    assert any(s > 8 for s in spans) and any(s <= 8 for s in spans)  # the heads' 8-bit codes and the rest's 4-bit
    with pytest.raises(SystemExit, match="--reconstruction is a PTQ option"):
        main(["convert", str(qat_ckpt), "--out", str(tmp_path / "q"), "--reconstruction", "qdrop"])
    with pytest.raises(SystemExit, match="--head-bits is a PTQ option"):
        main(["convert", str(qat_ckpt), "--out", str(tmp_path / "q"), "--head-bits", "8"])
