"""A data or config error from `fqn` is one line naming the file and what to do, exit status 1; `--debug` keeps the
traceback. The CLI runs as a person runs it (a subprocess of the installed `fqn`) on tiny data written here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fqn.commands.cli import main
from fqn.commands.config_files import ConfigError
from fqn.commands.errors import error_line
from fqn.data.sanitize import DataError
from tests.data.files import kitti_line, write_garbage, write_kitti
from tests.test_configs import CUSTOM, REPO, SIZE, coco_args, coco_files, fqn

FAST = ["--model.min_size", str(SIZE), "--model.max_size", str(SIZE), "--data.num_workers", "0",
        "--trainer.max_steps", "1", "--trainer.logger", "false"]


def one_error_line(result) -> str:
    """The run failed with one line of its own (Lightning's INFO lines aside) and no traceback; returns that line."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    own = [line for line in lines if not line.startswith(("INFO ", "WARNING "))]
    assert len(own) == 1 and len(lines) < 8, result.stderr[-3000:]
    return own[0]


def test_unknown_kitti_label(tmp_path):
    frames = {f"{i:06d}": [kitti_line("Car", (10.0, 20.0, 60.0, 70.0))] for i in range(4)}
    frames["000002"] = [kitti_line("Car", (10.0, 20.0, 60.0, 70.0)), kitti_line("Zebra", (5.0, 5.0, 30.0, 30.0))]
    write_kitti(tmp_path / "kitti", frames, size=(SIZE, SIZE))
    result = fqn("fit", "--config", str(REPO / "configs" / "synthetic_float.yaml"), *FAST, "--data.source", "kitti",
                 "--data.data_root", "kitti", "--model.num_classes", "8", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith("fqn fit: kitti/label_2/000002.txt line 2: KITTI type 'Zebra' is not in the class map")
    assert "data.kitti_class_map" in line and "data.skip_bad: true" in line  # what to do


def test_missing_image(tmp_path):
    files = coco_files(tmp_path / "data", CUSTOM)
    (Path(files[2]) / "1.png").unlink()  # val image 1: in the JSON, not on disk
    result = fqn("fit", "--config", str(REPO / "configs" / "synthetic_float.yaml"), *FAST, "--data.source", "coco",
                 *coco_args(files), "--model.num_classes", "4", cwd=tmp_path)
    line = one_error_line(result)
    assert line.startswith(f"fqn fit: {Path(files[2]) / '1.png'}: image file is missing; fix or restore the file")


def bad_config(tmp_path: Path, bits_w) -> Path:
    """A QAT config whose own quant section is bad, over the repository's (good) synthetic_w4a4.yaml."""
    path = tmp_path / "my_w4a4.yaml"
    path.write_text(yaml.safe_dump({"__base__": str(REPO / "configs" / "synthetic_w4a4.yaml"),
                                    "model": {"quant": {"bits_w": bits_w}}}))
    return path


def test_bad_bits_w_in_a_config_file(tmp_path):
    result = fqn("fit", "--config", str(bad_config(tmp_path, 3.5)), cwd=tmp_path)
    line = one_error_line(result)
    assert line == (f"fqn fit: {tmp_path / 'my_w4a4.yaml'}: model.quant: bits_w must be an integer in [2, 8] "
                    "(4 and 8 are the paper's settings), got 3.5")


@pytest.mark.parametrize("bits_w", [0, 3.5, "four"])
def test_bad_bits_w_names_the_file_in_process(tmp_path, bits_w, monkeypatch):
    config = bad_config(tmp_path, bits_w)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config)])
    assert str(exit_.value.code).startswith(f"fqn fit: {config}: model.quant: bits_w must be an integer in [2, 8]")
    with pytest.raises(ConfigError, match="bits_w must be an integer"):  # --debug keeps the traceback
        main(["--debug", "fit", "--config", str(config)])
    monkeypatch.setenv("FQN_DEBUG", "1")
    with pytest.raises(ConfigError, match="bits_w must be an integer"):
        main(["fit", "--config", str(config)])


def test_config_files_that_cannot_be_used(tmp_path):
    (tmp_path / "loop.yaml").write_text("__base__: loop.yaml\n")
    (tmp_path / "broken.yaml").write_text("model:\n  lr: [0.1\n")
    (tmp_path / "child.yaml").write_text("__base__: gone.yaml\n")
    (tmp_path / "list.yaml").write_text("- fit\n")
    expected = {"loop.yaml": "the __base__ chain loops", "broken.yaml": "line 3: not valid YAML",
                "child.yaml": "gone.yaml not found (the __base__ of", "list.yaml": "a config file holds a mapping"}
    for name, message in expected.items():
        for command in (["fit", "--config"], ["compare", "--out", str(tmp_path / "o"), "--config"]):
            with pytest.raises(SystemExit) as exit_:
                main([*command, str(tmp_path / name)])
            assert message in exit_.value.code and "\n" not in exit_.value.code, exit_.value.code


