"""What a quantized model was made with, kept once, in the model, and saved with its weights.

`prepare_qat` attaches a `QuantState` child (``model.fqn_state``) holding the model's `QuantConfig`, the
modules it swapped and those it kept float, and, after PTQ, how the ranges were set. It is the one copy:
training, conversion, evaluation and the reports read it with `quant_config` / `quant_state`, and
``state_dict()`` carries it (torch's extra state), so a checkpoint's weights say by themselves how to
rebuild the quantized model. `strip_quantizers` removes it with the quantizers.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor, nn

from fqn.config import QuantConfig

ATTRIBUTE = "fqn_state"
"""The child's name on the model; its state-dict key is ``fqn_state._extra_state``."""


class QuantState(nn.Module):
    """A model's quantization settings as a child module: saved in ``state_dict``, restored by ``load_state_dict``.

    Args:
        config: the `QuantConfig` the model was prepared with.
        scope: ``{"quantized": [...], "float": [...]}``, module names swapped and kept float.
        ptq: after post-training quantization, how it was done (``calibration``, ``bias_correction``).

    The state is JSON in a uint8 tensor: weights-only loading and torch's TorchScript exporter treat
    every state-dict value as a tensor.
    """

    def __init__(self, config: QuantConfig, scope: dict[str, list[str]] | None = None,
                 ptq: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = config
        self.scope = scope or {"quantized": [], "float": []}
        self.ptq = ptq

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "scope": self.scope, "ptq": self.ptq}

    def get_extra_state(self) -> Tensor:
        return torch.tensor(list(json.dumps(self.to_dict()).encode()), dtype=torch.uint8)

    @staticmethod
    def _decode(state: Tensor) -> dict[str, Any]:
        return json.loads(bytes(state.tolist()).decode())

    def set_extra_state(self, state: Tensor) -> None:
        saved = self._decode(state)
        self.config = QuantConfig.from_dict(saved["config"])
        self.scope = saved["scope"]
        self.ptq = saved["ptq"]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a checkpoint written before the settings were saved with the weights has none: the config the
        # model was just prepared with (its run's hyper-parameters) stays
        key = prefix + "_extra_state"
        if key in state_dict:
            self.set_extra_state(state_dict[key])

    @staticmethod
    def read(state_dict: dict[str, Any], prefix: str = "") -> dict[str, Any] | None:
        """The saved settings in a model's ``state_dict`` (keys under ``prefix``), or None for a float model's."""
        state = state_dict.get(f"{prefix}{ATTRIBUTE}._extra_state")
        return None if state is None else QuantState._decode(state)

    def extra_repr(self) -> str:
        return f"{self.config.flags}, w{self.config.bits_w}/a{self.config.bits_a}"


def quant_state(model: nn.Module) -> QuantState | None:
    """The model's `QuantState`, or None for a float model."""
    state = getattr(model, ATTRIBUTE, None)
    return state if isinstance(state, QuantState) else None


def quant_config(model: nn.Module) -> QuantConfig | None:
    """The `QuantConfig` the model was prepared with, or None for a float model."""
    state = quant_state(model)
    return state.config if state is not None else None
