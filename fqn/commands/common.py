"""What several commands share: which data a model is scored or calibrated on, the PTQ of a float checkpoint,
output folders that never overwrite an earlier result, and the record of what made a result file.

The data rule every command follows: ``--config`` when given, else the data settings the checkpoint logged when
it was trained (Lightning stores the data module's hyper-parameters in every checkpoint), else an error that says
what to pass. Nothing falls back to the synthetic set: a COCO or KITTI model calibrated on generated shapes gives
numbers that look fine and mean nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
import torchvision

import fqn
from fqn.commands.config_files import load_config
from fqn.data.datamodule import DetectionDataModule
from fqn.models.checkpoint import load_detector, read_checkpoint
from fqn.ptq import post_training_quantize, ptq_config
from fqn.quant.reconstruction import ReconstructionConfig
from fqn.quant.state import quant_config

ONNX_DATA_KEY = "fqn.data"  # the data settings an int8 file was converted with (JSON), for `fqn evaluate`


def checkpoint_data_settings(path: str | Path) -> dict[str, Any] | None:
    """The data module's hyper-parameters a trainer checkpoint logged, or None (a file fqn did not train)."""
    hp = read_checkpoint(path).get("datamodule_hyper_parameters")
    return dict(hp) if hp else None


def onnx_data_settings(path: str | Path) -> dict[str, Any] | None:
    """The data settings `fqn convert` stored in an int8 file's metadata, or None."""
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    value = meta.get(ONNX_DATA_KEY)
    return json.loads(value) if value else None


def data_for(model: str | Path | None, config: str | None = None, **overrides: Any) -> DetectionDataModule:
    """The data to calibrate or score ``model`` on, un-augmented: ``config``'s when given, else the model's own.

    ``model``: a checkpoint (its logged data settings) or an int8 ``.onnx`` file `fqn convert` wrote (the settings
    of the checkpoint it came from). A model that records none, with no ``config``, is an error naming ``--config``.
    """
    overrides = {"augment": False, **overrides}
    if config is not None:
        return DetectionDataModule.from_config(load_config(config), **overrides)
    if model is None:
        raise ValueError("no data to use: pass --config with a training config (e.g. --config synthetic_w4a4)")
    settings = onnx_data_settings(model) if Path(model).suffix.lower() == ".onnx" else checkpoint_data_settings(model)
    if settings is None:
        raise ValueError(f"{model} does not record the data it was trained on; pass --config with the training "
                         "config whose data: section gives the images (e.g. --config my_coco.yaml)")
    # only the data module's own arguments: LightningCLI adds its "_instantiator"; `seed` is data_seed's deprecated name
    known = set(inspect.signature(DetectionDataModule.__init__).parameters) - {"self", "seed"}
    settings = {k: v for k, v in settings.items() if k in known}
    try:
        return DetectionDataModule(**{**settings, **overrides})
    except (ValueError, OSError) as err:
        raise ValueError(f"the data {model} was trained on is not usable here ({err}); run from the folder it was "
                         "trained in, or pass --config with a config that points to the data") from None


def quantized_model(checkpoint: str | Path, ptq_bits: int | None, data: DetectionDataModule | None = None, *,
                    calibration: str = "search", bias_correction: bool = False, n_cal: int = 20,
                    head_bits: int | None = None, reconstruction: ReconstructionConfig | str | None = None) -> Any:
    """The quantized model of ``checkpoint``: a QAT checkpoint as it is, a float one post-training quantized.

    ``ptq_bits`` must be given for a float checkpoint and not for a QAT one; ``data`` gives the calibration batches.
    ``reconstruction``: the PTQ's learned rounding (`post_training_quantize`); an error for a QAT checkpoint, as
    is ``head_bits`` (the PTQ's bit-width of the heads' layers, `ptq_config`).
    """
    model, _ = load_detector(checkpoint)
    quantized = quant_config(model) is not None
    if quantized and ptq_bits:
        raise ValueError(f"{checkpoint} is already quantized (QAT); --ptq-bits is for a float checkpoint")
    if quantized and reconstruction:
        raise ValueError(f"{checkpoint} is already quantized (QAT); --reconstruction is a PTQ option, for a float "
                         "checkpoint with --ptq-bits (a QAT run starts from it with model.reconstruction)")
    if quantized and head_bits:
        raise ValueError(f"{checkpoint} is already quantized (QAT); --head-bits is a PTQ option, for a float "
                         "checkpoint with --ptq-bits (a QAT run sets the heads' bits with model.quant.layer_bits)")
    if not quantized and not ptq_bits:
        raise ValueError(f"{checkpoint} is a float checkpoint: give --ptq-bits (e.g. --ptq-bits 8) to post-training "
                         "quantize it, or pass a QAT checkpoint")
    if ptq_bits:
        if data is None:
            raise ValueError("post-training quantization needs calibration data")
        cfg = ptq_config(ptq_bits, calibration, n_cal=n_cal, head_bits=head_bits)
        model = post_training_quantize(model, data.calibration_batches(n_cal), cfg, bias_correction=bias_correction,
                                       reconstruction=reconstruction)
    return model


