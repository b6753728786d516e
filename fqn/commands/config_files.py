"""The one reader of fqn's YAML config files: ``__base__`` chains, checked, for LightningCLI and the commands.

The configs fqn ships live inside the package (``fqn/configs/``), so an installed fqn names them from any folder:
``--config coco_r50_w4a4`` is the packaged file, ``--config my.yaml`` (any path) a file of the user's.
A config may start with ``__base__: base.yaml`` so that it holds only what differs: the base is found beside the
file, else among the packaged configs, so a user's own file can start from fqn's ``base.yaml`` wherever it lives.
`read_config_chain` reads and checks the chain (every file exists and is a mapping, no loop, each ``model.quant``
valid, blaming the file that breaks it); `expand_config_bases` hands the chain to LightningCLI as its own
``--config`` files; `load_config` merges it into one mapping for the commands that are not Lightning's.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from fqn.config import QuantConfig

#: The configs shipped with fqn (package data).
PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def packaged_configs() -> list[str]:
    """The names of the configs fqn ships, as ``--config`` takes them (``coco_r50_w4a4``, ...)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def resolve_config(name: str | Path) -> Path:
    """The file a ``--config`` value names: an existing path as it is, else a packaged config by name.

    Example:
        >>> resolve_config("synthetic_w4a4").name
        'synthetic_w4a4.yaml'
    """
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):  # a bare name: the packaged config of that name (".yaml" optional)
        packaged = PACKAGED_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if packaged.is_file():
            return packaged
    raise FileNotFoundError(f"config {name} not found: neither a file nor one of the configs fqn ships "
                            f"({', '.join(packaged_configs())})")


def config_name(name: str | Path) -> str:
    """The run name of a config: its file name without ``.yaml`` (``my/street_w4a4.yaml`` -> ``street_w4a4``)."""
    return resolve_config(name).stem


def expand_config_bases(argv: list[str], tmp_dir: str) -> list[str]:
    """Replace ``--config FILE`` by the chain of its ``__base__`` files followed by FILE itself.

    A config may start with ``__base__: base.yaml`` (a path relative to it), so overrides stay short;
    each file of the chain is passed to LightningCLI as its own ``--config``, base first; the
    overrides, stripped of ``__base__``, are written to ``tmp_dir``. The chain is checked first (see
    :func:`read_config_chain`), so a bad value is reported with the file it is in.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        if path is None:
            out.append(arg)
            i += 1
            continue
        chain = read_config_chain(path)
        files = []
        for k, (current, data) in enumerate(reversed(chain)):  # leaf first, as the files name each other
            if "__base__" in data:
                stripped = Path(tmp_dir) / f"{len(out)}_{k}_{current.name}"
                stripped.write_text(yaml.safe_dump({key: v for key, v in data.items() if key != "__base__"}))
                current = stripped
            files.append(str(current))
        for item in reversed(files):
            out += ["--config", item]
        i += 1 if arg.startswith("--config=") else 2
    return out


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


def read_config_chain(path: str | Path) -> list[tuple[Path, dict]]:
    """``[(file, its mapping), ...]`` of a config and its ``__base__`` files, base first, checked.

    Each file must exist and hold a YAML mapping; the chain must not loop; and each ``model.quant`` section, merged
    over the files before it, must be a valid :class:`~fqn.config.QuantConfig`. Otherwise :class:`ConfigError`
    (or FileNotFoundError) names the file that made it wrong.
    """
    chain: list[tuple[Path, dict]] = []
    current = resolve_config(path)
    while True:
        if not current.is_file():
            raise FileNotFoundError(f"config file {current} not found (the __base__ of {chain[-1][0]}); a __base__ "
                                    "is a path relative to the file that names it, or a config fqn ships")
        if any(current.resolve() == seen.resolve() for seen, _ in chain):
            raise ConfigError(f"{current}: the __base__ chain loops ({' -> '.join(str(p) for p, _ in chain)})")
        try:
            data = yaml.safe_load(current.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ConfigError(f"{current}{where}: not valid YAML ({problem})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{current}: a config file holds a mapping (model:, data:, trainer: ...), "
                              f"got {type(data).__name__}")
        chain.append((current, data))
        if "__base__" not in data:
            break
        base = current.parent / str(data["__base__"])
        packaged = PACKAGED_CONFIGS / str(data["__base__"])
        current = base if base.is_file() or not packaged.is_file() else packaged
    chain.reverse()
    _check_quant_sections(chain)
    return chain


def _check_quant_sections(chain: list[tuple[Path, dict]]) -> None:
    """Build ``model.quant`` after each file of the chain (base first), blaming the first file that breaks it."""
    quant: dict | None = None
    for file, data in chain:
        model = data.get("model")
        if not isinstance(model, dict) or "quant" not in model:
            continue
        section = model["quant"]
        if section is None:
            quant = None
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{file}: model.quant must be a mapping of QuantConfig keys (bits_w, bits_a, ...) "
                              f"or null, got {section!r}")
        if "class_path" in section or "init_args" in section:  # jsonargparse's long form of the same
            section = section.get("init_args") or {}
        quant = {**(quant or {}), **section}
        try:
            QuantConfig.from_dict(quant)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{file}: model.quant: {err}") from None


def load_config(path: str | None) -> dict:
    """A training config with its ``__base__`` chain merged (later files win, dicts merge key by key)."""
    if path is None:
        return {}

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    merged: dict = {}
    for _, cfg in read_config_chain(path):
        merged = merge(merged, {k: v for k, v in cfg.items() if k != "__base__"})
    return merged
