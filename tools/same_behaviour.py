"""Show that a refactor left behaviour unchanged: the same small quickstart, the same int8 files.

``record DIR`` runs a small quickstart (fixed seed, fixed threads) into ``DIR/quickstart`` and writes
``DIR/fingerprint.json``: the comparison's AP columns and, for every int8 file, a digest of its graph
and of its initializers' raw bytes (the integer weight codes, scales and zero points). The digest does
not depend on the names the exporter numbers values with (they shift when the traced code creates one
more or one less intermediate value): every value is named by what produces it, initializers by their
content. ``check DIR`` runs the same quickstart again on the current code into a fresh folder, converts
``DIR``'s checkpoints again, and reports every difference from ``DIR`` (both digested now, by this code).
The file's metadata (commit, command line) is left out: it names the code, not what it computes.

    python tools/same_behaviour.py record /tmp/before     # on the old code
    python tools/same_behaviour.py check /tmp/before      # on the new code: exit 1 on any difference
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

QUICKSTART = ["--size", "96", "--float-steps", "40", "--qat-steps", "10", "--num-val", "24", "--n-cal", "4",
              "--runs", "1", "--threads", "2", "--no-peers"]
AP_COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "fake_quant_AP"]


def onnx_digest(path: Path) -> dict[str, Any]:
    """What an int8 file computes, without its provenance or value names: graph structure and initializer bytes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    names: dict[str, str] = {"": ""}
    inits = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        names[t.name] = f"{a.dtype}{list(a.shape)}:" + hashlib.sha256(a.tobytes()).hexdigest()[:16]
        inits[names[t.name]] = inits.get(names[t.name], 0) + 1
    for i, inp in enumerate(model.graph.input):
        names.setdefault(inp.name, f"input{i}")
    nodes = []
    for k, n in enumerate(model.graph.node):
        ins = [names.get(x, f"?{x}") for x in n.input]
        for j, out in enumerate(n.output):
            names[out] = f"v{k}.{j}"
        attrs = sorted(onnx.helper.printable_attribute(a) for a in n.attribute)
        nodes.append([n.op_type, n.domain, ins, len(n.output), attrs])
    return {"nodes": hashlib.sha256(json.dumps(nodes).encode()).hexdigest()[:16], "n_nodes": len(nodes),
            "initializers": dict(sorted(inits.items()))}


def fingerprint(folder: Path) -> dict[str, Any]:
    table = json.loads((folder / "compare" / "compare.json").read_text())
    rows = {r["name"]: {k: r.get(k) for k in AP_COLUMNS} for r in table["rows"]}
    files = {p.name: onnx_digest(p) for p in sorted((folder / "compare").glob("*.onnx"))}
    return {"rows": rows, "files": files}


def quickstart(out: Path) -> None:
    subprocess.run([sys.executable, "-m", "fqn.commands.cli", "quickstart", "--out", str(out), *QUICKSTART],
                   check=True)


def checkpoints(folder: Path) -> dict[str, Path]:
    """The quickstart's training runs: ``float/last.ckpt``, ``qat_w4a4/last.ckpt``."""
    found = {p.parent.name: p for p in sorted(folder.glob("*/last.ckpt"))}
    if not found:
        raise FileNotFoundError(f"no */last.ckpt under {folder}")
    return found


def converted(folder: Path) -> dict[str, Any]:
    return {name: {p.name: onnx_digest(p) for p in sorted((folder / name).glob("*.onnx"))}
            for name in sorted(p.name for p in folder.iterdir())}


def convert(ckpt: Path, out: Path) -> dict[str, Any]:
    ptq = ["--ptq-bits", "4", "--n-cal", "4"] if ckpt.parent.name == "float" else []
    subprocess.run([sys.executable, "-m", "fqn.commands.cli", "convert", str(ckpt), "--out", str(out), *ptq],
                   check=True)
    return {p.name: onnx_digest(p) for p in sorted(out.glob("*.onnx"))}


def diff(a: Any, b: Any, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'before' if k in a else 'after'}")
            else:
                out += diff(a[k], b[k], f"{where}/{k}")
        return out
    return [] if a == b else [f"{where}: {a} != {b}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("action", choices=["record", "check"])
    p.add_argument("dir", type=Path)
    a = p.parse_args(argv)
    if a.action == "record":
        quickstart(a.dir / "quickstart")
        for name, c in checkpoints(a.dir / "quickstart").items():
            convert(c, a.dir / "converted" / name)
        fp = {**fingerprint(a.dir / "quickstart"), "converted": converted(a.dir / "converted")}
        (a.dir / "fingerprint.json").write_text(json.dumps(fp, indent=1))
        print(f"recorded {a.dir / 'fingerprint.json'}")
        return 0
    n = 0
    while (a.dir / f"after{n}").exists():
        n += 1
    after_dir = a.dir / f"after{n}"
    quickstart(after_dir / "quickstart")
    # the old code's checkpoints, converted by the new code: the same codes from the same training state
    for name, c in checkpoints(a.dir / "quickstart").items():
        convert(c, after_dir / "converted" / name)
    before = {**fingerprint(a.dir / "quickstart"), "converted": converted(a.dir / "converted")}
    after = {**fingerprint(after_dir / "quickstart"), "converted": converted(after_dir / "converted")}
    problems = diff(before, after)
    for line in problems:
        print(line)
    print(f"{len(problems)} difference(s) between {a.dir} and {after_dir}; AP rows compared: {len(before['rows'])}, "
          f"int8 files: {len(before['files'])} + {sum(len(v) for v in before['converted'].values())} converted")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
