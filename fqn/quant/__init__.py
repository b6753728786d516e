"""The FQN method in plain PyTorch: observers, fake quantization, BN folding, module swapping, calibration.

Nothing here imports Lightning or torchvision's detection models.
"""

from fqn.quant.calibrate import calibrate, calibration_mode
from fqn.quant.fake_quant import FakeQuantize, Phase, calc_qparams, fake_quantize, quantizers, set_phase
from fqn.quant.fold import fold_bn
from fqn.quant.modules import QuantAdd, QuantConv2d, QuantConvBn2d, QuantLinear, QuantMaxPool2d, QuantMul
from fqn.quant.prepare import bind_input_grids, restore_float, scope_summary, swap_modules

__all__ = [
    # quantizers and their phases
    "FakeQuantize", "calc_qparams", "fake_quantize", "quantizers", "set_phase", "Phase",
    # the swapped-in layers
    "QuantAdd", "QuantConv2d", "QuantConvBn2d", "QuantLinear", "QuantMul", "QuantMaxPool2d",
    # preparing, calibrating, undoing
    "swap_modules", "bind_input_grids", "restore_float", "scope_summary", "fold_bn", "calibrate", "calibration_mode",
]
