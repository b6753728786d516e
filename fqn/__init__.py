"""fqn: fully quantized Faster R-CNN (FQN, Li et al. CVPR 2019) on torchvision.

The whole lifecycle from one import: build or load a detector, prepare it for quantization,
calibrate (PTQ) or fine-tune (QAT, `fqn fit`), write the real int8 model and run it, and strip
the quantizers to get the float torchvision detector back.

Example:
    >>> import torch
    >>> from fqn import QuantConfig, build_detector, prepare_qat, calibrate
    >>> model = build_detector("resnet18", num_classes=3, min_size=128, max_size=128)
    >>> model = prepare_qat(model, QuantConfig(bits_w=4, bits_a=4))
    >>> model = calibrate(model, [[torch.rand(3, 128, 128)]], num_batches=1, progress=False)
    >>> detections = model.eval()([torch.rand(3, 128, 128)])
"""

__version__ = "0.1.0"

from fqn.config import QuantConfig
from fqn.int8.convert import convert_int8, load_int8
from fqn.models.checkpoint import load_detector
from fqn.models.faster_rcnn import build_detector, prepare_qat, strip_quantizers
from fqn.ptq import post_training_quantize
from fqn.quant.calibrate import calibrate
from fqn.quant.fake_quant import Phase, set_phase

__all__ = [
    # configuration
    "QuantConfig",
    # detectors
    "build_detector", "load_detector",
    # quantize: prepare, calibrate or fine-tune, switch phases, undo
    "prepare_qat", "calibrate", "post_training_quantize", "Phase", "set_phase", "strip_quantizers",
    # deploy
    "convert_int8", "load_int8",
]
