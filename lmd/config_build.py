"""Building a `TrainConfig` from flags and files: the one place configs are made.

`build_config` applies three layers in order: the model preset (`lmd.config.PRESETS`), a YAML/JSON
file (`read_config_file`), then dotted overrides such as ``{"mask.end": 0.9}`` (what the CLI
produces). Each value is type-checked against its field here and range-checked by the sections'
`validate`, so any problem raises `ConfigError` naming the field (or the file) and the value.
The model's input geometry follows the data unless set explicitly (`_derive_geometry`), and
`config_diff` names the fields two configs disagree on (what a resume may not change).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmd.config import (
    DATASET_PROJECTORS,
    DEFAULT_PRESET,
    LATENT_FACTOR,
    PIXEL_PROJECTORS,
    PRESETS,
    SECTIONS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    dataset_projector,
)
from lmd.options import FIELD_TYPES


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted names: ``{"mask": {"end": 0.9}}`` -> ``{"mask.end": 0.9}``."""
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """Check `value` against a field's annotated type; ints are accepted where floats are."""
    if isinstance(kind, str):  # annotations are strings under `from __future__ import annotations`
        kind = FIELD_TYPES[kind]
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}={value!r}: expected an integer")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise ConfigError(f"{name}={value!r}: expected a finite number")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={value!r}: expected a string")
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return value
    raise TypeError(f"unsupported config field type {kind!r} for {name}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a nested dict, naming the file on any failure."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                          f"{err.start})") from None
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config file {path}: malformed ({detail})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(raw).__name__}")
    _check_acyclic(raw, path)
    for section, body in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"config file {path}: unknown section {section!r}; "
                              f"expected some of {', '.join(SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"config file {path}: section {section!r} must be a mapping")
    return raw


MAX_CONFIG_VALUES = 100_000  # a config has tens of values; nested YAML aliases can expand to billions


def _check_acyclic(value: Any, path: Path) -> None:
    """Refuse a value that contains itself through a YAML alias (`a: &a [*a]`), or whose aliases expand to more
    than MAX_CONFIG_VALUES values (`b: [*a, *a, ...]` nested: a few hundred bytes that expand to billions), in
    time linear in the distinct values: each is visited once, and its expanded size is remembered by identity."""
    size: dict[int, int] = {}  # id -> expanded number of values, once a value is done
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:  # iterative: a deep nesting must not hit Python's recursion limit either
        node, done = stack.pop()
        if not isinstance(node, dict | list) or (id(node) in size and not done):
            continue
        children = [c for c in (node.values() if isinstance(node, dict) else node) if isinstance(c, dict | list)]
        if done:
            visiting.discard(id(node))
            total = 1 + len(node) + sum(size[id(c)] for c in children)
            if total > MAX_CONFIG_VALUES:
                raise ConfigError(f"config file {path}: its YAML aliases expand to more than {MAX_CONFIG_VALUES:,} "
                                  "values (nested aliases); a config has tens")
            size[id(node)] = total
            continue
        if id(node) in visiting:
            raise ConfigError(f"config file {path}: a recursive YAML alias (a value that contains itself)")
        visiting.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in visiting:
                raise ConfigError(f"config file {path}: a recursive YAML alias (a value that contains itself)")
            stack.append((child, False))


def build_config(
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    preset: str | None = DEFAULT_PRESET,
) -> TrainConfig:
    """Preset -> file -> dotted overrides, then validate. Raises ConfigError naming the field.

    A `model.preset` key in the file or overrides selects the preset (the CLI's ``--preset``).
    """
    values = flatten(read_config_file(file)) if file is not None else {}
    values.update(overrides or {})
    preset = values.pop("model.preset", preset)
    if preset is not None and not isinstance(preset, str):
        raise ConfigError(f"model.preset={preset!r}: expected a string (one of {', '.join(PRESETS)})")
    dataset = values.get("data.dataset")
    if "data.projector" not in values and isinstance(dataset, str) and dataset in DATASET_PROJECTORS:
        values["data.projector"] = dataset_projector(dataset)

    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"model.preset={preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
        sections["model"] = dataclasses.asdict(PRESETS[preset])

    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(f"{dotted}: unknown setting; expected <section>.<field> with section in "
                              f"{', '.join(SECTIONS)}")
        fields = {f.name: f.type for f in dataclasses.fields(SECTIONS[section])}
        if key not in fields:
            raise ConfigError(f"{dotted}={value!r}: unknown field of {section}; known: {', '.join(fields)}")
        sections[section][key] = _coerce(dotted, value, fields[key])

    _derive_geometry(sections, explicit={k for k in values if k.startswith("model.")})
    cfg = TrainConfig(**{name: SECTIONS[name](**body) for name, body in sections.items()})
    return cfg.validate()


def _derive_geometry(sections: dict[str, dict[str, Any]], explicit: set[str]) -> None:
    """Tie the model's input geometry to the data unless the user set it explicitly.

    Presets describe f8 latents. `data.resolution` (when set) fixes the latent side; in pixel
    space (`projector: identity`) the input is the image itself, so the side and the patch grow by
    8 and channels become 3, keeping the token count, and so the transformer's cost per token
    layout, equal to the latent variant's: the "without projector" ablation changes only the space.
    """
    model, data = sections["model"], sections["data"]
    base = ModelConfig(**model)
    latent_side = base.latent_size
    resolution = data.get("resolution", 0)
    if resolution and "model.latent_size" not in explicit:
        latent_side = resolution // LATENT_FACTOR
    data["resolution"] = resolution or latent_side * LATENT_FACTOR
    if data.get("projector", DataConfig.projector) in PIXEL_PROJECTORS and data.get("dataset") != "synthetic":
        if "model.latent_size" not in explicit:
            model["latent_size"] = latent_side * LATENT_FACTOR
        if "model.patch_size" not in explicit:
            model["patch_size"] = base.patch_size * LATENT_FACTOR
        if "model.in_chans" not in explicit:
            model["in_chans"] = 3
    elif "model.latent_size" not in explicit:
        model["latent_size"] = latent_side


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted names of the fields whose values differ between two configs."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
