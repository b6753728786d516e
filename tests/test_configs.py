"""Every file in configs/ starts as a user runs it: `--print_config`, then a short `fqn fit` on tiny data written here.

Chains run in order, as a user runs them: the float config writes the checkpoint the QAT config starts from, at the
path the QAT config names. Nothing downloads: `weights: null` (the pretrained path has its own test).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.data.files import kitti_line, write_coco, write_kitti

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
SIZE = 128
TINY = ["--model.min_size", str(SIZE), "--model.max_size", str(SIZE), "--data.batch_size", "2",
        "--data.num_workers", "0", "--trainer.limit_val_batches", "1"]
COCO_IDS = [{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}, {"id": 44, "name": "bottle"}]
CUSTOM = [{"id": 3, "name": "crack"}, {"id": 9, "name": "dent"}, {"id": 5, "name": "rust"}]


def fqn(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("fqn")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900, env=env)


def coco_files(root: Path, categories: list[dict], n: int = 4) -> list[str]:
    """``root/{train,val}``: n and 2 images of SIZE px with two boxes each, one COCO JSON per split."""
    out = []
    for split, count in (("train", n), ("val", 2)):
        images = [{"id": i + 1, "file_name": f"{i}.png", "width": SIZE, "height": SIZE - 16} for i in range(count)]
        anns = [{"id": 10 * i + k, "image_id": i + 1, "category_id": categories[(i + k) % len(categories)]["id"],
                 "bbox": [8.0 + 30 * k, 10.0, 40.0, 50.0], "area": 2000.0, "iscrowd": 0}
                for i in range(count) for k in range(2)]
        image_dir, ann_file = write_coco(root / split, images, anns, categories)
        out += [image_dir, ann_file]
    return out


def coco_args(files: list[str]) -> list[str]:
    keys = ("--data.train_images", "--data.train_ann", "--data.val_images", "--data.val_ann")
    return [a for pair in zip(keys, files) for a in pair]


def kitti_args(root: Path) -> list[str]:
    frames = {f"{i:06d}": [kitti_line("Car", (10.0, 20.0, 60.0, 70.0)), kitti_line("Pedestrian", (70, 5, 90, 60))]
              for i in range(6)}
    write_kitti(root, frames, size=(SIZE, SIZE - 16))
    return ["--data.data_root", str(root)]


def qat_checkpoint(cwd: Path) -> Path:
    found = sorted(cwd.glob("runs/**/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_prints(name, capsys):
    """`fqn fit --config X --print_config`, through the CLI's own entry point in this process (the console
    script's start-up, importing torch, costs a subprocess 6-10 s; the chains below run it for real)."""
    from fqn.commands.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {"model", "data", "trainer"} <= set(printed)
    quant = yaml.safe_load((REPO / "configs" / name).read_text()).get("model", {}).get("quant")
    if quant and "bits_w" in quant:  # the file's own settings win over base.yaml's
        assert printed["model"]["quant"]["bits_w"] == quant["bits_w"]


def test_every_config_is_in_a_chain_below():
    started = {c for chain in CHAINS.values() for c in chain} | STARTED_ELSEWHERE
    assert set(CONFIGS) - {"base.yaml"} == started


CHAINS = {  # float config first (it writes the checkpoint), then the QAT configs that start from it
    "synthetic": ("synthetic_float.yaml", "synthetic_w8a8.yaml", "synthetic_w4a4.yaml"),
    "street": ("street_float.yaml", "street_w8a8.yaml", "street_w4a4.yaml"),
    "kitti": ("kitti_r50_float.yaml", "kitti_r50_w8a8.yaml"),
    "custom_coco": ("custom_coco_r50_float.yaml", "custom_coco_r50_w8a8.yaml"),
}
# coco_r50_w4a4 runs `fqn fit`, `fqn compare` and the int8 file with its own torchvision weights (written to a hub
# cache of the test's) in test_pretrained.py, on tiny COCO files; one R50 QAT start is enough for the suite's time
STARTED_ELSEWHERE = {"coco_r50_w4a4.yaml"}


def fit_here(args: list[str], cwd: Path, monkeypatch, caplog) -> str:
    """`fqn fit ARGS` through the CLI's entry point in this process, from ``cwd``; returns what it logged.

    The console script's start-up (importing torch and Lightning) costs a subprocess 6-10 s; test_install.py and
    test_pretrained.py run the installed `fqn` itself."""
    from fqn.commands.cli import main

    monkeypatch.chdir(cwd)
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(["fit", *args]) == 0
    return caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_every_config_starts_on_tiny_data(chain, tmp_path, monkeypatch, caplog):
    if chain == "synthetic":
        data = ["--data.num_train", "4", "--data.num_val", "2", "--data.synthetic.image_size", str(SIZE),
                "--data.synthetic.max_size", "48"]
    elif chain == "street":  # written to the configs' data/street under tmp_path by the first run, reused after
        data = ["--data.street.height", "48", "--data.street.num_frames", "6", "--data.street.max_objects", "4"]
    elif chain == "kitti":
        data = kitti_args(tmp_path / "kitti")
    else:
        data = coco_args(coco_files(tmp_path / "data", CUSTOM if chain == "custom_coco" else COCO_IDS))
    first, *qat = CHAINS[chain]
    pretrained = ["--model.weights", "null"] if "weights" in yaml.safe_load((REPO / "configs" / first).read_text())[
        "model"] else []
    if qat:  # the float config: one real step and a checkpoint where the QAT configs look for it
        fit_here(["--config", str(REPO / "configs" / first), *TINY, *data, *pretrained, "--trainer.max_steps", "1",
                  "--trainer.val_check_interval", "1"], tmp_path, monkeypatch, caplog)
        if chain == "custom_coco":
            ptq_without_config_calibrates_on_the_checkpoints_own_data(tmp_path, first, monkeypatch)
    else:
        qat = [first]
    for name in qat:
        cfg = yaml.safe_load((REPO / "configs" / name).read_text())
        init_from = cfg["model"].get("init_from")
        if init_from:
            assert (tmp_path / init_from).is_file(), f"{name} starts from {init_from}, which the float config " \
                                                     "did not write"
        weights = ["--model.weights", "null"] if cfg["model"].get("weights") else []
        logged = fit_here(["--config", str(REPO / "configs" / name), *TINY, *data, *weights, "--model.quant.n_cal",
                           "1", "--trainer.fast_dev_run", "1"], tmp_path, monkeypatch, caplog)
        assert "PTQ after calibration" in logged, name
    if chain == "street":  # one set, written by the first run at the overridden height, its width derived from it
        manifest = json.loads((tmp_path / "data" / "street" / "street_manifest.json").read_text())
        assert (manifest["config"]["height"], manifest["config"]["width"]) == (48, 158)


