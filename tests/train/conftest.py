"""The float checkpoint the QAT runs of tests/train start from."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tiny import tiny_data, tiny_module, tiny_trainer


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory) -> Path:
    """A float checkpoint after 2 training steps (the QAT starting point), trained once per test module."""
    root = tmp_path_factory.mktemp("float")
    model, data = tiny_module(), tiny_data()
    trainer = tiny_trainer(str(root), max_steps=2)
    trainer.fit(model, data)
    path = root / "float.ckpt"
    trainer.save_checkpoint(path)
    return path
