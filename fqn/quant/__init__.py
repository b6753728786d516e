"""The FQN method in plain PyTorch: observers, fake quantization, BN folding, module swapping, calibration.

Nothing here imports Lightning or torchvision's detection models.
"""

from fqn.quant.calibrate import calibrate, calibration_mode
from fqn.quant.fake_quant import FakeQuantize, calc_qparams, fake_quantize, quantizers, set_phase
from fqn.quant.fold import fold_bn
from fqn.quant.modules import QAdd, QConv2d, QConvBn2d, QLinear, QMul
from fqn.quant.prepare import bind_input_grids, restore_float, scope_summary, swap_modules

__all__ = ["calibrate", "calibration_mode", "FakeQuantize", "calc_qparams", "fake_quantize", "quantizers",
           "set_phase", "fold_bn", "QAdd", "QConv2d", "QConvBn2d", "QLinear", "QMul", "scope_summary",
           "swap_modules", "bind_input_grids", "restore_float"]
