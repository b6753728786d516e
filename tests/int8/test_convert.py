"""int8 conversion: ONNX QDQ files run by ONNX Runtime's integer kernels, checked against torch and by hand."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from fqn import QuantConfig, calibrate, prepare_qat
from fqn.int8 import convert_int8, export_part, head_parity, load_int8
from fqn.int8.onnx_qdq import export_onnx
from fqn.int8.runtime import session_options
from fqn.quant.fake_quant import quantizers, set_phase
from fqn.quant.modules import QuantAdd, QuantConv2d
from fqn.quant.prepare import bind_input_grids


class _Block(nn.Module):
    """input quantizer -> conv+ReLU -> conv, plus a 1x1 shortcut conv, joined by a quantized add with ReLU."""

    def __init__(self, cfg: QuantConfig) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = QuantConv2d.from_float(nn.Conv2d(8, 16, 3, padding=1), cfg, activation=nn.ReLU(), input_quant=True)
        self.b = QuantConv2d.from_float(nn.Conv2d(16, 16, 3, padding=1), cfg)
        self.c = QuantConv2d.from_float(nn.Conv2d(8, 16, 1), cfg, input_quant=True)
        self.add = QuantAdd(cfg, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.b(self.a(x)), self.c(x))


def _calibrated_block(bits: int, per_channel: bool = True) -> tuple[_Block, torch.Tensor]:
    cfg = QuantConfig(bits_w=bits, bits_a=bits, percentile=False, act_observer="minmax", per_channel=per_channel)
    block = _Block(cfg).eval()
    x = torch.randn(2, 8, 24, 24)
    bind_input_grids(block, lambda: block(x))  # b reads a's output: its bias goes on a's grid, as prepare_qat does
    set_phase(block, "observe")
    with torch.no_grad():
        block(x)
    for _, q in quantizers(block, "act"):
        q.update_qparams()
    set_phase(block, "quantize")
    return block, x


def _all_ops(graph: onnx.GraphProto) -> set[str]:
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attr in node.attribute:
            if attr.HasField("g"):
                ops |= _all_ops(attr.g)
    return ops


def _optimized_ops(proto: onnx.ModelProto, tmp_path) -> dict[str, int]:
    opts = session_options(1)
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("bits,packed,per_channel", [(8, False, True), (4, False, True), (4, True, True),
                                                    (4, False, False)])
def test_integer_kernels_reproduce_fake_quant_layer_by_layer(bits, packed, per_channel, tmp_path):
    """ORT's QLinearConv/QLinearAdd on the exported block give the fake-quant output, in its own steps.

    The deployable file (INT8-held weights) is opened by a plain ONNX Runtime session, as a deployer opens it:
    every conv and the add must run as integer kernels, with nothing but the integer 4-bit Clip in float's place.
    The packed-INT4 file is opened after fqn's loader widened its weights. Per-tensor 4-bit weights (C off) are
    stored as codes already clamped to their range, with no Clip left on the weight path.
    """
    from fqn.int8.runtime import _unpack_int4

    block, x = _calibrated_block(bits, per_channel)
    with torch.no_grad():
        ref = block(x).numpy()
    proto = export_onnx(block, (x,), None, input_names=["x"], output_names=["y"], weight_range=(
        -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1), pack_int4=packed)
    assert _unpack_int4(proto) == (6 if packed else 0)  # three packed weight tensors and their zero points
    ops = _optimized_ops(proto, tmp_path)
    assert ops.get("QLinearConv") == 3 and ops.get("QLinearAdd") == 1, ops
    assert "Conv" not in ops and "Add" not in ops, ops
    if bits == 4:  # the 4-bit clamp is one integer Clip per activation quantizer, no float round trip: the
        # only QuantizeLinear left are the two input quantizers on the float input
        assert ops.get("Clip") == len(quantizers(block, "act")) == 6 and ops.get("QuantizeLinear") == 2, ops
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    out_q = block.add.act_fq
    steps = np.abs(got - ref) / float(out_q.scale)
    if bits == 4:  # measured: all 18432 output codes equal
        assert steps.max() < 0.5, (steps >= 0.5).mean()
    else:  # measured: 99.97% of the codes equal (rounding ties), every one within one step
        assert (steps < 0.5).mean() >= 0.999
        assert steps.max() < 1.5
    if bits == 4:  # k-bit activations stay on their 2^k levels inside the int8 kernels
        levels = np.unique(np.round(got / float(out_q.scale)) + int(out_q.zero_point))
        assert levels.min() >= 0 and levels.max() <= 15


def test_integer_clip_is_the_hand_computed_4bit_quantizer():
    """Q (8-bit codes) -> integer Clip -> DQ, as written for a 4-bit activation, run by ORT on values chosen to hit
    both ends of the range and rounding ties, equals round(x / s) + z clamped to [0, 15], computed here by hand
    (and, away from exact ties, torch's fake quantizer)."""
    from fqn.quant.fake_quant import FakeQuantize
    from fqn.quant.observers import MinMaxObserver

    fq = FakeQuantize(MinMaxObserver(), 4)
    fq.enable_observer(True)
    fq(torch.tensor([-0.7, 2.3]))
    fq.update_qparams()
    fq.enable_observer(False)
    fq.enable_fake_quant(True)
    s, z = float(fq.scale), int(fq.zero_point)
    x = torch.tensor([-5.0, -0.7, -0.01, 0.0, 0.5 * s, 1.5 * s, 2.3, 2.4, 9.0, *torch.linspace(-1, 3, 101).tolist()])
    proto = export_onnx(nn.Sequential(fq), (x,), None, input_names=["x"], output_names=["y"])
    assert [n.op_type for n in proto.graph.node if n.op_type != "Constant"] == \
        ["QuantizeLinear", "Clip", "DequantizeLinear"]
    got = ort.InferenceSession(proto.SerializeToString(), session_options(1),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    ratio = x.numpy() / np.float32(s)  # ONNX QuantizeLinear: x / scale in float32, rounded half to even
    codes = np.clip(np.round(ratio) + z, 0, 15)
    np.testing.assert_array_equal(got, ((codes - z) * np.float32(s)).astype(np.float32))
    off_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) > 1e-4  # torch multiplies by 1/s: ties may differ
    np.testing.assert_array_equal(got[off_tie], fq(x).detach().numpy()[off_tie])


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_are_stored_as_the_hand_computed_integer_codes(bits):
    block, x = _calibrated_block(bits)
    qmax = 2 ** (bits - 1) - 1
    proto = export_onnx(block, (x,), None, input_names=["x"], output_names=["y"], weight_range=(-qmax, qmax))
    stored = [numpy_helper.to_array(i).astype(np.int64) for i in proto.graph.initializer
              if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4) and len(i.dims) == 4]
    assert len(stored) == 3 and not [i for i in proto.graph.initializer
                                     if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4]
    for conv in (block.a, block.b, block.c):
        w = conv.weight.detach().double()
        scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / qmax  # symmetric, per output channel
        codes = torch.round(w / scale).long().numpy()
        assert any(s.shape == codes.shape and np.array_equal(s, codes) for s in stored)
    if bits == 4:  # the packed storage file holds the same codes as INT4
        packed = export_onnx(block, (x,), None, input_names=["x"], output_names=["y"], weight_range=(-qmax, qmax),
                             pack_int4=True)
        weights = [i for i in packed.graph.initializer if len(i.dims) == 4]
        assert len(weights) == 3 and all(i.data_type == onnx.TensorProto.INT4 for i in weights)
        unpacked = sorted((numpy_helper.to_array(i).astype(np.int64) for i in weights), key=lambda a: a.shape)
        for a, b in zip(unpacked, sorted(stored, key=lambda a: a.shape)):
            np.testing.assert_array_equal(a, b)


