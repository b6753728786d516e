"""fqn: fully quantized Faster R-CNN (FQN, Li et al. CVPR 2019) on torchvision.

Example:
    >>> import torch
    >>> from fqn import QuantConfig, build_detector, prepare_qat, calibrate
    >>> model = build_detector("resnet18", num_classes=3, min_size=128, max_size=128)
    >>> model = prepare_qat(model, QuantConfig(bits_w=4, bits_a=4))
    >>> model = calibrate(model, [[torch.rand(3, 128, 128)]], num_batches=1, progress=False)
    >>> detections = model.eval()([torch.rand(3, 128, 128)])
"""

from fqn.config import QuantConfig
from fqn.models.faster_rcnn import build_detector, prepare_qat
from fqn.quant.calibrate import calibrate

__all__ = ["QuantConfig", "build_detector", "prepare_qat", "calibrate"]
__version__ = "0.1.0"
