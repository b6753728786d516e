"""Package boundaries and the public API."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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


def test_api_demo_runs_from_the_console_script():
    exe = Path(sys.executable).with_name("fqn")
    cmd = [str(exe) if exe.exists() else "fqn", "demo", "--size", "128", "--n-cal", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| w8a8 FPC |" in result.stdout and "| w4a4 FPC |" in result.stdout


def test_readme_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes its int8 file where it runs
    readme = (Path(fqn.__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["model"].fqn_scope["float"] == []
    assert set(namespace["detections"][0]) == {"boxes", "scores", "labels"}
    assert set(namespace["int8_detections"][0]) == {"boxes", "scores", "labels"}
    assert not [type(m) for m in namespace["float_again"].modules() if type(m).__module__.startswith("fqn")]