def test_one_trace_writes_the_deploy_and_the_packed_file_as_two_exports_do(tmp_path):
    """``packed=``: the storage file from the deploy file's trace is byte for byte the one a second export writes."""
    block, x = _calibrated_block(4)
    kw = {"input_names": ["x"], "output_names": ["y"], "weight_range": (-7, 7)}
    export_onnx(block, (x,), tmp_path / "deploy.onnx", **kw, metadata={"k": "deploy"},
                packed=(tmp_path / "packed.onnx", {"k": "packed"}))
    export_onnx(block, (x,), tmp_path / "deploy2.onnx", **kw, metadata={"k": "deploy"})
    export_onnx(block, (x,), tmp_path / "packed2.onnx", **kw, metadata={"k": "packed"}, pack_int4=True)
    assert (tmp_path / "deploy.onnx").read_bytes() == (tmp_path / "deploy2.onnx").read_bytes()
    assert (tmp_path / "packed.onnx").read_bytes() == (tmp_path / "packed2.onnx").read_bytes()
    assert (tmp_path / "packed.onnx").stat().st_size < (tmp_path / "deploy.onnx").stat().st_size
    with pytest.raises(ValueError, match="float export"):
        export_onnx(block, (x,), None, **kw, quantized=False, packed=(tmp_path / "f.onnx", None))


