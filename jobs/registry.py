"""Reading models.yaml and resolving a stage's `model` to a registry entry or a local folder."""

from __future__ import annotations

import difflib
import json
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from schemas.errors import ConfigError, UnknownModelError
from schemas.registry import BUILTIN_MODELS, MODEL_NAME_PATTERN, ModelEntry, RegistryFile, ResolvedModel

Location = tuple[int | str, ...]

# Messages about the user's input, here because manifest.py (which imports this module) shares them:
# "did you mean" for a misspelt name, pydantic's errors in the user's words, lines of YAML nodes.


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """The hint "did you mean 'x'?" for the choice closest to a misspelt word; None if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None


def _tagged_member(members: tuple[Any, ...], discriminator: str, tag: object) -> Any:
    for member in members:
        field = member.model_fields.get(discriminator) if _is_model(member) else None
        literal = field.annotation if field is not None else None
        if get_origin(literal) is Literal and tag in get_args(literal):
            return member
    return None


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _inner(annotation: Any, key: int | str) -> Any:
    """The type that the next key of a pydantic error location points into, or None."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        tags = [meta.discriminator for meta in args[1:] if isinstance(meta, FieldInfo)]
        if tags and isinstance(tags[0], str):
            # A tagged union's error location names its member by the tag (a stage's type).
            return _tagged_member(get_args(args[0]), tags[0], key)
        return _inner(args[0], key)
    if _is_model(annotation):
        field = annotation.model_fields.get(str(key))
        return field.annotation if field is not None else None
    if origin in (list, tuple) and isinstance(key, int) and args:
        return args[0]
    if origin is dict and len(args) == 2:
        return args[1]
    if origin in (Union, types.UnionType):
        kept = [member for member in args if member is not type(None)]
        return _inner(kept[0], key) if len(kept) == 1 else None
    return None


def unknown_field(root: Any, loc: Location) -> str:
    """The message for pydantic's extra_forbidden at `loc` under `root` (a model or an annotation):
    the closest field the model there has, else all of them."""
    target = root
    for key in loc[:-1]:
        target = _inner(target, key)
    while get_origin(target) is Annotated:
        target = get_args(target)[0]
    names = list(target.model_fields) if _is_model(target) else []
    hint = did_you_mean(str(loc[-1]), names) if loc else None
    if hint:
        return f"unknown field; {hint}"
    return f"unknown field; the fields are {', '.join(names)}" if names else "unknown field"


def error_message(err: Mapping[str, Any], root: Any) -> str:
    """One pydantic error as the user should read it, `root` being what was validated."""
    if err["type"] == "extra_forbidden":
        return unknown_field(root, tuple(err["loc"]))
    return str(err["msg"]).removeprefix("Value error, ")


