"""The ``fqn`` commands, on top of the library: the CLI, comparisons, ablations, analysis, quickstart, demo.

Everything here may import the layers below it (`fqn.quant`, `fqn.models`, `fqn.int8`, `fqn.data`,
`fqn.train`); nothing below imports from here (tests/test_package.py checks it).
"""
