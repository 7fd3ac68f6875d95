"""TOML file < command-line overrides (--section.field=value) -> a validated JobConfig."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path
from typing import Any

from lcron_dist.config.job_config import JobConfig


def _parse_scalar(text: str) -> Any:
    """A value given on the command line for a free-form option: bool, int, float, list or string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        return [_parse_scalar(part) for part in text.split(",")]
    return text


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert `value` (from TOML or the command line) to the field's declared type."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float, str):
        # Strings come from the command line and are parsed; a TOML value must already have the type
        # (no silent 1.5 -> 1, true -> 1 or 5 -> "5").
        if not isinstance(value, str) and (
            isinstance(value, bool) or hint is str or (hint is int and not isinstance(value, int))
        ):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value


def _apply(section: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a table of fields, got {values!r}")
    hints = typing.get_type_hints(type(section))
    names = [f.name for f in dataclasses.fields(section)]
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"unknown field {where}.{key}; valid fields: {', '.join(names)}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{where}.{key}")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{where}.{key}"))


def _override_tree(overrides: list[str]) -> dict[str, Any]:
    """['--a.b=1', '--a.c.d=x'] -> {'a': {'b': '1', 'c': {'d': 'x'}}} (values still strings)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise ValueError(f"override {item!r} must look like --section.field=value")
        path, _, value = item[2:].partition("=")
        keys = path.split(".")
        if len(keys) < 2:
            raise ValueError(f"override {item!r} must name a section and a field: --section.field=value")
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return tree


def _merge_free_form(config: JobConfig, tree: dict[str, Any]) -> None:
    """Free-form tables (dict fields, e.g. loss.options) take typed scalars from overrides."""
    for section_name, fields in tree.items():
        section = getattr(config, section_name, None)
        if section is None or not isinstance(fields, dict):
            continue
        for key, value in list(fields.items()):
            if isinstance(getattr(section, key, None), dict) and isinstance(value, dict):
                for k, v in value.items():
                    if not isinstance(v, str):
                        raise ValueError(f"override --{section_name}.{key}.{k}.*: {key} takes one level of keys")
                    getattr(section, key)[k] = _parse_scalar(v)
                del fields[key]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Build a JobConfig from defaults, then a TOML file, then --section.field=value overrides."""
    config = JobConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: not valid TOML: {exc}") from None
        _apply(config, data, "config")
    tree = _override_tree(overrides or [])
    _merge_free_form(config, tree)
    _apply(config, tree, "config")
    config.validate()
    return config


def to_dict(config: JobConfig) -> dict[str, Any]:
    """The resolved config as plain data (for the run folder and the log)."""
    return dataclasses.asdict(config)