@pytest.fixture(scope="module")
def tiny_quantized(scenes):
    """At torchvision's widths (FPN 256, box head 1024), not the suite's narrow ones: the share of head outputs on
    the same integer code (test_head_outputs_track_the_fake_quant_model, the taps) was measured on this network;
    the narrow one puts one output in 200,000 on a rounding tie at 4 bits."""
    from tests.conftest import bn_calibrated_detectors

    detector = bn_calibrated_detectors(scenes, ("resnet18",))["resnet18"]
    out = {}
    for bits in (8, 4):
        model = prepare_qat(copy.deepcopy(detector), QuantConfig(bits_w=bits, bits_a=bits))
        out[bits] = calibrate(model, [[s] for s in scenes[:4]], 4, progress=False).eval()
    return out


@pytest.fixture(scope="module")
def tiny_files(tiny_quantized, scenes, tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    files = {bits: convert_int8(m, root / f"w{bits}.onnx", scenes[:1],
                                packed_path=root / "w4.int4.onnx" if bits == 4 else None)
             for bits, m in tiny_quantized.items()}
    files["4-packed"] = root / "w4.int4.onnx"
    return files


@pytest.mark.slow  # converts whole detectors (the tiny_files fixture, export_part)
def test_whole_detector_round_trips_from_disk(tiny_quantized, tiny_files, scenes):
    for key, path in tiny_files.items():
        bits = 4 if key == "4-packed" else key
        detector = load_int8(path, threads=1)
        assert detector.metadata["fqn.bits"] == f"w{bits}a{bits}"
        assert detector.metadata["fqn.weights"] == ("int4-packed" if key == "4-packed" else "int8")
        images = [scenes[6], torch.nn.functional.interpolate(scenes[7][None], size=(96, 160))[0]]  # any size
        out = detector(images)
        assert len(out) == 2
        for det, img in zip(out, images):
            n = det["boxes"].shape[0]
            assert det["boxes"].shape == (n, 4) and det["scores"].shape == (n,) and det["labels"].shape == (n,)
            assert det["labels"].dtype == torch.int64 and torch.isfinite(det["boxes"]).all()
            if n:
                assert det["boxes"][:, 2].max() <= img.shape[2] + 1e-3
                assert det["boxes"][:, 3].max() <= img.shape[1] + 1e-3
        onnx.checker.check_model(str(path))
        ops = _all_ops(onnx.load(str(path)).graph)
        assert {"RoiAlign", "NonMaxSuppression", "QuantizeLinear", "DequantizeLinear"} <= ops  # whole detector


def _weight_readers(proto: onnx.ModelProto) -> dict[str, int]:
    inits = {i.name for i in proto.graph.initializer}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            counts[node.input[0]] = counts.get(node.input[0], 0) + 1
    return counts


@pytest.mark.slow  # converts whole detectors (the tiny_files fixture, export_part)
def test_each_call_site_of_a_shared_weight_has_its_own_initializer(tiny_files):
    """The RPN head's conv runs on 5 levels; OpenVINO runs a conv whose weight DQ is shared in float."""
    from fqn.int8.runtime import _unpack_int4, unshare_weights

    deploy = onnx.load(str(tiny_files[8]))
    readers = _weight_readers(deploy)
    assert max(readers.values()) == 1
    rpn = [n for n in readers if "rpn/head/conv.0.0" in n]
    assert len(rpn) == 5  # one per pyramid level, the same codes
    arrays = [numpy_helper.to_array(i) for i in deploy.graph.initializer if i.name in rpn]
    assert all(np.array_equal(a, arrays[0]) for a in arrays)
    packed = onnx.load(str(tiny_files["4-packed"]))  # storage: stored once; the loader gives each site a copy
    assert max(_weight_readers(packed).values()) == 5
    _unpack_int4(packed)
    assert unshare_weights(packed) == 4 + 4 + 4 and max(_weight_readers(packed).values()) == 1


@pytest.mark.slow  # converts whole detectors (the tiny_files fixture, export_part)
def test_packed_four_bit_file_is_smaller_and_detects_the_same(tiny_files, scenes):
    s8, s4, packed = (tiny_files[k].stat().st_size for k in (8, 4, "4-packed"))
    assert packed < 0.6 * s8 and abs(s4 - s8) < 0.05 * s8  # packed int4 weights; the deployable file holds int8
    a, b = (load_int8(tiny_files[k], threads=1)(scenes[6:8]) for k in (4, "4-packed"))
    for da, db in zip(a, b):
        assert all(torch.equal(da[k], db[k]) for k in ("boxes", "scores", "labels"))


@pytest.mark.slow  # converts whole detectors (the tiny_files fixture, export_part)
def test_head_outputs_track_the_fake_quant_model(tiny_quantized, scenes, tmp_path):
    """4 bits: the same codes. 8 bits, on a random (BN-calibrated) network: rounding ties compound through ~20 layers;
    measured 41% of the head outputs on the same code, 88% within one step, the farthest 7 steps off."""
    for bits, model in tiny_quantized.items():
        path = export_part(model, "heads", tmp_path / f"heads{bits}.onnx", scenes[0])
        parity = head_parity(model, path, scenes[6:8], threads=1)
        if bits == 4:
            assert parity["exact"] == 1.0 and parity["max_steps"] == 0, parity
        else:
            assert parity["within_1_step"] > 0.85 and parity["exact"] > 0.35, parity


def test_convert_rejects_float_uncalibrated_and_bad_images(float_detector, scenes, tmp_path):
    with pytest.raises(ValueError, match="float model"):
        convert_int8(float_detector(), tmp_path / "f.onnx", scenes[:1])
    prepared = prepare_qat(float_detector(), QuantConfig())
    with pytest.raises(ValueError, match="calibrate"):
        convert_int8(prepared, tmp_path / "u.onnx", scenes[:1])
    calibrate(prepared, [[scenes[0]]], 1, progress=False)
    with pytest.raises(ValueError, match="example_images"):
        convert_int8(prepared, tmp_path / "e.onnx", [])
    with pytest.raises(FileNotFoundError, match="fqn convert"):
        load_int8(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="not a readable ONNX"):
        load_int8(tmp_path / "junk.onnx")


def test_scope_of_names_the_quantizer_module():
    from fqn.int8.taps import scope_of

    assert scope_of("/model/backbone/body/layer1/layer1.0/conv1/act_fq/DequantizeLinear_1") == \
        "backbone.body.layer1.0.conv1.act_fq"
    assert scope_of("/model/rpn/head/conv_fq.0.0/DequantizeLinear") == "rpn.head.conv_fq.0.0"
    assert scope_of("/a/act_fq/DequantizeLinear", root="model") == "a.act_fq"


@pytest.mark.slow  # converts whole detectors (the tiny_files fixture, export_part)
def test_int8_taps_read_the_integer_activations(tiny_quantized, tiny_files, scenes, tmp_path):
    """Each tapped activation is the fake-quant one (torch hooks) as the integer kernels computed it; fusion intact."""
    from fqn.commands.analyze import comparable_points
    from fqn.int8.runtime import _unpack_int4
    from fqn.int8.taps import Int8Taps, add_activation_outputs

    for bits, model in tiny_quantized.items():
        if bits == 4:
            tiny_files = {**tiny_files, 4: tiny_files["4-packed"]}  # taps also read a packed file
        names = comparable_points(model)
        taps = Int8Taps(tiny_files[bits], names, threads=1)
        assert taps.missing == []
        got = taps(scenes[6])
        store: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n, s=store: s.setdefault(n, o)) for n in names]
        with torch.no_grad():
            model([scenes[6]])
        for h in hooks:
            h.remove()
        for name in names:
            q = modules[name]
            step = float(q.scale.reshape(-1)[0])
            diff = (got[name][0] - store[name]).abs() / step
            assert got[name][0].shape == store[name].shape, name
            if bits == 4:  # measured: every code of all 55 points equal on an AVX-512 Xeon; on an AVX2 EPYC one code
                # in 262144 (a rounding tie of the fake-quant conv's float sum) one step off
                assert float((diff < 0.5).float().mean()) >= 0.9999 and float(diff.max()) < 1.5, (bits, name)
            elif name == "backbone.body.conv1.act_fq":  # the first layer: all but rounding ties equal, within a step
                assert float((diff < 0.5).float().mean()) >= 0.999 and float(diff.max()) < 1.5, name
            else:  # 8 bits on a random network: rounding ties compound with depth (see the heads test); measured:
                # at the worst point 58% within one step
                assert float((diff < 1.5).float().mean()) > 0.55, (bits, name)
        # the extra outputs leave ORT's integer fusions in place
        counts = []
        for tapped in (False, True):
            proto = onnx.load(str(tiny_files[bits]))
            if tapped:
                assert len(add_activation_outputs(proto, names)) == len(names)
            _unpack_int4(proto)
            opts = session_options(1)
            opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
            ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            counts.append(sum(n.op_type == "QLinearConv" for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node))
        assert counts[0] == counts[1] > 0


