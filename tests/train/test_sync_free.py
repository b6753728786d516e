"""QAT's hot path never reads the device from the host: checked on the CPU, where CI runs.

On a GPU, reading a tensor on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, ``.cpu()``,
data-dependent shapes such as ``nonzero``) makes the CPU wait until every queued kernel has run, so the
next kernels are not queued ahead: per quantizer, that would stall a step ~170 times for R50. On the CPU
nothing waits, but the same calls are visible to torch's dispatch and function modes, so a test here
catches any that the quantization code makes.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fqn import QuantConfig
from fqn.quant import calibrate, set_phase
from fqn.train.callbacks import training_phase

from ..devices import needs_cuda
from .tiny import tiny_data, tiny_module

FQN = str(Path(__file__).resolve().parents[2] / "fqn")
_aten = torch.ops.aten
SYNCING_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
               _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
               # reads its scale and zero point with .item() inside its kernel, where the modes do not see
               _aten._fake_quantize_learnable_per_tensor_affine.default}
HOST_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}


def _caller() -> str:
    """The innermost frame in fqn's own code (or in torch/torchvision if none): where the read comes from."""
    frames = traceback.extract_stack()[:-3]
    mine = [f for f in frames if f.filename.startswith(FQN)]
    frame = (mine or [f for f in frames if "site-packages" in f.filename] or frames)[-1]
    return f"{Path(frame.filename).relative_to(Path(FQN).parent) if frame.filename.startswith(FQN) else 'lib'}" \
           f":{frame.lineno}"


class HostReads(TorchDispatchMode):
    """Counts the ops that wait on the device, by the line of fqn (or 'lib') they come from."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS:
            self.sites[_caller()] += 1
        return func(*args, **(kwargs or {}))


class HostMethods(TorchFunctionMode):
    """Counts host reads by tensor method (``.cpu()`` and ``.tolist()`` are free on a CPU tensor, not on a GPU one)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_METHODS:
            self.sites[_caller()] += 1
        return func(*args, **(kwargs or {}))


def test_the_counters_see_host_reads():
    x = torch.randn(4)
    with HostMethods() as methods, HostReads() as reads:
        x[0].item(), bool(x[1] > 0), float(x[2]), x.tolist(), x.cpu(), torch.where(x > 0)
    assert sum(reads.sites.values()) == 4  # item, bool, float (each a _local_scalar_dense) and where (nonzero)
    assert sum(methods.sites.values()) >= 5  # item, bool, float, tolist, cpu


def _step_sites(cfg: QuantConfig | None, batch) -> tuple[collections.Counter, collections.Counter]:
    images, targets = batch
    module = tiny_module(quant=cfg) if cfg is not None else tiny_module()
    data = tiny_data()
    if cfg is not None:
        calibrate(module.model, data.calibration_batches(cfg.n_cal), cfg.n_cal, progress=False)
        set_phase(module.model, training_phase(cfg))
    model = module.model.train()
    torch.manual_seed(0)
    sum(model(list(images), list(targets)).values()).backward()  # first call: torchvision sets up its poolers
    torch.manual_seed(0)
    with HostMethods() as methods, HostReads() as reads:
        sum(model(list(images), list(targets)).values()).backward()
    return reads.sites, methods.sites


@pytest.fixture(scope="module")
def batch():
    data = tiny_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def float_sites(batch):
    return _step_sites(None, batch)


@pytest.mark.parametrize("name, cfg", [
    ("FQN: P, fixed ranges", QuantConfig(bits_w=4, bits_a=4, n_cal=1)),
    ("EMA ranges updated every step", QuantConfig(bits_w=4, bits_a=4, n_cal=1, percentile=False)),
    ("learned ranges", QuantConfig(bits_w=4, bits_a=4, n_cal=1, learn_ranges=True)),
])
@pytest.mark.slow  # trains: float and QAT training steps of a detector
def test_a_qat_step_reads_the_device_no_more_than_a_float_step(name, cfg, batch, float_sites):
    """Forward and backward of a QAT step: no host read from the quantization code, and no more in all than the
    float model's own (torchvision's proposal sampling and NMS read data-dependent sizes in both)."""
    float_reads, float_methods = float_sites
    reads, methods = _step_sites(cfg, batch)
    from_quant = {site: n for site, n in {**reads, **methods}.items() if site.startswith("fqn/quant/")}
    assert from_quant == {}, name
    assert sum(reads.values()) <= sum(float_reads.values()), (name, reads, float_reads)
    assert sum(methods.values()) <= sum(float_methods.values()), (name, methods, float_methods)


@needs_cuda
def test_on_a_gpu_no_quantizer_synchronizes(batch):
    """The real thing, where a GPU is: torch's sync debug mode raises on any synchronizing call made while a
    quantized layer or quantizer runs, forward (each of the configurations above) and backward."""
    images, targets = batch
    images, targets = [i.cuda() for i in images], [{k: v.cuda() for k, v in t.items()} for t in targets]
    depth = [0]

    def enter(mod, args):
        depth[0] += 1
        torch.cuda.set_sync_debug_mode("error")

    def leave(mod, args, out):
        depth[0] -= 1
        if depth[0] == 0:
            torch.cuda.set_sync_debug_mode("default")

    for cfg in (QuantConfig(bits_w=4, bits_a=4, n_cal=1), QuantConfig(bits_w=4, bits_a=4, n_cal=1, percentile=False),
                QuantConfig(bits_w=4, bits_a=4, n_cal=1, learn_ranges=True)):
        module = tiny_module(quant=cfg)
        model = module.model.cuda()
        calibrate(model, [images], 1, progress=False)
        set_phase(model, training_phase(cfg))
        model.train()
        for m in model.modules():
            if type(m).__module__.startswith("fqn.quant."):
                m.register_forward_pre_hook(enter)
                m.register_forward_hook(leave)
        try:
            loss = sum(model(images, targets).values())
            torch.cuda.set_sync_debug_mode("error")
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


@pytest.mark.slow  # compiles and trains a backbone
def test_a_compiled_qat_backbone_is_one_graph_that_never_recompiles():
    """`torch.compile` of the quantized backbone (EMA ranges, so every quantizer observes at every step): one
    graph, no graph break, and no recompilation from one step to the next (a Python counter an observer bumped
    at every call once failed the compiled graph's guards and retraced it every step)."""
    from torch._dynamo.utils import counters

    from fqn import build_detector, prepare_qat

    torch._dynamo.reset()
    counters.clear()
    cfg = QuantConfig(bits_w=4, bits_a=4, n_cal=1, percentile=False)
    model = build_detector("resnet18", 5, min_size=64, max_size=64)
    prepare_qat(model, cfg)
    calibrate(model, [[torch.rand(3, 64, 64)]], 1, progress=False)
    set_phase(model, training_phase(cfg))
    model.train()
    backbone = torch.compile(model.backbone, backend="eager")  # dynamo's capture alone: no compiler needed
    try:
        for _ in range(3):
            out = backbone(torch.rand(2, 3, 64, 64))
            sum(v.sum() for v in out.values()).backward()
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
