"""Distillation from the float detector while fine-tuning the quantized one (an optional QAT improvement).

At 4 bits the quantized detector drifts away from the float one it started from; besides the
detection losses, it can be pulled back towards what the float model computes on the same image:
its FPN features, its RPN objectness and its class scores on the same RoIs. The float teacher is a
frozen copy; the student's own forward is observed with hooks (nothing of torchvision is patched),
and the teacher runs its backbone, RPN head and box head on exactly the student's resized batch
and sampled RoIs. Plain PyTorch: the trainer adds the returned losses to the detection losses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TERMS = ("fpn", "rpn", "cls")


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the distillation terms (0 turns one off) and the softmax temperature of the class term.

    Args:
        fpn: mean squared error between student and teacher FPN features, each level divided by the
            teacher's mean square (so levels and models of different scale weigh alike).
        rpn: binary cross-entropy of the student's objectness against the teacher's probabilities.
        cls: KL divergence of the class scores on the student's RoIs, at ``temperature`` (times T^2).
    """

    fpn: float = 1.0
    rpn: float = 1.0
    cls: float = 1.0
    temperature: float = 2.0

    def __post_init__(self) -> None:
        for name in (*TERMS, "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"distill.{name} must be a number >= 0, got {value!r}")
        if self.temperature == 0:
            raise ValueError("distill.temperature must be > 0, e.g. 2")
        if not any(getattr(self, t) > 0 for t in TERMS):
            raise ValueError("distillation with every weight 0 does nothing; leave distill unset instead")

    def to_dict(self) -> dict[str, float]:
        return {"fpn": self.fpn, "rpn": self.rpn, "cls": self.cls, "temperature": self.temperature}


class Distiller(nn.Module):
    """Holds the frozen float teacher and the hooks that observe the student; `losses()` after each forward.

    Usage, once per training step::

        det_losses = student(images, targets)        # the hooks record what the student saw and computed
        kd = distiller.losses()                        # {"distill/fpn": ..., "distill/rpn": ..., "distill/cls": ...}

    The teacher is kept out of ``state_dict`` (it is the ``init_from`` checkpoint, reloaded on resume) and
    out of the optimizer (its parameters do not require gradients).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        teacher = copy.deepcopy(teacher).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not a child: no state_dict entries, no optimizer
        self.cfg = cfg
        self._seen: dict[str, Any] = {}
        self._handles = [
            student.backbone.register_forward_pre_hook(self._record("images", lambda args, out: args[0])),
            student.backbone.register_forward_hook(self._record("features", lambda args, out: out)),
            student.rpn.head.register_forward_hook(self._record("objectness", lambda args, out: out[0])),
            student.roi_heads.box_roi_pool.register_forward_hook(self._record("rois", lambda args, out: args[1:3])),
            student.roi_heads.box_predictor.register_forward_hook(self._record("logits", lambda args, out: out[0])),
        ]

    def _record(self, key: str, pick: Any):
        def hook(module: nn.Module, args: tuple, out: Any = None) -> None:
            if torch.is_grad_enabled():  # training forwards only: evaluation is not distilled
                self._seen[key] = pick(args, out)
        return hook

    def follow(self, device: torch.device) -> None:
        """Move the teacher to the student's device (it is not a child module, so ``.to()`` of the
        student's owner does not move it); a no-op once it is there."""
        first = next(self.teacher.parameters(), None)
        if first is not None and first.device != torch.device(device):
            self.teacher.to(device)

    def remove(self) -> None:
        """Detach the hooks from the student."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def losses(self) -> dict[str, Tensor]:
        """The weighted distillation losses of the student's last training forward (then forgotten)."""
        seen, self._seen = self._seen, {}
        if "images" not in seen or "features" not in seen:
            raise RuntimeError("Distiller.losses() needs a training forward of the student first")
        cfg, teacher = self.cfg, self.teacher
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            t_feats = teacher.backbone(seen["images"])
        s_feats = seen["features"]
        if cfg.fpn > 0:
            terms = [F.mse_loss(s_feats[k], t) / t.pow(2).mean().clamp_min(1e-12) for k, t in t_feats.items()]
            out["distill/fpn"] = cfg.fpn * torch.stack(terms).mean()
        if cfg.rpn > 0 and "objectness" in seen:
            with torch.no_grad():
                t_obj, _ = teacher.rpn.head(list(t_feats.values()))
            terms = [F.binary_cross_entropy_with_logits(s, torch.sigmoid(t)) for s, t in zip(seen["objectness"], t_obj)]
            out["distill/rpn"] = cfg.rpn * torch.stack(terms).mean()
        if cfg.cls > 0 and "rois" in seen and "logits" in seen and seen["logits"].numel() > 0:
            proposals, image_shapes = seen["rois"]
            with torch.no_grad():
                pooled = teacher.roi_heads.box_roi_pool(t_feats, proposals, image_shapes)
                t_logits, _ = teacher.roi_heads.box_predictor(teacher.roi_heads.box_head(pooled))
            temp = cfg.temperature
            kl = F.kl_div(F.log_softmax(seen["logits"] / temp, dim=1), F.log_softmax(t_logits / temp, dim=1),
                          reduction="batchmean", log_target=True)
            out["distill/cls"] = cfg.cls * kl * temp * temp
        return out
