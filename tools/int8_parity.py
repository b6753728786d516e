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

from fqn.data.synthetic import SyntheticConfig, render
from fqn.int8.convert import export_part, head_parity
from fqn.models.checkpoint import load_detector
from fqn.quant.state import quant_config


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
        result = {"checkpoint": args.checkpoint, "images": args.images, "bits": quant_config(model).bits_a,
                  "int8_kernels": head_parity(model, path, images),
                  "float_qdq": head_parity(model, path, images, integer_kernels=False)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
