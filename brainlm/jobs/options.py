"""A job's settings from the command line or from its params.yaml block, built from its config
dataclass: the dataclass holds each setting's one default and type, an `Option` names the
setting once for both places (`--batch-size` on the command line is `batch_size:` in
params.yaml) and carries the help text and the bounds checked on the way in."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class Option:
    path: str  # field of the config; "settings.target_tr" for a nested dataclass's field
    flag: str | None = None  # default: --<field-name-with-dashes>
    help: str = ""
    choices: tuple | None = None
    low: float | None = None  # inclusive bounds, checked for flags and params.yaml alike
    high: float | None = None
    positive: bool = False  # > 0 (a float) or >= 1 (an int)
    parse: typing.Callable | None = None  # text -> value, for tuples and the like

    @property
    def name(self) -> str:
        return (self.flag or "--" + self.path.rsplit(".", 1)[-1].replace("_", "-"))[2:]

    @property
    def key(self) -> str:
        """The params.yaml key: the flag without dashes, `no-` dropped."""
        name = self.name[3:] if self.name.startswith("no-") else self.name
        return name.replace("-", "_")


def _field(cls, path: str):
    """(field, resolved type) of a dotted path through nested config dataclasses."""
    head, _, rest = path.partition(".")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if head not in fields:
        raise KeyError(f"{cls.__name__} has no field '{head}'")
    kind = typing.get_type_hints(cls)[head]
    if rest:
        return _field(kind, rest)
    return fields[head], kind


def default(cls, path: str):
    """The dataclass default of a field (MISSING when it has none)."""
    f, _ = _field(cls, path)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _base_type(kind):
    """int for `int | None`, Path for `Path | None`, ..."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, getattr(__import__("types"), "UnionType")):
        return args[0] if len(args) == 1 else str
    return typing.get_origin(kind) or kind


def check(option: Option, value, where: str = ""):
    """`value` checked against the option's choices and bounds, or a ConfigError naming it
    (`where`: the params.yaml key; argparse names the flag itself)."""
    if value is None:
        return value
    problem = None
    if option.choices and value not in option.choices:
        problem = f"'{value}' is not one of {', '.join(map(str, option.choices))}"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        low = (1 if isinstance(value, int) else None) if option.positive else option.low
        if isinstance(value, float) and not math.isfinite(value):
            problem = f"{value} is not a finite number"
        elif option.positive and isinstance(value, float) and not value > 0:
            problem = f"{value:g} must be > 0"
        elif low is not None and value < low:
            problem = f"{value:g} must be >= {low:g}"
        elif option.high is not None and value > option.high:
            problem = f"{value:g} must be <= {option.high:g}"
    if problem:
        raise ConfigError(f"{where}: {problem}" if where else problem)
    return value