def test_near_dead_channel_with_a_large_bias_does_not_wrap_the_int32_bias(tmp_path, caplog):
    """|b| / (s_in * s_w) beyond int32 used to wrap ORT's bias (255 steps off); the weight scale is floored instead."""
    from fqn.quant.fake_quant import BIAS_BOUND

    cfg = QuantConfig(bits_w=8, bits_a=8, percentile=False, act_observer="minmax")
    torch.manual_seed(1)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[1] = 1e-9  # a near-dead channel: min/max weight scale at its floor
        conv.bias[1] = 8.0
    float_out = conv(torch.zeros(1, 8, 4, 4))[0, 1, 0, 0].item()
    layer = nn.Sequential(QuantConv2d.from_float(conv, cfg, input_quant=True)).eval()
    x = torch.randn(2, 8, 12, 12)
    set_phase(layer, "observe")
    layer(x)
    for _, q in quantizers(layer, "act"):
        q.update_qparams()
    set_phase(layer, "quantize")
    with torch.no_grad():
        ref = layer(x).numpy()
    q = layer[0]
    s_in, s_w = float(q.input_fq.scale), q.weight_fq.scale.double()
    assert abs(8.0 / (s_in * float(s_w[1]))) <= BIAS_BOUND * (1 + 1e-6)  # the code fits int32 with headroom
    out_step = float(q.act_fq.scale)
    assert abs(ref[0, 1, 0, 0] - float_out) <= out_step  # the bias survives: fake quant still agrees with float
    with caplog.at_level("WARNING", logger="fqn.int8.onnx_qdq"):
        proto = export_onnx(layer, (x,), None, input_names=["x"], output_names=["y"], weight_range=(-127, 127))
    assert "0 (1)" in caplog.text  # names the layer (module "0") and its one channel
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - ref).max() / out_step < 0.5
