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
from schemas.job import STAGE_ONLY_FIELDS, Item
from schemas.registry import (
    BUILTIN_MODELS,
    CLIP_MODEL,
    MODEL_NAME_PATTERN,
    LoraRef,
    ModelEntry,
    RegistryFile,
    ResolvedModel,
    is_s3,
    is_single_file,
    lora_weights_file,
    s3_location,
    takes_no_lora,
)

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
    if target is Item and loc and loc[-1] in STAGE_ONLY_FIELDS:
        return f"unknown field; an item cannot choose its {loc[-1]}: set it on the stage or the model's entry"
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
    """Fill in the pipeline and scheduler classes from a local folder's model_index.json (a single
    file's: its config's), where the entry has none."""
    folder = entry.config if is_single_file(entry.source) else entry.source
    if folder is None or not Path(folder).is_absolute():
        return entry  # a hub id or an s3:// prefix: its class is read where it loads
    index = Path(folder) / "model_index.json"
    if (entry.pipeline and entry.scheduler) or not index.is_file():
        return entry
    try:
        classes = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return entry
    if not isinstance(classes, dict):
        return entry
    update: dict[str, str] = {}
    class_name = classes.get("_class_name")
    if entry.pipeline is None and isinstance(class_name, str):
        update["pipeline"] = class_name
    # A component is listed as [library, class].
    listed = classes.get("scheduler")
    scheduler = listed[1] if isinstance(listed, list) and len(listed) == 2 else None
    if entry.scheduler is None and isinstance(scheduler, str):
        update["scheduler"] = scheduler
    return entry.model_copy(update=update) if update else entry


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


def placed(source: str, base: Path) -> str:
    """A source as workers load it: an s3:// URI or a hub id as written, a local path (one that exists
    beside `base`, names a checkpoint file, or is meant as a folder) made absolute."""
    if is_s3(source) or source.startswith("imgjobs:"):
        return source
    local = base / Path(source).expanduser()
    if local.exists() or is_single_file(source) or _meant_as_folder(source, base):
        return str(local.resolve())
    return source


def _placed_entry(entry: ModelEntry, base: Path) -> ModelEntry:
    """The entry's sources (checkpoint, config, VAE, adapters) placed relative to models.yaml; a
    replaced VAE gives the entry its latent family, so that only models decoding with the same VAE
    hand latents to each other."""
    update: dict[str, Any] = {"source": placed(entry.source, base)}
    if entry.config is not None:
        update["config"] = placed(entry.config, base)
    if entry.vae is not None:
        update["vae"] = vae = placed(entry.vae, base)
        update["vae_family"] = f"vae:{vae}"
    if entry.loras:
        update["loras"] = tuple(
            lora.model_copy(update={"source": placed(lora.source, base)}) for lora in entry.loras
        )
    return _with_local_pipeline(entry.model_copy(update=update))


def source_problem(entry: ModelEntry) -> str | None:
    """Why a registry entry cannot load, checked without loading it: a local checkpoint, config, VAE or
    adapter that is missing or of the wrong kind, weights of its `variant` that are not there, an s3://
    source with no objects, an adapter that does not fit the model. Hub ids are left to the worker."""
    if entry.source.startswith("imgjobs:"):
        return None  # built in
    problem = _checkpoint_problem(entry)
    if problem is None and entry.config is not None:
        problem = _folder_problem("config", entry.config, ("model_index.json",))
    if problem is None and entry.vae is not None:
        problem = _folder_problem("vae", entry.vae, ("config.json", "vae/config.json"))
    for index, lora in enumerate(entry.loras):
        problem = problem or lora_problem(lora, entry, f"loras[{index}]")
    return problem


def _checkpoint_problem(entry: ModelEntry) -> str | None:
    if is_s3(entry.source):
        problem = s3_problem(entry.source)
        return f"source {entry.source}: {problem}" if problem else None
    source = Path(entry.source)
    if not source.is_absolute():
        return None  # a hub id
    if is_single_file(entry.source):
        if source.is_file():
            return None
        hint = did_you_mean(source.name, _files_in(source.parent))
        return f"source {entry.source}: no such file" + (f"; {hint}" if hint else "")
    if not source.is_dir():
        hint = did_you_mean(source.name, _folders_in(source.parent))
        return f"source {entry.source}: no such folder" + (f"; {hint}" if hint else "")
    if not (source / "model_index.json").is_file() and not (source / "config.json").is_file():
        return f"source {entry.source}: not a diffusers folder (no model_index.json or config.json)"
    if entry.variant and not any(source.glob(f"**/*.{entry.variant}.*")):
        return f"variant {entry.variant!r}: no *.{entry.variant}.* weights under {entry.source}"
    return None


