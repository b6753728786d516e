"""How closely the int8 ONNX model reproduces the fake-quant model it was converted from, in quantization steps.

    python tools/int8_parity.py runs/synthetic_w8a8/version_0/checkpoints/last.ckpt --images 8

Exports the FPN + RPN head part of the checkpoint's quantized detector, runs it in ONNX Runtime
(integer kernels, all graph optimisations) and, for comparison, the same graph with ORT's
optimisations off (QDQ executed in float, no integer kernels), on synthetic validation scenes.
Prints and saves (``--json``) the fraction of FPN/RPN output elements that are equal and within
one step of the fake-quant model's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fqn.data.synthetic import SyntheticConfig, render
from fqn.int8.convert import HeadOutputs, export_part, head_parity, output_steps, resized_batch
from fqn.int8.runtime import session_options
from fqn.models.checkpoint import load_detector


def float_qdq_parity(model, path: Path, images) -> dict[str, float]:
    """The same comparison with ORT executing the QDQ graph in float (no fusion into integer kernels)."""
    opts = session_options()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    steps = output_steps(path)
    ref_module = HeadOutputs(model).eval()
    names = [o.name for o in session.get_outputs()]
    diffs = []
    for img in images:
        batch = resized_batch(model, img)
        ref = ref_module(batch)
        got = session.run(names, {"batch": batch.numpy()})
        diffs += [(np.abs(r.detach().numpy() - g) / steps[n]).ravel() for n, r, g in zip(names, ref, got)]
    d = np.concatenate(diffs)
    return {"exact": float((d < 0.5).mean()), "within_1_step": float((d < 1.5).mean()), "max_steps": float(d.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a QAT checkpoint")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    model, hp = load_detector(args.checkpoint)
    syn = SyntheticConfig(image_size=hp["min_size"])
    images = [render(i, syn, "val")[0] for i in range(args.images)]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_part(model, "heads", Path(tmp) / "heads.onnx", images[0])
        result = {"checkpoint": args.checkpoint, "images": args.images, "bits": model.fqn_config.bits_a,
                  "int8_kernels": head_parity(model, path, images),
                  "float_qdq": float_qdq_parity(model, path, images)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
