"""The runnable examples in every fqn module's docstrings run, and the modules a user reads first have some.

Rule: every module of the package is searched, so no example goes untested; each module in `WITH_EXAMPLES` must
also carry at least one example that runs (``# doctest: +SKIP`` ones do not count), so removing the last one fails
here instead of leaving the module's documentation without a checked example.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import fqn

#: The public API a user reads first: the config, the method, the models, the data, PTQ, the metrics, the CLI.
WITH_EXAMPLES = ["fqn", "fqn.config", "fqn.quant.qparams", "fqn.quant.fold", "fqn.quant.calibrate",
                 "fqn.models.faster_rcnn", "fqn.viz", "fqn.commands.report", "fqn.ptq", "fqn.evaluation",
                 "fqn.data.datamodule", "fqn.data.sanitize", "fqn.data.kitti", "fqn.data.coco", "fqn.data.street",
                 "fqn.data.transforms", "fqn.data.sampler", "fqn.commands.cli"]
ALL_MODULES = ["fqn"] + sorted(m.name for m in pkgutil.walk_packages(fqn.__path__, "fqn."))


def runnable_examples(module: str) -> int:
    tests = doctest.DocTestFinder().find(importlib.import_module(module))
    return sum(1 for t in tests for e in t.examples if not e.options.get(doctest.SKIP))


@pytest.mark.parametrize("module", ALL_MODULES)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


@pytest.mark.parametrize("module", WITH_EXAMPLES)
def test_public_module_has_runnable_examples(module):
    assert module in ALL_MODULES, f"{module} is gone: update WITH_EXAMPLES"
    assert runnable_examples(module) >= 1, f"{module} has no docstring example that runs (SKIP ones do not count)"

