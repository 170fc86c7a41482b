"""Config dataclasses from YAML + `--set a.b=c` overrides, type-checked against the annotations.

A config is a (nested) dataclass; its fields may carry `metadata={"help": ...}`. YAML files mirror
the nesting (`train: {lr: 1e-4}`), overrides address fields by dotted path (`train.lr=1e-4`) and
are parsed as YAML scalars, so `1e-4`, `true`, `null` and `[1, 2]` mean what they look like
(booleans are YAML 1.2's `true`/`false` only: `no` and `on` stay strings).
Every mistake is one `UserError` line naming the file (or the `--set` option) and the key.

CLI: `python -m mdpd_vl.engine.config --check FILE [--class module:Class] [--set k=v ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from mdpd_vl import atomic
from mdpd_vl.errors import UserError, cli_entry

T = TypeVar("T")

__all__ = [
    "TrainConfig",
    "load_config",
    "parse_overrides",
    "dump_config",
    "save_config",
    "config_to_yaml",
    "add_config_arguments",
    "atomic_write_text",
    "parse_name_list",
]


class _Loader(yaml.SafeLoader):
    """SafeLoader reading `1e-4` as a float (YAML 1.1 wants `1.0e-4`), rejecting duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 booleans: only true/false, so `mixed_precision: no` or `schedule: on` stay strings
_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in entries if tag != _BOOL]
    for ch, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise UserError(f"invalid YAML: {problem}{at}", where=where) from None


# ----------------------------------------------------------------------------- type checking


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _section_type(tp: Any) -> type | None:
    """The dataclass behind `tp` (also inside `X | None`), else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        return found[0] if len(found) == 1 else None
    return None


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if _is_dataclass_type(tp):
        return f"a mapping ({tp.__name__})"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Raised inside `_coerce`; turned into a UserError by the caller that knows the file."""

    def __init__(self, key: str, expected: str, value: Any):
        super().__init__(key)
        self.key, self.expected, self.value = key, expected, value


class _NotFinite(_Mismatch):
    """A float that is inf or nan: no setting of the project means that (a `.inf` learning rate
    would train to non-finite weights), so it is refused wherever a number may stand."""

    def __init__(self, key: str, value: Any):
        super().__init__(key, "a finite number", value)


