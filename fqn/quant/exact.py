"""A float64 copy of a fake-quant model: the simulation an int8 file's integer arithmetic agrees with.

Integer kernels sum a layer's products exactly in int32. A float32 simulation rounds every sum of
thousands of products, which moves a value lying near a rounding boundary to the next code. At 4 bits
such flips are rare (a step is wide); where 8-bit layers follow each other, they carry forward and add
up to differences a detection metric sees. Measured on the synthetic R18 with 29 of 61 layers at 8
bits (issue 13's "all three" row): AP 0.7234 in the float32 simulation, 0.7173 in float64, 0.7171 from
the int8 file. So an int8 − fake-quant gap on such a model is the float32 simulation's rounding, and
this copy is the reference that tells it from a conversion fault.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from fqn.quant.fake_quant import FakeQuantize


def float64_simulation(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (left unchanged) whose forward takes float32 or float64 images alike.

    Weights, biases and activations become float64; the quantizers' scales and learned ranges stay
    float32, as torch's fake-quantize kernels require and as the int8 file stores them. Each quantizer
    still rounds in float32 (torch's kernels), so a value within about 1e-7 of a rounding boundary may
    still differ from the integer result: rare, against the float32 sums' flips.
    """
    sim = copy.deepcopy(model).double()
    for fq in sim.modules():
        if isinstance(fq, FakeQuantize):
            fq.scale.data = fq.scale.data.float()
            for name in ("lsq_scale", "lsq_zero_point"):
                param = getattr(fq, name, None)
                if param is not None:
                    param.data = param.data.float()
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
