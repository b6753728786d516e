"""The one report writer and the one timer of the commands: tables as Markdown, CSV, JSON and TensorBoard.

`compare`, `ablate`, `demo` and ``tools/collect_results.py`` describe their tables as `Column` lists
and let `markdown_table` / `write_report` format them, so every table prints a missing value the
same way and every result lands as JSON beside its Markdown. `RoundRobinTimer` times several models
in turns, so a noisy machine slows every one of them alike.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

MISSING = "–"


@dataclass(frozen=True)
class Column:
    """One column of a table: the row key, its header, and how its numbers are written.

    ``digits``: decimals of a number. ``signed``: write ``+``/``-`` (a difference); unsigned numbers
    equal to -1 are "not measured" (torchmetrics' empty size bin) and print as missing. ``suffix``
    follows a number (``x`` for a speedup).
    """

    key: str
    header: str | None = None
    digits: int = 3
    signed: bool = False
    suffix: str = ""
    fmt: str | None = None  # a format spec instead of ``digits`` (e.g. ".3g" for errors spanning decades)

    def cell(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return MISSING
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)
        if self.fmt is not None:
            return f"{value:{self.fmt}}{self.suffix}"
        if self.signed:
            return f"{value:+.{self.digits}f}{self.suffix}"
        if value == -1:
            return MISSING
        return f"{value:.{self.digits}f}{self.suffix}"


def columns(*specs: str | Column) -> list[Column]:
    """Columns from keys (header = key) or `Column` objects."""
    return [c if isinstance(c, Column) else Column(c) for c in specs]


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[Column]) -> str:
    """A Markdown table of ``rows`` over ``cols``.

    Example:
        >>> print(markdown_table([{"model": "FP32", "AP": 0.7123, "APs": -1}], columns("model", "AP", "APs")))
        | model | AP | APs |
        |---|---|---|
        | FP32 | 0.712 | – |
    """
    lines = ["| " + " | ".join(c.header or c.key for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.cell(r.get(c.key)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """``value`` with NaN as null (JSON has no NaN) and private keys (``_...``) dropped."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path: Path, obj: Any) -> Path:
    """Write atomically (a temporary file renamed), so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2))
    tmp.replace(path)
    return path


def write_report(out: Path, stem: str, rows: Sequence[dict[str, Any]], cols: Sequence[Column], *,
                 meta: dict[str, Any] | None = None, footer: str = "", csv_keys: Sequence[str] | None = None) -> Path:
    """``stem.json`` (``{"meta": ..., "rows": ...}``), ``stem.md`` (the table and ``footer``) and ``stem.csv``.

    Returns the Markdown path. CSV holds ``csv_keys`` (default: the columns' keys).
    """
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", {"meta": meta or {}, "rows": list(rows)})
    md = out / f"{stem}.md"
    md.write_text(markdown_table(rows, cols) + ("\n" + footer if footer else "") + "\n")
    keys = list(csv_keys or [c.key for c in cols])
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: json_safe(r.get(k)) for k in keys} for r in rows])
    return md


class RowLog:
    """A measurement's rows, rewritten to ``out/stem.json`` and ``out/stem.md`` after every row, so an interrupted
    run keeps what it measured; the last row is printed as a table line as it lands.

    ``header``: what the JSON says above its ``rows`` (the inputs, the provenance). ``resume``: keep the rows an
    earlier, interrupted run wrote to the same file, for `earlier` to hand back instead of measuring them again;
    that file must have been measured with the same header (all but its provenance), or it is an error, never a
    silent mix of two experiments.
    """

    def __init__(self, out: Path, stem: str, cols: Sequence[Column], header: dict[str, Any],
                 resume: bool = False) -> None:
        self.out, self.stem, self.cols, self.header = Path(out), stem, list(cols), header
        self.rows: list[dict[str, Any]] = []
        self._earlier = self._load_earlier() if resume else []
        self.out.mkdir(parents=True, exist_ok=True)

    def _load_earlier(self) -> list[dict[str, Any]]:
        path = self.out / f"{self.stem}.json"
        if not path.is_file():
            return []
        old = json.loads(path.read_text())
        inputs = {k: v for k, v in old.items() if k not in ("rows", "provenance")}
        wanted = {k: v for k, v in json_safe(self.header).items() if k != "provenance"}
        if inputs != wanted:
            differ = sorted(k for k in inputs.keys() | wanted.keys() if inputs.get(k) != wanted.get(k))
            raise ValueError(f"cannot resume {path}: it was measured with other inputs ({', '.join(differ)}); "
                             "pass another --out, or delete the file to measure from scratch")
        return list(old.get("rows", []))

    def earlier(self, **key: Any) -> dict[str, Any] | None:
        """The row of the resumed file whose values match ``key`` (e.g. ``rounding="qdrop", iters=50``), else None."""
        for row in self._earlier:
            if all(row.get(k) == v for k, v in json_safe(key).items()):
                return row
        return None

    def measure(self, key: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Add the row for ``key``: the resumed file's (`earlier`), or the one ``measure()`` returns, with its wall
        time as ``minutes``; returns it."""
        row = self.earlier(**key)
        if row is None:
            started = time.perf_counter()
            row = measure()
            row["minutes"] = (time.perf_counter() - started) / 60
        self.add(row)
        return row

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        write_json(self.out / f"{self.stem}.json", {**self.header, "rows": self.rows})
        (self.out / f"{self.stem}.md").write_text(markdown_table(self.rows, self.cols) + "\n")
        print(markdown_table(self.rows[-1:], self.cols).splitlines()[-1], flush=True)

    def table(self) -> str:
        return markdown_table(self.rows, self.cols)


def log_scalars(log_dir: Path, rows: Sequence[dict[str, Any]], name_key: str, keys: Sequence[str],
                prefix: str, text: str | None = None) -> None:
    """One TensorBoard scalar per row and key (``prefix/key/row``), and the table as text."""
    with SummaryWriter(str(log_dir)) as writer:
        for r in rows:
            tag = str(r[name_key]).replace(" ", "_")
            for key in keys:
                value = r.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
                    writer.add_scalar(f"{prefix}/{key}/{tag}", value, 0)
        if text:
            writer.add_text(prefix, text, 0)


@dataclass
class Timed:
    """A callable and the inputs it is timed on (cycled)."""

    fn: Callable[[Any], Any]
    inputs: Sequence[Any]


class RoundRobinTimer:
    """Median wall time of several callables, run in turns: one call of each per round.

    Drift on a shared machine (another job starting, thermal throttling) then hits every callable
    alike instead of whichever happened to be timed last.
    """

    def __init__(self, runs: int = 20, warmup: int = 3, progress: bool = True) -> None:
        if runs < 1 or warmup < 0:
            raise ValueError("need runs >= 1 and warmup >= 0")
        self.runs, self.warmup, self.progress = runs, warmup, progress

    def run(self, timed: dict[Any, Timed]) -> dict[Any, float]:
        """Milliseconds per call (median) for each key of ``timed``."""
        samples: dict[Any, list[float]] = {k: [] for k in timed}
        with torch.no_grad():
            for i in range(self.warmup):
                for t in timed.values():
                    t.fn(t.inputs[i % len(t.inputs)])
            rounds: Any = range(self.runs)
            if self.progress:
                rounds = tqdm(rounds, desc=f"timing {len(timed)} models", unit="round", leave=False)
            for i in rounds:
                for key, t in timed.items():
                    t0 = time.perf_counter()
                    t.fn(t.inputs[i % len(t.inputs)])
                    samples[key].append(time.perf_counter() - t0)
        return {k: statistics.median(v) * 1000 for k, v in samples.items()}
