"""Which shard modes a model's architecture offers, read from its config.json where that needs no download.

``plan`` picks a sharded model's mode with this and ``validate`` rejects a mode the architecture lacks
(mlx-lm: ``model.model.pipeline`` for pipeline, ``model.shard`` for tensor parallel), so an operator
learns it before any host loads a shard. A source is looked at only where it already is: a demo model
(built offline), a local directory, a hub id in the Hugging Face cache; anything else is left unchecked.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from deployments.config import ShardConfig
from engine.distributed import ShardMode

if TYPE_CHECKING:
    from .inventory import Fleet

DEFAULT_MODE: ShardMode = ShardConfig.model_fields["mode"].default  # pipeline: suits Ethernet
NOT_LOCAL = "not in the local cache"


class Architecture(NamedTuple):
    model_type: str
    modes: frozenset[str]


class ModeCheck(NamedTuple):
    """A sharded model to check: where it is in the file, its source and the mode it asks for."""

    path: str
    source: str
    revision: str | None
    mode: str


def local_dir(source: str, revision: str | None = None) -> Path | None:
    """The model's directory when it is here without a download (a demo model is built, offline)."""
    from engine import sources

    from .placement import _hf_cache_snapshot

    if sources.is_demo(source):
        try:
            return Path(sources.resolve(source))
        except ValueError:  # an unknown demo name: reported by the config's own checks
            return None
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if sources.is_hub_id(source):
        return _hf_cache_snapshot(source, revision)
    return None


def architecture(source: str, revision: str | None = None) -> Architecture | None:
    """The architecture and its shard modes; None when the model is not here or mlx-lm cannot say."""
    from engine.shard import supported_modes

    found = local_dir(source, revision)
    if found is None or not (found / "config.json").is_file():
        return None
    try:
        model_type = str(json.loads((found / "config.json").read_text())["model_type"])
        return Architecture(model_type, frozenset(supported_modes(str(found))))
    except (OSError, ValueError, KeyError, TypeError):  # unreadable config, an architecture mlx-lm lacks
        return None


def offers(arch: Architecture) -> str:
    if not arch.modes:
        return "no sharding"
    return " and ".join(sorted(arch.modes)) + (" only" if len(arch.modes) == 1 else "")


def mode_problem(source: str, arch: Architecture, mode: str) -> str | None:
    """``demo:tiny's architecture (llama) offers tensor only, not pipeline``, or None when it offers ``mode``."""
    if mode in arch.modes:
        return None
    return f"{source}'s architecture ({arch.model_type}) offers {offers(arch)}, not {mode}"


def pick_mode(source: str, revision: str | None = None) -> tuple[ShardMode, str | None]:
    """``(mode, note)`` for a sharded model that names none: pipeline where the architecture offers it,
    else tensor; pipeline (with a note saying so) when the model is not here to look at.
    ValueError when the architecture offers neither."""
    arch = architecture(source, revision)
    if arch is None:
        return DEFAULT_MODE, f"{source} is {NOT_LOCAL}, so its architecture was not checked: mode {DEFAULT_MODE} " \
                             "(set shard.mode to choose)"
    for mode in (DEFAULT_MODE, "tensor"):
        if mode in arch.modes:
            return mode, None  # type: ignore[return-value]
    raise ValueError(f"{source}'s architecture ({arch.model_type}) offers no sharding (neither pipeline nor tensor)")


def check(models: Iterable[ModeCheck]) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: ``path: problem`` for each mode the architecture lacks, and a note for each
    model that could not be looked at."""
    problems, notes = [], []
    for m in models:
        arch = architecture(m.source, m.revision)
        if arch is None:
            notes.append(f"{m.path} not checked: {m.source} is {NOT_LOCAL}")
            continue
        problem = mode_problem(m.source, arch, m.mode)
        if problem:
            problems.append(f"{m.path}: {problem}")
    return problems, notes


def in_app_args(args: object, where: str) -> list[ModeCheck]:
    """The sharded models of a Serve application's ``args`` (raw, possibly invalid data)."""
    models = args.get("models") if isinstance(args, dict) else None
    out = []
    for k, m in enumerate(models if isinstance(models, list) else []):
        shard = m.get("shard") if isinstance(m, dict) else None
        source, revision = (m.get("source"), m.get("revision")) if isinstance(m, dict) else (None, None)
        if not isinstance(shard, dict) or not isinstance(source, str):
            continue
        mode = shard.get("mode", DEFAULT_MODE)  # ShardConfig's default
        if isinstance(mode, str):
            out.append(ModeCheck(f"{where}.models[{k}].shard.mode", source,
                                 revision if isinstance(revision, str) else None, mode))
    return out


def in_fleet(fleet: Fleet) -> list[ModeCheck]:
    """The inventory's models whose ``shard:`` names a mode (the planner picks one for the others)."""
    return [ModeCheck(f"models.{i}.shard.mode", m.source, m.deployment.get("revision"), m.shard.mode)
            for i, m in enumerate(fleet.models) if m.shard is not None and "mode" in m.shard.model_fields_set]
