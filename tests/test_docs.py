"""The user docs: numbers and the CLI reference equal what renders from docs/results/ and the parsers, links lead
somewhere, history stays in CHANGELOG.md, and the deployment page's plain-runtime code runs as a deployer runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tools import load_tool

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def test_every_rendered_block_equals_its_results_file_and_the_parsers():
    tool = load_tool("render_docs")
    stale = [str(p.relative_to(REPO)) for p in PAGES
             if tool.render(p.read_text(), str(p.relative_to(REPO))) != p.read_text()]
    assert stale == [], f"out of date (run `python tools/render_docs.py`): {stale}"
    used = {m["name"] for p in PAGES for m in tool.BLOCK.finditer(p.read_text())}
    assert used == set(tool.RENDERERS), set(tool.RENDERERS) ^ used  # every renderer shows up, none is dead


def test_every_results_file_says_what_made_it():
    import json

    files = sorted((DOCS / "results").glob("*.json"))
    assert files
    for path in files:
        record = json.loads(path.read_text())
        made = record.get("machine") or record.get("provenance") or record.get("meta", {}).get("provenance")
        assert made and made.get("command") and made.get("cpu") and made.get("torch"), path.name
        assert made.get("commit"), path.name


def test_links_between_pages_lead_somewhere():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert broken == []


def test_user_docs_say_what_is_and_the_readme_is_a_guide():
    readme = (REPO / "README.md").read_text().splitlines()
    assert 150 <= len(readme) <= 260, len(readme)
    first_screens = "\n".join(readme[:100])  # two screens: install, quickstart, own data and deployment found there
    for topic in ("pip install", "fqn quickstart", "make test", "(#your-own-data)", "(#deploy)", "(#limits)"):
        assert topic in first_screens, topic
    history = [f"{p.name}: {m.group(0)}" for p in PAGES
               for m in re.finditer(r"[Ii]ssue \d+|before issue|exp13", p.read_text())]
    assert history == []
    for name in ("CHANGELOG.md", "LICENSE", "CITATION.cff"):
        assert (REPO / name).is_file(), name
    assert "Apache License" in (REPO / "LICENSE").read_text()


def code_blocks(page: Path, marker: str) -> list[str]:
    """The fenced code that follows each ``<!-- test: MARKER -->`` line of a page."""
    text = page.read_text()
    return re.findall(rf"<!-- test: {marker} -->\s*```python\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def shipped_file(tmp_path_factory, _float_detectors, scenes):
    """An int8 file as `fqn convert` writes it, and a JPEG a camera could have taken, in a folder of their own."""
    import copy

    from PIL import Image

    from fqn import QuantConfig, calibrate, convert_int8, prepare_qat

    folder = tmp_path_factory.mktemp("deploy")
    model = prepare_qat(copy.deepcopy(_float_detectors["resnet18"]), QuantConfig(bits_w=8, bits_a=8))
    calibrate(model, [[img] for img in scenes[:4]], num_batches=4, progress=False)
    convert_int8(model.eval(), folder / "model.onnx", scenes[:1], metadata={"class_names": ["car", "van"]})
    pixels = (scenes[5].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(pixels).save(folder / "image.jpg", quality=95)
    return folder


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_the_deployment_pages_plain_runtime_code_runs_without_fqn(runtime, shipped_file):
    """The page's code, run as its own process with fqn made unimportable, prints what fqn's own loader finds."""
    import json

    import numpy as np
    from PIL import Image

    from fqn.int8 import load_int8

    (snippet,) = code_blocks(DOCS / "deployment.md", runtime)
    assert "fqn" not in re.sub(r"#.*", "", snippet).replace('"fqn.class_names"', "")  # no fqn import or call
    guard = "import sys; sys.modules['fqn'] = None  # `import fqn` fails here\n"
    result = subprocess.run([sys.executable, "-c", guard + snippet + "\nimport json; print('RESULT', json.dumps("
                             "{'boxes': np.asarray(boxes).tolist(), 'labels': np.asarray(labels).tolist(), "
                             "'scores': np.asarray(scores).tolist()}))"],
                            cwd=shipped_file, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("RESULT "))
    plain = json.loads(line[len("RESULT "):])
    image = torch.from_numpy(np.asarray(Image.open(shipped_file / "image.jpg").convert("RGB"), dtype=np.float32)
                             / 255.0).permute(2, 0, 1)
    ours = load_int8(shipped_file / "model.onnx", runtime=runtime)([image])[0]
    assert len(plain["boxes"]) == len(ours["boxes"]) > 0
    assert torch.allclose(torch.tensor(plain["boxes"]).reshape(-1, 4), ours["boxes"], atol=1e-4)
    assert plain["labels"] == ours["labels"].tolist()
    assert torch.allclose(torch.tensor(plain["scores"]), ours["scores"], atol=1e-5)
    printed = [line.split()[0] for line in result.stdout.splitlines()[:5]]
    assert printed == [["car", "van"][label - 1] for label in ours["labels"][:5].tolist()]  # the file's class names


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``fqn ...`` line in the pages' shell code blocks (continuation lines joined, comments dropped)."""
    import shlex

    found = []
    for page in PAGES:
        language, lines = None, []
        for raw in page.read_text().splitlines():
            if raw.startswith("```"):
                if language is None:
                    language, lines = raw[3:].strip() or "text", []
                    continue
                if language in ("bash", "sh", "console"):
                    for line in re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines():
                        line = line.split(" #")[0].strip()
                        if line.startswith("fqn ") and "..." not in line and "|" not in line:
                            found.append((page.name, shlex.split(line)[1:]))
                language = None
            elif language is not None:
                lines.append(raw)
    return found


def test_every_documented_fqn_command_parses():
    """The commands the docs show are the CLI's: a renamed or removed option fails here, not in a user's shell."""
    from fqn.commands.cli import COMMANDS, LIGHTNING_COMMANDS

    commands = documented_commands()
    assert len(commands) > 30
    for page, argv in commands:
        name = argv[0] if argv else ""
        if name in ("--version", "--help") or name == "--debug":
            continue
        assert name in COMMANDS or name in LIGHTNING_COMMANDS, (page, argv)
        if name in COMMANDS:
            build, _ = COMMANDS[name]
            try:
                build().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"{page}: `fqn {' '.join(argv)}` does not parse")
