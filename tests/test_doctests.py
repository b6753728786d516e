"""The runnable examples in the public docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["fqn", "fqn.config", "fqn.quant.fake_quant", "fqn.quant.fold",
                                    "fqn.quant.calibrate", "fqn.models.faster_rcnn",
                                    "fqn.train.monitor"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
