"""fqn from a wheel, outside the clone: a user's `pip install fqn`, then the commands the README gives, from an empty
folder. The wheel is built from this checkout and installed into a fresh virtual environment that borrows torch and
the other dependencies from the test's own environment (nothing is downloaded or reinstalled).

Besides `fqn --version` and a packaged config by name, the tiny quickstart here is the suite's end-to-end run of
`fqn quickstart` (float training, QAT, PTQ, int8 files, comparison): what `make quickstart` runs, at a tiny size.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml

import fqn

pytestmark = pytest.mark.slow  # end to end: the fast tier (-m 'not slow') leaves it out

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A virtual environment with the fqn wheel installed, its dependencies those of this one; its `fqn` and env."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # what a source distribution holds: no build/ leftovers, no caches
    shutil.copytree(REPO / "fqn", source / "fqn", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", root / "dist",
        source, cwd=root)
    wheel = next((root / "dist").glob("fqn-*.whl"))
    venv = root / "venv"
    run(sys.executable, "-m", "venv", venv, cwd=root)
    python = venv / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                       cwd=root).stdout.strip())
    # the dependencies: this environment's site-packages, after the venv's own (where the wheel goes); a path in a .pth
    # file is added without running the .pth files in it, so this environment's editable fqn stays out
    (purelib / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel, cwd=root)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    empty = root / "user"
    empty.mkdir()
    return {"fqn": venv / "bin" / "fqn", "python": python, "env": env, "cwd": empty, "wheel": wheel}


def test_the_wheel_holds_the_package_and_its_configs(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = {Path(n).name for n in names if n.startswith("fqn/configs/")}
    assert shipped == {p.name for p in (REPO / "fqn" / "configs").glob("*.yaml")} and "base.yaml" in shipped
    where = run(installed["python"], "-c", "import fqn; print(fqn.__file__)", cwd=installed["cwd"],
                env=installed["env"]).stdout.strip()
    assert Path(where).is_relative_to(installed["python"].parents[1]), where  # the wheel's fqn, not the clone's


def test_version_and_a_packaged_config_by_name_from_an_empty_folder(installed, tmp_path):
    empty = tmp_path / "empty"  # its own: the module's other tests write into installed["cwd"]
    empty.mkdir()
    out = run(installed["fqn"], "--version", cwd=empty, env=installed["env"]).stdout
    assert out.strip() == f"fqn {fqn.__version__}"
    printed = run(installed["fqn"], "fit", "--config", "coco_r50_w4a4", "--print_config", cwd=empty,
                  env=installed["env"]).stdout
    config = yaml.safe_load(printed)
    assert config["model"]["backbone"] == "resnet50" and config["model"]["quant"]["bits_w"] == 4
    assert config["data"]["source"] == "coco" and config["trainer"]["logger"]["init_args"]["save_dir"] == "runs"
    assert list(empty.iterdir()) == []  # printing a config writes nothing


def test_tiny_quickstart_from_the_wheel(installed):
    out = installed["cwd"] / "qs"
    run(installed["fqn"], "quickstart", "--out", out, "--size", "96", "--float-steps", "2", "--qat-steps", "1",
        "--ptq-bits", "4", "--num-val", "2", "--n-cal", "1", "--no-peers", "--runs", "1", "--threads", "1",
        cwd=installed["cwd"], env=installed["env"])
    rows = json.loads((out / "compare" / "compare.json").read_text())["rows"]
    assert [(r["name"], r["runtime"]) for r in rows] == [
        ("FP32", "PyTorch eager"), ("FP32 (ONNX Runtime)", "ONNX Runtime"), ("FP32 (OpenVINO)", "OpenVINO"),
        ("fqn PTQ w4a4", "ONNX Runtime int8"), ("fqn PTQ w4a4", "OpenVINO int8"),
        ("fqn QAT w4a4 (qat_w4a4)", "ONNX Runtime int8"), ("fqn QAT w4a4 (qat_w4a4)", "OpenVINO int8")]
    qat = next(r for r in rows if r["name"] == "fqn QAT w4a4 (qat_w4a4)")
    assert qat["ranges"] == "percentile, then learned (L)" and qat["config"]["learn_ranges"]
    state = torch.load(out / "float" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state["model.backbone.fpn.layer_blocks.0.0.weight"].shape[0] == 128  # the quickstart's narrow FPN
    files = out / "compare"
    assert (files / "fqn_qat_w4a4_qat_w4a4.onnx").is_file() and (files / "fqn_ptq_w4a4.onnx").is_file()
    assert (files / "fqn_qat_w4a4_qat_w4a4.int4.onnx").is_file()  # the packed storage file beside the deployable one
    assert list((out / "tensorboard" / "float" / "version_0").glob("events.*"))
    # the same quickstart again: its table, nothing trained, converted or overwritten; another one there: refused
    before = (files / "compare.json").read_bytes()
    again = run(installed["fqn"], "quickstart", "--out", out, "--size", "96", "--float-steps", "2", "--qat-steps",
                "1", "--ptq-bits", "4", "--num-val", "2", "--n-cal", "1", "--no-peers", "--runs", "1",
                "--threads", "1", cwd=installed["cwd"], env=installed["env"])
    assert "already done" in again.stdout and "| fqn QAT w4a4 (qat_w4a4) |" in again.stdout
    assert (files / "compare.json").read_bytes() == before
    other = subprocess.run([str(installed["fqn"]), "quickstart", "--out", str(out), "--size", "96", "--float-steps",
                            "2", "--qat-steps", "1", "--ptq-bits", "8", "--num-val", "2", "--n-cal", "1"],
                           cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "holds a comparison made with other settings" in other.stderr
    # an interrupted quickstart reruns the comparison only: its training runs are reused (the API, in this process)
    from fqn.commands.quickstart import QuickstartConfig, _train

    cfg = QuickstartConfig(out=str(out), size=96, float_steps=2, qat_steps=1, ptq_bits=(4,), num_val=2, n_cal=1,
                           peers=(), runs=1, threads=1)
    assert _train("float", cfg, cfg.float_steps) == out / "float" / "last.ckpt"
