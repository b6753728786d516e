"""A module's mode flags as plain Python booleans that are saved with its state dict.

A quantizer's phase (observing, quantizing, calibrated), an observer's "has seen data" and a conv+BN's
"statistics frozen" are read by every forward. Kept in device buffers, reading them would sync a GPU at
every step and mirrors would have to be kept in step with the buffers by hand; kept as Python booleans
only, they would be lost with a checkpoint. So the booleans are the one owner, and torch's extra-state
hooks carry them through ``state_dict``/``load_state_dict``: `set_extra_state` is the one load path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor


class SavedFlags:
    """Mixin (before ``nn.Module`` in the bases) that saves the boolean attributes named in ``FLAGS``.

    The state is a bool tensor, one entry per flag in ``FLAGS`` order: a tensor, not a dict, so that
    weights-only loading and torch's TorchScript exporter, which treat every state-dict value as a
    tensor, keep working. ``LEGACY_BUFFERS`` maps the buffers older checkpoints held the flags in (a
    uint8 flag, or a count whose non-zero means true) to the flag they become; a buffer mapped to ``""``
    held a copy of state kept elsewhere now, and is dropped. A state shorter than ``FLAGS`` was saved before
    the trailing flags existed: those keep the values the constructor gave them.
    """

    FLAGS: ClassVar[tuple[str, ...]] = ()
    LEGACY_BUFFERS: ClassVar[dict[str, str]] = {}

    def get_extra_state(self) -> Tensor:
        return torch.tensor([bool(getattr(self, f)) for f in self.FLAGS], dtype=torch.bool)

    def set_extra_state(self, state: Tensor) -> None:
        values = state.tolist()
        if not 0 < len(values) <= len(self.FLAGS):
            raise ValueError(f"{type(self).__name__} saves {len(self.FLAGS)} flags {self.FLAGS}, "
                             f"the checkpoint holds {len(values)}")
        for name, value in zip(self.FLAGS, values):
            setattr(self, name, bool(value))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "_extra_state"
        legacy = {flag: state_dict.pop(prefix + buf) for buf, flag in self.LEGACY_BUFFERS.items()
                  if prefix + buf in state_dict}
        if legacy and key not in state_dict:
            state_dict[key] = torch.tensor([bool(legacy[f]) if f in legacy else bool(getattr(self, f))
                                            for f in self.FLAGS], dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