def _folder_problem(field: str, value: str, markers: tuple[str, ...]) -> str | None:
    """Why a config or VAE folder cannot load: missing, or holding none of `markers`."""
    if is_s3(value):
        problem = s3_problem(value)
        return f"{field} {value}: {problem}" if problem else None
    folder = Path(value)
    if not folder.is_absolute():
        return None  # a hub id
    if not folder.is_dir():
        return f"{field} {value}: no such folder"
    if not any((folder / marker).is_file() for marker in markers):
        return f"{field} {value}: not a diffusers folder (no {' or '.join(markers)})"
    return None


def lora_problem(lora: LoraRef, entry: ModelEntry, where: str) -> str | None:
    """Why an adapter cannot load on the entry's model: its model takes none, its local file is missing
    or holds no weights, its s3:// source has no objects, or its weights do not fit the model's layers."""
    if takes_no_lora(entry.pipeline):
        return f"{where}: {entry.pipeline} takes no LoRA adapters"
    if is_s3(lora.source):
        problem = s3_problem(lora.source)
    elif not Path(lora.source).is_absolute():
        return None  # a hub id
    else:
        try:
            problem = lora_fit_problem(lora_weights_file(Path(lora.source), lora.weight_name), entry)
        except ValueError as exc:
            problem = str(exc)
    return f"{where}.source: {lora.source}: {problem}" if problem else None


LORA_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
MAX_HEADER_BYTES = 100 * 2**20


def lora_fit_problem(weights: Path, entry: ModelEntry) -> str | None:
    """Whether an adapter in diffusers' own format (what save_lora_weights writes: keys named after the
    component and module they adapt) fits a local diffusers folder: every module it adapts exists, with
    the input and output sizes of the adapter's down and up weights. Read from the safetensors headers,
    so nothing is loaded. Other key formats (kohya, A1111) and other sources are left to diffusers,
    which converts and checks them when a worker loads the adapter."""
    model = Path(entry.source)
    if weights.suffix != ".safetensors" or is_s3(entry.source) or not model.is_dir():
        return None
    try:
        adapted = _adapted_modules(safetensors_shapes(weights))
    except ValueError as exc:
        return f"not a safetensors file: {exc}"
    if adapted is None:
        return None
    if not adapted:
        return "no LoRA weights in it (no lora_A/lora_B or lora.down/lora.up keys)"
    for component, modules in sorted(adapted.items()):
        if not (model / component).is_dir():
            return f"it adapts {component}, which the model has not: made for another model?"
        layers = _component_shapes(model / component)
        if layers is None:
            continue  # .bin weights: their shapes are only known once loaded
        for module, (fan_in, fan_out) in sorted(modules.items()):
            # transformers 5 names a CLIP text encoder's weights without the text_model. they had.
            names = (module, module.removeprefix("text_model."), f"text_model.{module}")
            shape = next((layers[f"{name}.weight"] for name in names if f"{name}.weight" in layers), None)
            if shape is None:
                return f"it adapts {component}.{module}, which the model has not: made for another model?"
            if len(shape) < 2 or (shape[1], shape[0]) != (fan_in, fan_out):
                sizes = f"{shape[1]} and {shape[0]}" if len(shape) > 1 else f"a tensor of shape {shape}"
                return (
                    f"{component}.{module} takes {fan_in} and gives {fan_out} in the adapter, but {sizes} "
                    "in the model: made for another model?"
                )
    return None


def _adapted_modules(shapes: dict[str, list[int]]) -> dict[str, dict[str, tuple[int, int]]] | None:
    """{component: {module: (in features, out features)}} of a LoRA in diffusers' key format; None
    when its keys are in another format."""
    if not all(key.split(".", 1)[0] in LORA_COMPONENTS for key in shapes):
        return None
    adapted: dict[str, dict[str, tuple[int, int]]] = {}
    for key, down in shapes.items():
        for down_suffix, up_suffix in LORA_PAIRS:
            if not key.endswith(down_suffix):
                continue
            stem = key.removesuffix(down_suffix)
            up = shapes.get(stem + up_suffix)
            if up is None or len(down) < 2 or not up:
                raise ValueError(f"{key} has no matching {up_suffix.lstrip('.')}")
            component, _, module = stem.partition(".")
            adapted.setdefault(component, {})[module] = (down[1], up[0])
    return adapted


