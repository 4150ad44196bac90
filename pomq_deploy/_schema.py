"""YAML in, typed frozen dataclasses out: the one place where loose mappings become checked objects.

Schemas are pydantic dataclasses (real dataclasses, validated on construction). A validation failure
becomes one line naming the file, the key path (``blocks[3].w``) and what is allowed there.
"""

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError

from .errors import PomqError

T = TypeVar("T")

# Unknown keys are errors, and instances are immutable.
STRICT = ConfigDict(extra="forbid")

# a name that becomes a file or folder name (a recipe's, a study's): no separator, no '..', no leading dot or dash
NAME_RULE = "letters, digits, '.', '_', '+' and '-', at most 64, starting with a letter or digit, no '..'"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def check_name(value: str) -> str:
    """``value`` if it is safe as one path component (``NAME_RULE``), else ValueError saying what is allowed.
    Checked once, where a name is read: a recipe is a file a user may receive from someone else."""
    if not _NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"not allowed as a name, which becomes a file name ({NAME_RULE})")
    return value


Name = Annotated[str, AfterValidator(check_name)]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a path cannot hold a NUL character")
    return value


PathText = Annotated[str, AfterValidator(_no_nul)]  # a path read from a file: the OS refuses NUL in one


def read_yaml(path: Path, error: type[PomqError]) -> dict:
    """The top-level mapping of a YAML file, or ``error`` naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or getattr(e, "reason", None) or e).split())  # PyYAML's span lines
        raise error(f"{path}:{where} not valid YAML ({why})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse(cls: type[T], data: Any, source: str, error: type[PomqError]) -> T:
    """Validate ``data`` into ``cls``; on failure raise ``error`` with the first problem as one line."""
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as e:
        raise error(f"{source}: {_describe(cls, e.errors()[0])}") from None


def to_plain(obj: Any) -> Any:
    """A dataclass as plain dicts/lists, ready for YAML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _key_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """The dataclass inside Optional[...] or tuple[..., ...], if there is one."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        inner = _unwrap(arg)
        if inner is not None:
            return inner
    return None


def _fields_at(cls: type, loc: tuple) -> list[str]:
    """Names of the keys allowed in the mapping found at ``loc`` inside ``cls``."""
    tp: Any = cls
    for part in loc:
        tp = _unwrap(tp)
        if tp is None:
            return []
        if isinstance(part, str):
            tp = typing.get_type_hints(tp).get(part)
    tp = _unwrap(tp)
    return [f.name for f in dataclasses.fields(tp)] if tp is not None else []


def _describe(cls: type, err: dict) -> str:
    loc, kind = tuple(err["loc"]), err["type"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        allowed = ", ".join(_fields_at(cls, loc[:-1]))
        return f"unknown key '{_key_path(loc)}'; allowed keys here: {allowed}"
    if kind == "missing":
        return f"missing required key '{_key_path(loc)}'"
    where = f"'{_key_path(loc)}'" if loc else "top level"
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list, types.NoneType)) and kind != "none_required" else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")  # our own validators' messages stand alone
    return f"{where}: {msg}{shown}"