def _converter(option: Option, kind):
    base = _base_type(kind)

    def convert(text):
        if option.parse is not None:
            value = option.parse(text)
        elif base in (int, float, str, Path):
            try:
                value = base(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"'{text}' is not {'an integer' if base is int else 'a number'}") from None
        else:
            value = text
        try:
            return check(option, value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def add_arguments(parser, cls, options: list[Option]) -> None:
    """One flag per option, its default and type from `cls`."""
    for option in options:
        _, kind = _field(cls, option.path)
        value = default(cls, option.path)
        dest = option.path
        if _base_type(kind) is bool:  # a switch: no value to convert
            action = "store_false" if option.name.startswith("no-") else "store_true"
            parser.add_argument(f"--{option.name}", dest=dest, action=action, help=option.help,
                                default=value)
            continue
        extra = {"nargs": "+"} if _base_type(kind) is list else {}
        shown = "" if value in (dataclasses.MISSING, None, "") or "default" in option.help \
            else f" (default {_show(value)})"
        if option.choices:
            shown = f" ({', '.join(map(str, option.choices))})" + shown
        parser.add_argument(f"--{option.name}", dest=dest, type=_converter(option, kind),
                            required=value is dataclasses.MISSING,
                            default=None if value is dataclasses.MISSING else value,
                            metavar=option.name.upper().replace("-", "_"),
                            help=option.help + shown, **extra)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build(cls, values: dict, fixed: dict | None = None):
    """A config from {dotted path: value} (nested dataclasses assembled from their fields)."""
    values = {**values, **(fixed or {})}
    top, nested = {}, {}
    for path, value in values.items():
        head, _, rest = path.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            top[head] = value
    hints = typing.get_type_hints(cls)
    for head, inner in nested.items():
        top[head] = build(hints[head], inner)
    return cls(**top)


def from_args(cls, options: list[Option], args, fixed: dict | None = None):
    return build(cls, {o.path: getattr(args, o.path) for o in options}, fixed)


def from_block(cls, options: list[Option], block: dict | None, where: str,
               fixed: dict | None = None):
    """A config from a params.yaml block, whose keys are the options' keys; each value of the
    field's type (YAML gives text, numbers and booleans as written: `window: fifty`, `seed:
    1.5` or `detrend: "no"` are named, never passed on), and no key the pipeline sets itself
    (`out`, `data`...: a value there would be silently replaced)."""
    by_key = {o.key: o for o in options}
    values = {}
    for key, value in (block or {}).items():
        if key not in by_key:
            known = sorted(k for k, o in by_key.items() if not _is_fixed(o.path, fixed))
            raise ConfigError(f"params.yaml {where}: unknown setting '{key}' (known: "
                              f"{', '.join(known)})")
        option = by_key[key]
        if _is_fixed(option.path, fixed):
            shown = fixed.get(option.path, "the stage's own value")
            raise ConfigError(f"params.yaml {where}.{key}: set by the pipeline for this stage "
                              f"(to {_show_fixed(shown)}), not in params.yaml; remove it")
        _, kind = _field(cls, option.path)
        value = _typed(option, kind, value, default(cls, option.path), f"params.yaml {where}.{key}")
        values[option.path] = check(option, value, f"params.yaml {where}.{key}")
    return build(cls, values, fixed)


def _is_fixed(path: str, fixed: dict | None) -> bool:
    """Whether the pipeline sets `path` (or the nested config holding it) itself."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in (fixed or {}) for i in range(1, len(parts) + 1))


def _show_fixed(value) -> str:
    return str(value) if not isinstance(value, (list, tuple)) else ", ".join(map(str, value))


def _typed(option: Option, kind, value, default_value, where: str):
    """`value` as the field's type, or a ConfigError naming the key and what it needs."""
    if value is None:
        return None
    base = _base_type(kind)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is bool:
        ok = isinstance(value, bool)
        need = "true or false"
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        need = "a whole number"
    elif base is float:
        ok, need = number, "a number"
        value = float(value) if ok else value
    elif base in (str, Path):
        ok = isinstance(value, str) and value.strip() != ""
        need = "text (a name or path; quote a number: \"2024\")"
        value = Path(value) if ok and base is Path else value
    elif base in (tuple, list):
        if isinstance(value, str) and option.parse is not None:
            try:
                value = option.parse(value)
            except argparse.ArgumentTypeError as exc:
                raise ConfigError(f"{where}: {exc}") from None
        ok, need = isinstance(value, (list, tuple)), "a list"
        numbers = isinstance(default_value, tuple) and default_value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in default_value)
        if ok and numbers:
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            need = "a list of numbers"
            if ok and not all(math.isfinite(v) for v in value):
                raise ConfigError(f"{where}: {list(value)} holds a value that is not a finite "
                                  "number")
        value = tuple(value) if ok and base is tuple else value
    else:
        return value
    if not ok:
        raise ConfigError(f"{where}: {value!r} is not {need}")
    return value


# ---------------------------------------------------------------------------- parsers


def fractions(text: str) -> tuple:
    try:
        parts = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not three comma-separated numbers") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"'{text}' needs three values: train,val,test")
    return parts


def names(text: str) -> tuple:
    return tuple(c.strip() for c in text.split(",") if c.strip())
