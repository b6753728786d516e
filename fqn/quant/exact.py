"""A float64 copy of a fake-quant model: the same model in another arithmetic, to size rounding noise.

Integer kernels sum a layer's products exactly in int32; a float32 simulation rounds every sum of
thousands of products, which moves a value lying near a rounding boundary to the next code. A layer of
the float64 copy gives the integer kernels' codes (tested against integer arithmetic). The detector's
float glue (resize, RoIAlign, box decoding, NMS) runs in float64 too, so the copy is not the int8 file
either: it is one more arithmetic for the same model. How far AP moves between the float32 and the
float64 simulations measures how much rounding alone moves that AP, the yardstick an int8 − fake-quant
gap needs. Measured on issue 13's beyond-FQN rows (200 synthetic val images, `tools/int8_gap.py`):
float64 − float32 AP of -0.17 points for pure 4-bit FQN and -0.41 / -0.61 / +0.40 for the rows with
29 layers at 8 bits, whose int8 − float32 gaps were -0.01 / -0.63 / +0.47.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from fqn.quant.fake_quant import FakeQuantize, LearnedFakeQuantize


def float64_simulation(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (left unchanged) whose forward takes float32 or float64 images alike.

    Weights, biases and activations become float64; the quantizers' scales and learned ranges stay
    float32, as torch's fake-quantize kernels require and as the int8 file stores them. Each quantizer
    still rounds in float32 (torch's kernels), so a value within about 1e-7 of a rounding boundary may
    still differ from the integer result: rare, against the float32 sums' flips.
    """
    sim = copy.deepcopy(model).double()
    for fq in sim.modules():
        if isinstance(fq, LearnedFakeQuantize):  # its range is its parameters; scale is read off them
            for param in (fq.lsq_scale, fq.lsq_zero_point):
                param.data = param.data.float()
        elif isinstance(fq, FakeQuantize):
            fq.scale.data = fq.scale.data.float()
    sim.register_forward_pre_hook(_images_to_float64)
    return sim


def _images_to_float64(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not args:
        return args
    images = args[0]
    if isinstance(images, (list, tuple)):  # a detector's list of images
        images = [im.double() for im in images]
    elif hasattr(images, "double"):
        images = images.double()
    return (images, *args[1:])