def yaml_child(node: yaml.Node | None, key: int | str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        return next((value for name, value in node.value if getattr(name, "value", None) == key), None)
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        item: yaml.Node = node.value[key]
        return item
    return None


def yaml_line(root: yaml.Node | None, keys: Iterable[int | str]) -> int | None:
    """The 1-based line of the deepest node along `keys` that the document has."""
    node = root
    for key in keys:
        child = yaml_child(node, key)
        if child is None:
            break
        node = child
    return node.start_mark.line + 1 if node is not None else None


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


def _meant_as_folder(source: str, base: Path) -> bool:
    """A source written as a path (`./x`, `/x`, `~/x`, `a/b/c`), or one whose first part is a folder
    beside models.yaml (`models/tiny-sdd` with a `models/` there): a hub id is `name` or `org/name`,
    and taking a misspelt folder for one would only fail later, at the worker, looking it up online."""
    if source.startswith(("/", "./", "../", "~")) or source.count("/") > 1:
        return True
    head = source.split("/", 1)[0]
    if "/" in source:
        return (base / head).is_dir()
    return did_you_mean(source, _folders_in(base)) is not None


def source_problem(entry: ModelEntry) -> str | None:
    """Why a registry entry's local source cannot load, checked without loading it: a folder that is
    missing, is no diffusers folder, or lacks the weights of its `variant`. None for hub ids."""
    source = Path(entry.source)
    if entry.source.startswith("imgjobs:") or not source.is_absolute():
        return None  # built in, or a hub id
    if not source.is_dir():
        hint = did_you_mean(source.name, _folders_in(source.parent))
        return f"source {entry.source}: no such folder" + (f"; {hint}" if hint else "")
    if not (source / "model_index.json").is_file() and not (source / "config.json").is_file():
        return f"source {entry.source}: not a diffusers folder (no model_index.json or config.json)"
    if entry.variant and not any(source.glob(f"**/*.{entry.variant}.*")):
        return f"variant {entry.variant!r}: no *.{entry.variant}.* weights under {entry.source}"
    return None


def _folders_in(folder: Path) -> list[str]:
    try:
        return [child.name for child in folder.iterdir() if child.is_dir()]
    except OSError:
        return []


def _registry_place(path: Path, text: str, keys: Location) -> str:
    """`path:line` of a key of models.yaml, or the path alone where the line cannot be found."""
    try:
        line = yaml_line(yaml.compose(text, Loader=yaml.SafeLoader), keys)
    except yaml.YAMLError:
        line = None
    return f"{path}:{line}" if line is not None else str(path)


def first_error(exc: ValidationError) -> Mapping[str, Any]:
    """The error to report of a file that is reported one error at a time. A misspelt field comes
    first, since it is what makes the field it was meant to be look missing."""
    return min(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")


def _registry_error(path: Path, text: str, exc: ValidationError) -> ConfigError:
    """The registry's first problem, as one line."""
    err = first_error(exc)
    loc = tuple(err["loc"])
    where, field = _registry_place(path, text, loc), ".".join(str(part) for part in loc)
    return ConfigError(f"model registry {where}: {field}: {error_message(err, RegistryFile)}")


class Registry:
    def __init__(self, entries: dict[str, ModelEntry], path: Path | None) -> None:
        self.entries = entries
        self.path = path
        # Whether resolving a local source checks it (source_problem): on the machine that loads the
        # models, or validates for it. A producer that only submits may have no model folders at all.
        self.check_sources = False

    @classmethod
    def load(cls, path: Path | None) -> Registry:
        """Built-in entries, overridden and extended by the file at `path` when given."""
        entries = dict(BUILTIN_MODELS)
        if path is None:
            return cls(entries, None)
        try:
            text = path.read_text(encoding="utf-8")
            raw = yaml.safe_load(text) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read model registry {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"model registry {path} is not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"model registry {path} is not valid YAML: {exc}") from None
        try:
            parsed = RegistryFile.model_validate(raw)
        except ValidationError as exc:
            raise _registry_error(path, text, exc) from None
        for name, entry in parsed.models.items():
            if not MODEL_NAME_PATTERN.match(name):
                where = _registry_place(path, text, ("models", name))
                raise ConfigError(
                    f"model registry {where}: model name {name!r} must be letters, digits, '.', '_', '-'"
                )
            # A source that exists as a folder beside models.yaml is local, and so is one that is meant
            # to (checked when a job uses it); anything else is a hub id.
            local = path.parent / Path(entry.source).expanduser()
            if local.is_dir() or _meant_as_folder(entry.source, path.parent):
                entry = _with_local_pipeline(entry.model_copy(update={"source": str(local.resolve())}))
            entries[name] = entry
        return cls(entries, path.resolve())

    def resolve(self, name: str, base_dir: Path | None = None) -> ResolvedModel:
        """A registry name, or a diffusers folder (relative to `base_dir`) named directly."""
        if name in self.entries:
            entry = self.entries[name]
            problem = source_problem(entry) if self.check_sources else None
            if problem is not None:
                raise ConfigError(f"model {name!r}{f' in {self.path}' if self.path else ''}: {problem}")
            return ResolvedModel(name=name, entry=entry)
        folder = Path(name).expanduser()
        if not folder.is_absolute() and base_dir is not None:
            folder = base_dir / folder
        if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
            resolved = str(folder.resolve())
            return ResolvedModel(name=resolved, entry=_with_local_pipeline(ModelEntry(source=resolved)))
        where = f" in {self.path}" if self.path else " (no models.yaml given: set IMGJOBS_MODELS or --models)"
        hint = did_you_mean(name, self.entries) or f"known: {', '.join(sorted(self.entries))}"
        raise UnknownModelError(
            f"unknown model {name!r}: not registered{where} and not a diffusers folder; {hint}"
        )