def _finite(value: Any, key: str) -> Any:
    """`value` unchanged, after refusing inf/nan anywhere inside it (untyped `Any` fields too)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotFinite(key, value)
    if isinstance(value, Mapping):
        for k, v in value.items():
            _finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{key}[{i}]")
    return value


def _coerce(value: Any, tp: Any, key: str, build: Any) -> Any:
    """Check `value` against annotation `tp`; return it converted (int->float, list->tuple)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _finite(value, key)
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch(key, _type_name(tp), value)
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, build)
            except _Mismatch as err:
                # the value fits this branch but something inside does not, or it is inf/nan
                if err.key != key or isinstance(err, _NotFinite):
                    raise
        raise _Mismatch(key, _type_name(tp), value)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(key, _type_name(tp), value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
    elif origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            return _coerce_sequence(value, tp, key, build)
    elif origin in (dict, Mapping) or tp is dict:
        if isinstance(value, Mapping):
            vt = args[1] if len(args) == 2 else Any
            return {k: _coerce(v, vt, f"{key}.{k}", build) for k, v in value.items()}
    elif isinstance(tp, type):
        if isinstance(value, tp):
            return value
    else:
        return _finite(value, key)  # an annotation we do not model (TypeVar, Callable): accept as is
    raise _Mismatch(key, _type_name(tp), value)


def _coerce_sequence(value: Sequence[Any], tp: Any, key: str, build: Any) -> Any:
    origin, args = typing.get_origin(tp) or tp, typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise _Mismatch(key, _type_name(tp), value)
        return tuple(_coerce(v, a, f"{key}[{i}]", build) for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [_coerce(v, item, f"{key}[{i}]", build) for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


# ----------------------------------------------------------------------------- building


class _Builder:
    """Builds a dataclass tree from nested mappings, naming the source of each bad key."""

    def __init__(self, default_where: str, origins: dict[str, str]):
        self.default_where = default_where
        self.origins = origins

    def where(self, key: str) -> str:
        parts = key.replace("[", ".[").split(".")
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n]).replace(".[", "[")
            if prefix in self.origins:
                return self.origins[prefix]
        return self.default_where

    def build(self, cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
        hints = _hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            key = f"{prefix}{name}"
            if name in fields and isinstance(value, Mapping) and fields[name].default_factory is not dataclasses.MISSING:
                default = fields[name].default_factory()
                if dataclasses.is_dataclass(default):
                    # a section given in part keeps the parent's defaults for the rest (the
                    # parent may set defaults that differ from the section class's own)
                    value = _overlay(default, value)
            if name not in fields:
                valid = ", ".join(fields)
                section = f" in {prefix[:-1]!r}" if prefix else ""
                raise UserError(
                    f"unknown key{section}; valid keys: {valid}", where=self.where(key), field=key
                )
            try:
                kwargs[name] = _coerce(value, hints[name], key, lambda c, v, k: self.build(c, v, f"{k}."))
            except _Mismatch as err:
                raise UserError(
                    f"expected {err.expected}, got {_describe(err.value)}",
                    where=self.where(err.key),
                    field=err.key,
                ) from None
        for name, f in fields.items():
            if (
                name not in kwargs
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                key = f"{prefix}{name}"
                raise UserError("required key is missing", where=self.where(key), field=key)
        try:
            return cls(**kwargs)
        except UserError as err:  # __post_init__ validation: add the file and the section
            if err.where is not None:
                raise
            fld = f"{prefix}{err.field}" if err.field else prefix[:-1] or None
            msg = str(err).split(": ", 1)[-1] if err.field else str(err)
            raise UserError(msg, where=self.where(fld or ""), field=fld) from None
        except (ValueError, TypeError) as err:
            raise UserError(str(err), where=self.where(prefix[:-1]), field=prefix[:-1] or None) from None


def _as_data(obj: Any) -> dict[str, Any]:
    """A dataclass instance as nested plain mappings (init fields only)."""
    return {
        f.name: _as_data(getattr(obj, f.name)) if dataclasses.is_dataclass(getattr(obj, f.name)) else getattr(obj, f.name)
        for f in dataclasses.fields(obj)
        if f.init
    }


def _overlay(default: Any, top: Mapping[str, Any]) -> dict[str, Any]:
    """`top` over the dataclass instance `default` as data, recursing into its sub-sections only: a
    field whose value is a mapping (`group_lr`, a per-tower `head_layers`) is replaced as a whole, as
    any other value is, never merged key by key with the default's."""
    out = _as_data(default)
    for k, v in top.items():
        sub = getattr(default, k, None)
        out[k] = _overlay(sub, v) if isinstance(v, Mapping) and dataclasses.is_dataclass(sub) else v
    return out


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """Split `a.b=c` strings into (dotted key, YAML-parsed value) pairs."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        where = f"--set {item}"
        if not sep or not key or any(not p for p in key.split(".")):
            raise UserError("expected KEY=VALUE with a dotted KEY such as train.lr=1e-4", where=where)
        parsed.append((key, _yaml_load(raw, where) if raw.strip() else None))
    return parsed


def _apply_override(cls: type, data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set `data[a][b] = value` for `a.b`, checking every part of the path against the schema."""
    parts = key.split(".")
    node, node_cls = data, cls
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        if node_cls is not None:
            names = [f.name for f in dataclasses.fields(node_cls) if f.init]
            if part not in names:
                section = f" in {'.'.join(parts[:depth])!r}" if depth else ""
                raise UserError(
                    f"unknown key{section}; valid keys: {', '.join(names)}", where=where, field=path
                )
        if depth == len(parts) - 1:
            node[part] = value
            return
        tp = _hints(node_cls)[part] if node_cls is not None else Any
        child_cls = _section_type(tp)
        is_map = typing.get_origin(tp) in (dict, Mapping) or tp is dict or node_cls is None
        if child_cls is None and not is_map:
            raise UserError(f"{_type_name(tp)} has no sub-keys", where=where, field=path)
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node, node_cls = child, child_cls


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from defaults, the YAML file at `path` (optional) and `a.b=c` overrides."""
    if not _is_dataclass_type(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    where = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("config file not found" if not p.exists() else "not a file", where=where)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read config file ({err.__class__.__name__})", where=where) from None
        loaded = _yaml_load(text, where)
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(
                f"the top level must be a mapping of keys, got {type(loaded).__name__}", where=where
            )
        data = loaded or {}
    origins: dict[str, str] = {}
    for (key, value), raw in zip(parse_overrides(overrides), overrides):
        _apply_override(cls, data, key, value, f"--set {raw}")
        origins[key] = f"--set {raw}"
    return _Builder(where, origins).build(cls, data)


# ----------------------------------------------------------------------------- writing


def dump_config(obj: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/YAML-safe data (tuples -> lists, paths -> str)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"{obj!r} is not a dataclass instance")
    return _plain(obj)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _scalar_yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def config_to_yaml(obj: Any, header: str | None = None) -> str:
    """YAML text of a config dataclass, each field followed by its `help` metadata as a comment."""
    lines = [f"# {h}" for h in header.splitlines()] if header else []

    def walk(value: Any, indent: str) -> None:
        for f in dataclasses.fields(value):
            sub = getattr(value, f.name)
            help_text = f.metadata.get("help")
            comment = f"  # {help_text}" if help_text else ""
            if dataclasses.is_dataclass(sub):
                lines.append(f"{indent}{f.name}:{comment}")
                walk(sub, indent + "  ")
            else:
                lines.append(f"{indent}{f.name}: {_scalar_yaml(_plain(sub))}{comment}")

    walk(obj, "")
    return "\n".join(lines) + "\n"


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (`mdpd_vl.atomic.write_text`): all or nothing, umask honoured;
    a failed write is one `WriteError` line naming the path and the bytes needed."""
    atomic.write_text(path, text)


def save_config(obj: Any, path: str | Path) -> None:
    """Write a config atomically: JSON for `.json`, YAML (with help comments) otherwise."""
    path = Path(path)
    if path.suffix == ".json":
        text = json.dumps(dump_config(obj), indent=2) + "\n"
    else:
        text = config_to_yaml(obj)
    atomic_write_text(path, text)


def parse_name_list(text: str, flag: str, build: Callable[[str], T]) -> list[T]:
    """Split a comma-separated option (e.g. `--compare partial,lora`) and build every entry with
    `build(name)` before any work starts: an empty list, a repeated name or one that `build` refuses
    is one UserError naming `flag` (so no entry trains before a later one is found wrong)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"expected comma-separated names, got {text!r}", field=flag)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"{repeated[0]!r} is named twice", field=flag)
    built = []
    for name in names:
        try:
            built.append(build(name))
        except UserError as err:
            reason = str(err).split(": ", 1)[-1] if err.field or err.where else str(err)
            raise UserError(f"{name!r}: {reason}; nothing was run", field=flag) from None
    return built


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the shared `--config FILE` and repeatable `--set KEY=VALUE` options to a CLI parser."""
    parser.add_argument("--config", type=Path, default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one field, e.g. --set train.lr=1e-4 (repeatable)",
    )


# ----------------------------------------------------------------------------- the training config


@dataclass
class TrainConfig:
    """Settings of the one training loop (`mdpd_vl.engine.train.train`)."""

    epochs: int = field(default=1, metadata={"help": "passes over the data (max_steps wins when set)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps in total; null = epochs"})
    batch_size: int = field(default=32, metadata={"help": "samples per micro-batch per process"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate of groups without their own"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps; 0 = use warmup_ratio"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of all steps"})
    schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "decay after warmup, to 0 at the last step"}
    )
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr_scaling: Literal["none", "linear"] = field(
        default="none",
        metadata={"help": "none: the lr as given for any number of processes; linear: every group's lr x "
                          "processes (global batch / (batch_size x grad_accum))"},
    )
    max_grad_norm: float | None = field(
        default=1.0, metadata={"help": "clip the global grad norm; null = off"}
    )
    seed: int = field(default=0, metadata={"help": "seeds data order (seed + epoch) and the RNGs"})
    log_every: int = field(default=10, metadata={"help": "optimizer steps between metrics lines"})
    ckpt_every: int = field(
        default=500, metadata={"help": "optimizer steps between checkpoints; 0 = end only"}
    )
    keep_checkpoints: int = field(default=1, metadata={"help": "how many recent checkpoints to keep"})
    eval_every: int = field(
        default=0, metadata={"help": "optimizer steps between eval_fn calls; 0 = end only"}
    )
    mixed_precision: Literal["auto", "no", "bf16"] = field(
        default="auto", metadata={"help": "auto = bf16 autocast on GPU, fp32 on CPU"}
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay", "eps", "warmup_ratio", "max_grad_norm", "betas"):
            value = getattr(self, name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in (value if name == "betas" else [value])):
                raise UserError(f"must be a finite number, got {value!r}", field=name)
        positive = ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"must be >= 1, got {getattr(self, name)}", field=name)
        for name in ("warmup_steps", "ckpt_every", "eval_every", "num_workers", "weight_decay"):
            if getattr(self, name) < 0:
                raise UserError(f"must be >= 0, got {getattr(self, name)}", field=name)
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"must be >= 1 or null, got {self.max_steps}", field="max_steps")
        if not self.eps >= 0:
            raise UserError(f"must be >= 0, got {self.eps}", field="eps")
        if not self.lr > 0:
            raise UserError(f"must be > 0, got {self.lr}", field="lr")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"must be in [0, 1), got {self.warmup_ratio}", field="warmup_ratio")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"each beta must be in [0, 1), got {list(self.betas)}", field="betas")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"must be > 0 or null, got {self.max_grad_norm}", field="max_grad_norm")


# ----------------------------------------------------------------------------- CLI


def _import_class(spec: str) -> type:
    module, _, name = spec.partition(":")
    if not name:
        raise UserError("expected module:Class, e.g. mdpd_vl.engine.config:TrainConfig", field="--class")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UserError(f"cannot import {spec!r}", field="--class") from None
    if not _is_dataclass_type(cls):
        raise UserError(f"{spec!r} is not a dataclass", field="--class")
    return cls


@cli_entry
def main(argv: Sequence[str] | None = None) -> int:
    """Validate a config file against a config class; print the resolved config with --print."""
    parser = argparse.ArgumentParser(prog="python -m mdpd_vl.engine.config", description=main.__doc__)
    parser.add_argument("--check", type=Path, metavar="FILE", help="YAML file to validate")
    parser.add_argument(
        "--class",
        dest="cls",
        default="mdpd_vl.engine.config:TrainConfig",
        help="config dataclass as module:Class",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--print", action="store_true", help="print the resolved config as YAML")
    args = parser.parse_args(argv)
    cfg = load_config(_import_class(args.cls), args.check, args.overrides)
    print(
        config_to_yaml(cfg) if args.print else f"ok: {args.check or '<defaults>'}",
        end="\n" * (not args.print),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
