"""Detector builders and their quantizable blocks."""

from fqn.models.faster_rcnn import BACKBONES, build_detector, prepare_qat, recalibrate_bn

__all__ = ["BACKBONES", "build_detector", "prepare_qat", "recalibrate_bn"]
