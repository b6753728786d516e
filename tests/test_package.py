"""Package boundaries and the public API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import fqn


def test_public_api():
    lifecycle = {"QuantConfig", "build_detector", "prepare_qat", "calibrate", "post_training_quantize",
                 "convert_int8", "load_int8", "load_detector", "set_phase", "Phase", "strip_quantizers"}
    assert lifecycle <= set(fqn.__all__)
    for name in fqn.__all__:
        assert getattr(fqn, name).__doc__, name


def test_method_never_imports_lightning_or_detection_models():
    code = ("import sys, fqn.config, fqn.quant;"
            "print([m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout
    # fqn/__init__ pulls in the models, so check the method's own import lines too
    root = Path(fqn.__file__).parent
    pattern = re.compile(r"^\s*(import|from)\s+(lightning|pytorch_lightning|torchvision\.models)", re.M)
    for path in [root / "config.py", *sorted((root / "quant").glob("*.py"))]:
        assert not pattern.search(path.read_text()), path


LIBRARY = ("fqn.config", "fqn.quant", "fqn.models", "fqn.int8", "fqn.data", "fqn.train", "fqn.evaluation", "fqn.ptq",
           "fqn.viz")


def test_library_layers_never_import_a_command():
    """The method, the models, the int8 backend, the data and the trainer sit below the commands."""
    root = Path(fqn.__file__).parent
    pattern = re.compile(r"^\s*(from|import)\s+fqn\.commands\b", re.M)
    files = [p for p in sorted(root.rglob("*.py")) if "commands" not in p.relative_to(root).parts]
    assert len(files) > 25
    offenders = [str(p.relative_to(root)) for p in files if pattern.search(p.read_text())]
    assert offenders == []
    code = ("import sys, importlib;"
            f"[importlib.import_module(m) for m in {LIBRARY!r}];"
            "print(sorted(m for m in sys.modules if m.startswith('fqn.commands')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_commands_live_in_one_place():
    root = Path(fqn.__file__).parent
    top = sorted(p.stem for p in root.glob("*.py"))
    assert top == ["__init__", "config", "evaluation", "ptq", "viz"], top
    assert {"cli", "compare", "ablate", "analyze", "quickstart", "demo", "peers", "report", "config_files", "convert",
            "evaluate", "bench", "common", "lightning"} <= {
        p.stem for p in (root / "commands").glob("*.py")}


@pytest.mark.slow  # a subprocess CLI, end to end
def test_api_demo_runs_from_the_console_script():
    exe = Path(sys.executable).with_name("fqn")
    cmd = [str(exe) if exe.exists() else "fqn", "demo", "--size", "128", "--n-cal", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| w8a8 FPC |" in result.stdout and "| w4a4 FPC |" in result.stdout


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes its int8 file where it runs
    readme = (Path(fqn.__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["model"].fqn_state.scope["float"] == []
    assert set(namespace["detections"][0]) == {"boxes", "scores", "labels"}
    assert set(namespace["int8_detections"][0]) == {"boxes", "scores", "labels"}
    assert not [type(m) for m in namespace["float_again"].modules() if type(m).__module__.startswith("fqn")]
