"""Reading models.yaml and resolving a stage's `model` to a registry entry or a local folder."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas.errors import ConfigError, UnknownModelError
from schemas.registry import BUILTIN_MODELS, MODEL_NAME_PATTERN, ModelEntry, RegistryFile, ResolvedModel


def _with_local_pipeline(entry: ModelEntry) -> ModelEntry:
    """Fill in the pipeline class from a local folder's model_index.json, when the entry has none."""
    index = Path(entry.source) / "model_index.json"
    if entry.pipeline or not index.is_file():
        return entry
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return entry
    return entry.model_copy(update={"pipeline": class_name}) if isinstance(class_name, str) else entry


class Registry:
    def __init__(self, entries: dict[str, ModelEntry], path: Path | None) -> None:
        self.entries = entries
        self.path = path

    @classmethod
    def load(cls, path: Path | None) -> Registry:
        """Built-in entries, overridden and extended by the file at `path` when given."""
        entries = dict(BUILTIN_MODELS)
        if path is None:
            return cls(entries, None)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read model registry {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"model registry {path} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"model registry {path} is not valid YAML: {exc}") from None
        try:
            parsed = RegistryFile.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"model registry {path}: {where}: {err['msg']}") from None
        for name, entry in parsed.models.items():
            if not MODEL_NAME_PATTERN.match(name):
                raise ConfigError(
                    f"model registry {path}: model name {name!r} must be letters, digits, '.', '_', '-'"
                )
            # A source that exists as a folder beside models.yaml is local; anything else is a hub id.
            local = path.parent / entry.source
            if local.is_dir():
                entry = _with_local_pipeline(entry.model_copy(update={"source": str(local.resolve())}))
            entries[name] = entry
        return cls(entries, path.resolve())

    def resolve(self, name: str, base_dir: Path | None = None) -> ResolvedModel:
        """A registry name, or a diffusers folder (relative to `base_dir`) named directly."""
        if name in self.entries:
            return ResolvedModel(name=name, entry=self.entries[name])
        folder = Path(name).expanduser()
        if not folder.is_absolute() and base_dir is not None:
            folder = base_dir / folder
        if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
            resolved = str(folder.resolve())
            return ResolvedModel(name=resolved, entry=_with_local_pipeline(ModelEntry(source=resolved)))
        known = ", ".join(sorted(self.entries))
        where = f" in {self.path}" if self.path else " (no models.yaml given: set IMGJOBS_MODELS or --models)"
        raise UnknownModelError(
            f"unknown model {name!r}: not registered{where} and not a diffusers folder; known: {known}"
        )