def test_coco_recipe_keeps_category_ids_as_labels(tmp_path):
    """The 91-way head: stop sign (id 13) is label 13, not 2; a foreign label space is a clear error."""
    from fqn.commands.config_files import load_config
    from fqn.data.datamodule import DetectionDataModule

    files = coco_files(tmp_path / "coco", COCO_IDS)
    cfg = load_config(str(REPO / "configs" / "coco_r50_w4a4.yaml"))
    cfg["data"].update(dict(zip(("train_images", "train_ann", "val_images", "val_ann"), files)), num_workers=0)
    dm = DetectionDataModule.from_config(cfg)
    assert dm.coco_label_mode == "category_id" and dm.num_classes == 91
    assert dm.class_names[12] == "stop sign" and dm.class_names[11] == "N/A"  # label 13, and unused id 12
    dm.setup("fit")
    labels = {int(label) for _, t in dm.val_dataset for label in t["labels"]}
    assert labels == {1, 13, 44}
    custom = coco_files(tmp_path / "custom", CUSTOM)
    cfg["data"].update(dict(zip(("train_images", "train_ann", "val_images", "val_ann"), custom)))
    with pytest.raises(ValueError, match="model.num_classes: 4"):
        DetectionDataModule.from_config(cfg)
    cfg["model"]["num_classes"] = 4  # a new head on the user's own classes: contiguous labels by name
    dm = DetectionDataModule.from_config(cfg)
    assert dm.coco_label_mode == "contiguous" and dm.class_names == ["crack", "rust", "dent"]


def ptq_without_config_calibrates_on_the_checkpoints_own_data(cwd: Path, config: str, monkeypatch) -> None:
    """`fqn convert CKPT --ptq-bits 8` with no --config: the COCO data the checkpoint was trained on calibrates it,
    never the synthetic set; with that data gone, an error that says to pass --config."""
    import shutil

    from fqn.commands.cli import main
    from fqn.data.datamodule import DetectionDataModule

    ckpt = cwd / "runs" / Path(config).stem / "checkpoints" / "last.ckpt"
    calibrated_on = []
    original = DetectionDataModule.calibration_batches

    def spy(self, n):
        calibrated_on.append((self.source, self.coco_paths["train_ann"], self.class_names))
        return original(self, n)

    monkeypatch.setattr(DetectionDataModule, "calibration_batches", spy)
    monkeypatch.chdir(cwd)  # the checkpoint's data paths are relative to where it was trained
    assert main(["convert", str(ckpt), "--ptq-bits", "8", "--n-cal", "1", "--out", "int8"]) == 0
    train_ann = str(cwd / "data" / "train" / "ann.json")
    assert calibrated_on == [("coco", train_ann, ["crack", "rust", "dent"])]
    shutil.move(cwd / "data", cwd / "data_moved")  # the data gone from where the run was trained
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(ckpt), "--ptq-bits", "8", "--n-cal", "1", "--out", "int8_again"])
    shutil.move(cwd / "data_moved", cwd / "data")  # back, for the chain's QAT config
    message = str(exit_.value.code)
    assert "the data" in message and "is not usable here" in message and "pass --config" in message, message
    assert "\n" not in message


@pytest.mark.slow
def test_a_second_fit_of_a_config_does_not_train_over_the_first(tmp_path, monkeypatch):
    """A config's run folder is runs/NAME; fitting it again is refused (resume with --ckpt_path, or name another)."""
    from fqn.commands.cli import main

    monkeypatch.chdir(tmp_path)
    tiny = [*TINY, "--data.num_train", "2", "--data.num_val", "2", "--data.synthetic.image_size", str(SIZE),
            "--data.synthetic.max_size", "48", "--trainer.max_steps", "1", "--trainer.val_check_interval", "1"]
    assert main(["fit", "--config", "synthetic_float", *tiny]) == 0  # a packaged config, by name
    last = Path("runs") / "synthetic_float" / "checkpoints" / "last.ckpt"
    assert last.is_file() and list(Path("runs/synthetic_float").glob("events.out.tfevents.*"))
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "synthetic_float", *tiny])
    message = str(exit_.value.code)
    assert message.startswith("fqn fit: runs/synthetic_float already holds a run") and f"--ckpt_path {last}" in message
    assert "--trainer.logger.init_args.name synthetic_float_2" in message
    assert main(["fit", "--config", "synthetic_float", *tiny, "--trainer.logger.init_args.name", "again"]) == 0
    assert (Path("runs") / "again" / "checkpoints" / "last.ckpt").is_file()
