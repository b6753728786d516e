"""``fqn convert``: a checkpoint to the int8 ONNX file a deployer ships, with what it was made from recorded in it.

A QAT checkpoint converts as it is (``OUT/qat_w4a4.onnx``); a float checkpoint is post-training quantized first, at
each ``--ptq-bits`` (``OUT/ptq_w8a8.onnx``), calibrated on its own training data (the data settings its checkpoint
logged) or on ``--config``'s. At <= 4 bits a packed-INT4 copy (``.int4.onnx``) is written beside the file to deploy.
Each file's metadata holds the checkpoint it came from, its class names and its data settings, so `fqn evaluate` and
`fqn predict` need nothing else; ``OUT/<file>.json`` says how each file was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fqn.commands.common import ONNX_DATA_KEY, data_for, fresh_file, provenance, ptq_file_stem, quantized_model
from fqn.commands.report import write_json
from fqn.data.synthetic import synthetic_scenes
from fqn.int8 import convert_int8
from fqn.models.checkpoint import read_checkpoint
from fqn.ptq import reconstruction_config
from fqn.quant.reconstruction import ReconstructionConfig
from fqn.quant.state import quant_config, quant_state


def _file_metadata(checkpoint: Path, data: Any) -> dict[str, Any]:
    """What the int8 file records of its origin (each value JSON-encoded under ``fqn.*`` by `convert_int8`)."""
    meta: dict[str, Any] = {"source": str(checkpoint)}
    if data is not None:
        meta["class_names"] = data.class_names
        meta[ONNX_DATA_KEY.removeprefix("fqn.")] = {k: v for k, v in dict(data.hparams).items()}
    return meta


def _data_or_none(checkpoint: Path, config: str | None, needed: bool) -> Any:
    """The model's data (calibration, class names); a QAT conversion goes on without it when it is not there."""
    try:
        return data_for(checkpoint, config)
    except (ValueError, OSError):
        if needed:
            raise
        return None


def run_convert(checkpoint: str | Path, out: str | Path, *, ptq_bits: Sequence[int] | None = (),
                config: str | None = None, calibration: str = "search", bias_correction: bool = False,
                n_cal: int = 20, head_bits: int | None = None,
                reconstruction: ReconstructionConfig | str | None = None) -> list[Path]:
    """Write the int8 file(s) of ``checkpoint`` into ``out``; returns the files to deploy.

    ``ptq_bits``: post-training quantize a float checkpoint at each bit-width; empty or None converts a QAT one.
    ``reconstruction``: that PTQ's learned rounding; the files store the learned integer codes. ``head_bits``: that
    PTQ's bit-width of the heads' layers. A PTQ file is named for both, e.g. ``ptq_w4a4_heads8_qdrop.onnx``.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    hp = read_checkpoint(checkpoint)["hyper_parameters"]
    data = _data_or_none(checkpoint, config, needed=bool(ptq_bits))
    example = synthetic_scenes(1, hp["min_size"])  # drives the trace only: any image size runs afterwards
    rcfg, deployable = reconstruction_config(reconstruction), []
    method = rcfg.method if rcfg else None  # in the file's name
    for bits in ptq_bits or [None]:
        model = quantized_model(checkpoint, bits, data, calibration=calibration, bias_correction=bias_correction,
                                n_cal=n_cal, head_bits=head_bits, reconstruction=reconstruction)
        cfg = quant_config(model)
        stem = ptq_file_stem(bits, head_bits, method) if bits else f"qat_w{cfg.bits_w}a{cfg.bits_a}"
        meta = _file_metadata(checkpoint, data)
        packed = fresh_file(out / f"{stem}.int4.onnx") if cfg.bits_w <= 4 else None  # storage: same trace
        path = convert_int8(model, fresh_file(out / f"{stem}.onnx"), example, metadata=meta, packed_path=packed)
        record = {"file": path.name, "method": "ptq" if bits else "qat", "bits": f"w{cfg.bits_w}a{cfg.bits_a}",
                  "flags": cfg.flags, "size_mb": path.stat().st_size / 1e6, "config": cfg.to_dict()}
        if bits:
            record.update(calibration=calibration, bias_correction=bias_correction, n_cal=n_cal, head_bits=head_bits,
                          reconstruction=(quant_state(model).ptq or {}).get("reconstruction"))
        print(f"wrote {path} ({record['size_mb']:.1f} MB, {cfg.flags} {record['bits']}): the file to deploy; ONNX "
              f"Runtime and OpenVINO run it on integer kernels as they open it. Score it with `fqn evaluate {path} "
              f"--out OUT`, run it with `fqn predict {path} IMAGES --out OUT`")
        if packed is not None:
            record.update(packed_file=packed.name, packed_mb=packed.stat().st_size / 1e6)
            print(f"wrote {packed} ({record['packed_mb']:.1f} MB): the same model with packed INT4 weights, for "
                  "storage and transfer; fqn.load_int8 runs it (widening the weights in memory), a plain runtime "
                  "session runs it slower than float")
        write_json(out / f"{stem}.json", {"source": str(checkpoint), **record, "provenance": provenance()})
        deployable.append(path)
    if data is None:
        print(f"note: the data {checkpoint} was trained on is not here, so the file records no class names or data "
              "settings (pass --config to record them)")
    return deployable