def _component_shapes(folder: Path) -> dict[str, list[int]] | None:
    """The weight shapes of a component folder from its safetensors headers (every variant and shard:
    variants differ in dtype, not shape); None when it has no safetensors weights."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    for file in files:
        try:
            shapes.update(safetensors_shapes(file))
        except ValueError:
            return None
    return shapes


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header (8 bytes of little-endian length, then
    that much JSON), without loading its tensors or needing the safetensors library."""
    try:
        with path.open("rb") as file:
            size = int.from_bytes(file.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError("no safetensors header")
            header = json.loads(file.read(size))
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("no safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    return {
        key: list(info["shape"])
        for key, info in header.items()
        if key != "__metadata__" and isinstance(info, dict) and isinstance(info.get("shape"), list)
    }


def _transformers_type(entry: ModelEntry) -> str | None:
    """A local folder's transformers model_type (its config.json's), or None: a hub id, an s3:// prefix,
    a diffusers pipeline folder, or no readable config."""
    folder = Path(entry.source)
    if not folder.is_absolute() or (folder / "model_index.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = config.get("model_type") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) else None


def is_clip_checkpoint(entry: ModelEntry) -> bool:
    """Whether the entry is a scoring model: a CLIP checkpoint by its `pipeline`, or by a local folder's
    config.json."""
    return entry.pipeline == CLIP_MODEL or _transformers_type(entry) == "clip"


def scorer_problem(model: ResolvedModel) -> str | None:
    """Why the model cannot be a stage's scoring model: it is not a CLIP checkpoint (transformers'
    CLIPModel, with its processor). A hub id or s3:// source whose class is not given is left to the
    worker that loads it."""
    entry = model.entry
    if is_clip_checkpoint(entry):
        return None
    if entry.pipeline is not None:
        return f"{model.name} is a {entry.pipeline}, not a CLIP checkpoint ({CLIP_MODEL})"
    if Path(entry.source).is_absolute() and Path(entry.source).is_dir():
        found = _transformers_type(entry)
        what = f"its config.json says model_type {found!r}" if found else "no transformers config.json"
        return f"{model.name} is not a CLIP checkpoint ({CLIP_MODEL}): {what}"
    return None


def s3_problem(uri: str) -> str | None:
    """Why an s3:// source cannot be downloaded: it names no bucket and key, or holds no object."""
    from botocore.exceptions import BotoCoreError, ClientError

    from jobstate.storage import s3_client

    try:
        bucket, key = s3_location(uri)
    except ValueError as exc:
        return str(exc)
    try:
        listed = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except (BotoCoreError, ClientError) as exc:
        return f"cannot list it: {exc}"
    if not listed.get("KeyCount"):
        return "no such object or prefix"
    return None


def _files_in(folder: Path) -> list[str]:
    try:
        return [child.name for child in folder.iterdir() if child.is_file()]
    except OSError:
        return []


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
            if entry.vae is not None and entry.vae_family is not None:
                where = _registry_place(path, text, ("models", name, "vae_family"))
                raise ConfigError(
                    f"model registry {where}: models.{name}.vae_family: the latent family follows `vae` "
                    "(models with the same vae share latents); leave vae_family out"
                )
            # A source that exists beside models.yaml is local, and so is one that is meant to (checked
            # when a job uses it); s3:// is downloaded by the worker; anything else is a hub id.
            entries[name] = _placed_entry(entry, path.parent)
        return cls(entries, path.resolve())

    def stage_loras(
        self, loras: tuple[LoraRef, ...], model: ResolvedModel, base_dir: Path
    ) -> tuple[tuple[LoraRef, ...], list[tuple[str, str]]]:
        """A stage's own adapters as workers load them (local paths relative to the job's folder made
        absolute), and (field, message) for each that cannot load on `model`, where this registry checks
        sources (as for the model's own)."""
        adapters = tuple(lora.model_copy(update={"source": placed(lora.source, base_dir)}) for lora in loras)
        problems = []
        for index, lora in enumerate(adapters if self.check_sources else ()):
            problem = lora_problem(lora, model.entry, f"loras.{index}")
            if problem is not None:
                field, _, message = problem.partition(": ")
                problems.append((field, message))
        return adapters, problems

    def origin(self, name: str) -> str:
        """Where the model `name` comes from: built in, this registry's file, or a folder named directly."""
        if name not in self.entries:
            return "a folder named directly"
        return "built in" if self.entries[name] is BUILTIN_MODELS.get(name) else str(self.path)

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
