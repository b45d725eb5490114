"""Config files -> :class:`ExperimentOptions`, with ``--set a.b=value`` overrides and clear errors.

A config is YAML (or JSON) with the sections ``data``, ``model``, ``pretrain``, ``adapt``, ``run``
and an optional ``base: other.yaml`` (a path relative to the file) whose values it overrides.
Only the CLI reads config files; the library takes the typed options.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fastmmt.train.options import ExperimentOptions, check_options, option_choices

CHOICES = option_choices()  # the library's own lists of allowed values


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and what is allowed."""


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config {path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read(path.parent / base, seen + (path,))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert ``value`` to the dataclass field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_coerce(v, elem, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_options(raw: dict) -> ExperimentOptions:
    """Validate a nested mapping and build the options; unknown keys and bad values are errors."""
    opts = ExperimentOptions()
    sections = {f.name: f for f in dataclasses.fields(ExperimentOptions)}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section {section!r}; allowed: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        target = getattr(opts, section)
        hints = typing.get_type_hints(type(target))
        fields = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {section}.{key}; allowed keys of {section}: {sorted(fields)}")
            where = f"{section}.{key}"
            setattr(target, key, _coerce(value, hints[key], where))
    _apply_scratch(opts)
    try:
        check_options(opts)  # the allowed choices, the numeric ranges, what depends on several keys
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return opts


SCRATCH = "none"  # model.pretrained value that means "train from random initialisation on purpose"


def _apply_scratch(opts: ExperimentOptions) -> None:
    """``model.pretrained: none`` -> no weights file, and no requirement for one."""
    if isinstance(opts.model.pretrained, str) and opts.model.pretrained.strip().lower() == SCRATCH:
        opts.model.pretrained = None
        opts.model.require_pretrained = False


def check_pretrained(opts: ExperimentOptions) -> None:
    """Refuse a Stage I run that needs ImageNet weights (``model.require_pretrained``, set by the
    paper configs) but names none: the official code always starts from ImageNet weights, and a
    run from random initialisation would silently miss the paper by tens of mAP points."""
    if opts.model.require_pretrained and opts.model.pretrained is None:
        kind = "IBN-Net format, e.g. resnet50_ibn_a.pth.tar" if opts.model.arch == "resnet_ibn50a" else \
            "torchvision format, e.g. resnet50-19c8e357.pth"
        raise ConfigError(f"model.pretrained is not set and this recipe starts from ImageNet weights: give "
                          f"--set model.pretrained=PATH (a local file in torchvision or IBN-Net format; for "
                          f"{opts.model.arch}: {kind}), or --set model.pretrained={SCRATCH} to train from "
                          f"scratch on purpose")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2:
        raise ConfigError(f"--set {text!r}: the key must be section.key (e.g. adapt.k=700)")
    return parts, yaml.safe_load(value)


def load_options(path: str | Path | None, overrides: list[str] = ()) -> ExperimentOptions:
    """Options from an optional config file plus ``--set`` overrides."""
    raw = _read(Path(path)) if path else {}
    for item in overrides:
        (section, key), value = parse_override(item)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"config section {section!r} must be a mapping")
        raw[section][key] = value
    return build_options(raw)


def options_to_dict(opts: ExperimentOptions) -> dict:
    """Plain nested dict (for saving the resolved config beside a run)."""
    return dataclasses.asdict(opts)