def test_a_bad_value_on_the_command_line_is_one_line(tmp_path):
    """No file to name: jsonargparse's nested message is folded into one line, not the 100-line usage."""
    config = str(REPO / "configs" / "synthetic_w4a4.yaml")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--model.quant.bits_w", "0"])
    assert "\n" not in exit_.value.code and "bits_w must be an integer in [2, 8]" in exit_.value.code
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", config, "--model.no_such_key", "1"])
    assert exit_.value.code.startswith("fqn fit: ") and "no_such_key" in exit_.value.code
    assert exit_.value.code.endswith("(--help lists the options)") and "\n" not in exit_.value.code


def test_error_line_of_a_dataloader_worker(tmp_path):
    """A worker re-raises with the worker's whole traceback in the message; the line keeps the original message."""
    from torch._utils import ExceptionWrapper

    from fqn.data.sanitize import load_image

    write_garbage(tmp_path / "1.png")
    try:
        load_image(str(tmp_path / "1.png"))
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as err:
        wrapped.reraise()
    assert "Original Traceback" in str(err.value)
    line = error_line(err.value)
    assert line.startswith(f"{tmp_path / '1.png'}: image file is corrupt or not an image (UnidentifiedImageError")
    assert line.endswith("fix or restore the file, or set skip_bad (data.skip_bad: true in a config) to skip such "
                         "samples")  # raised by fqn: no --debug hint
    assert error_line(ValueError("deep inside torch")) == "deep inside torch (fqn --debug shows the traceback)"


def test_version_and_help(capsys):
    import fqn

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"fqn {fqn.__version__}"
    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    from fqn.commands.cli import COMMANDS

    assert all(f"  {name} " in printed for name in ("fit", "validate", "test", *COMMANDS))
    assert main(["nonsense"]) == 2 and "unknown command 'nonsense'" in capsys.readouterr().err


def test_one_vocabulary_across_commands():
    """One name and one meaning per concept: the same option is spelled, typed and defaulted the same everywhere."""
    from fqn.commands.cli import parsers

    options = {name: {o: a for a in p._actions for o in a.option_strings} for name, p in parsers().items()}
    spelled = {o for opts in options.values() for o in opts}
    for old in ("--runtimes", "--bits", "--float-ckpt", "--output", "--qat-ckpt", "--peer"):
        assert old not in spelled, old
    for name, opts in options.items():
        if name != "demo":
            assert "--out" in opts, name  # every command writes into --out DIR
        if "--threads" in opts and name != "ablate":
            assert opts["--threads"].default is None, name  # torch's default everywhere
        if "--runtime" in opts:
            assert set(opts["--runtime"].choices) == {"onnxruntime", "openvino"}, name
        if "--peers" in opts:
            assert set(opts["--peers"].choices) == {"onnxruntime", "torchao"} and opts["--peers"].nargs == "+"
            assert "--no-peers" in opts, name
        for flag in ("--ptq-bits", "--qat-bits"):
            if flag in opts:
                assert list(opts[flag].choices) == list(range(2, 9)), (name, flag)
                if opts[flag].nargs == "+" and opts[flag].default:  # a list with a default: a --no-... switch
                    assert f"--no-{flag[2:5]}" in opts, (name, flag)
        if "--n-cal" in opts and name != "demo":
            assert opts["--n-cal"].default == 20 or name == "quickstart", name
        if "--config" in opts:
            assert "NAME|FILE" in opts["--config"].metavar, name
        for flag, action in opts.items():  # a default written into the help is the one argparse uses
            written = re.search(r"\(default: (-?[0-9.]+)\)", action.help or "")
            assert written is None or str(action.default) == written.group(1), (name, flag, action.default)
    defaults: dict[str, set] = {}
    for opts in options.values():
        for flag in ("--reconstruction-iters", "--reconstruction", "--head-bits", "--gamma"):
            if flag in opts:
                defaults.setdefault(flag, set()).add(repr(opts[flag].default))
    assert all(len(d) == 1 for d in defaults.values()), defaults  # one default for one option, in every command
    for name in ("convert", "evaluate", "predict", "analyze"):  # one model: the first argument
        assert parsers()[name]._actions[1].dest == "model", name
    with pytest.raises(SystemExit) as exit_:  # a bare list option is an error, not "none"
        main(["compare", "--out", "o", "--peers"])
    assert exit_.value.code == 2