def ptq_header(float_ckpt: str | Path, config: str | None, n_cal: int, num_val: int | None, threads: int,
               **inputs: Any) -> dict[str, Any]:
    """What a PTQ measurement's results file says it measured (`ptq_inputs`' arguments, the checkpoint's content,
    any further ``inputs``) and where: a resumed file must match all of it but the provenance."""
    return {"float": str(float_ckpt), "float_sha256": file_digest(float_ckpt), "config": config, "n_cal": n_cal,
            "num_val": num_val, **inputs, "provenance": provenance(threads)}


def ptq_inputs(float_ckpt: str | Path, config: str | None, n_cal: int,
               num_val: int | None = None) -> tuple[torch.nn.Module, list, list]:
    """The FP32 model, its validation batches and ``n_cal`` calibration batches: what a PTQ measurement starts from.

    The data follow `data_for`'s rule; a quantized checkpoint is refused (PTQ starts from the float one).
    """
    model, _ = load_detector(float_ckpt)
    if quant_config(model) is not None:
        raise ValueError(f"{float_ckpt} is a quantized checkpoint; PTQ starts from the FP32 one")
    data = data_for(float_ckpt, config, **({"num_val": num_val} if num_val is not None else {}))
    data.setup("validate")
    return model, list(data.val_dataloader()), list(data.calibration_batches(n_cal))


def fresh_file(path: str | Path) -> Path:
    """``path``, refused when it already exists: a command never overwrites an earlier result."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists: fqn does not overwrite an earlier result; pass another --out "
                              "folder or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def run_label(checkpoint: str | Path) -> str:
    """The name of the run a checkpoint belongs to, for table rows and file names.

    ``runs/synthetic_w4a4/checkpoints/last.ckpt`` -> ``synthetic_w4a4``; ``runs/qs/qat_w4a4/last.ckpt`` ->
    ``qat_w4a4``; a loose ``model.ckpt`` -> ``model``.

    Example:
        >>> run_label("runs/street_w4a4/version_3/checkpoints/last.ckpt")
        'street_w4a4'
    """
    parts = _named_parts(checkpoint)
    return parts[-1] if parts else Path(checkpoint).stem


def _named_parts(checkpoint: str | Path) -> list[str]:
    """The folders and file stem of a path that name a run: not ``checkpoints``, ``version_N``, ``last``, ``best-*``."""
    generic = ("version_", "best", "epoch=")
    path = Path(checkpoint).resolve().with_suffix("")
    return [p for p in path.parts if p not in ("/", "checkpoints", "last") and not p.startswith(generic)]


def unique_labels(paths: Sequence[str | Path]) -> list[str]:
    """`run_label` of each path, with the folders above it added until no two are the same."""
    parts = [_named_parts(p) for p in paths]
    labels = [run_label(p) for p in paths]
    depth = 1
    while len(set(labels)) < len(labels) and depth < max((len(p) for p in parts), default=0):
        depth += 1
        labels = ["/".join(p[-depth:]) for p in parts]
    return labels


def git_commit() -> str | None:
    """The fqn source tree's commit, ``+dirty`` when the package's code (``fqn/``, ``pyproject.toml``) differs from
    it; None for an installed wheel. Docs and tests being edited do not make a measurement's code dirty."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "fqn", "pyproject.toml"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as the user typed it: ``fqn compare ...`` for the console script, ``python x.py ...`` else."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "python"
    head = "fqn" if program == "fqn" else f"python {argv[0]}" if argv else "python"
    return " ".join([head, *(shlex.quote(a) for a in argv[1:])])


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """What a measurement ran on: CPU, threads, and the versions of Python, torch and the runtimes."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "python": platform.python_version(), "fqn": fqn.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import openvino  # optional (pip install fqn[openvino]): recorded where it is installed

        info["openvino"] = openvino.__version__
    except ImportError:
        pass
    return info


def ptq_file_stem(bits: int, head_bits: int | None = None, reconstruction: str | None = None) -> str:
    """The name of a PTQ model's files, e.g. ``ptq_w4a4_heads8_qdrop``: its bits, its heads' bits and its
    reconstruction, so `fqn convert` and `fqn compare` name one model alike and those variants never share a file
    (the range rule and bias correction are in the file's metadata and its JSON record, not in its name)."""
    return f"ptq_w{bits}a{bits}" + (f"_heads{head_bits}" if head_bits else "") + (
        f"_{reconstruction}" if reconstruction else "")


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of a file's SHA-256: names a checkpoint's content, so a result resumed or reused
    for a path is known to come from the same weights, not from an older file at that path."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def provenance(threads: int | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, versions, commit and command of a result: what every results file carries."""
    return {**machine_info(threads), "commit": git_commit(), "command": command_line(argv)}
