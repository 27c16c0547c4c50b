"""Settings from YAML files and the command line, checked before anything starts: a key that no
model has stops the run with an error that names the key and the closest valid one."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (also inside `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def unknown_keys(data: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """Messages for every key of `data` (nested sections too) that `model` does not have, each
    naming the dotted key and the closest valid name."""
    problems = []
    fields = model.model_fields
    names = {f.alias or n for n, f in fields.items()} | set(fields)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
            hint = (
                f"did you mean {prefix + close[0]!r}?"
                if close
                else f"valid keys here: {', '.join(sorted(names))}"
            )
            problems.append(f"unknown setting {dotted!r}; {hint}")
            continue
        inner = _model_of(fields[key].annotation) if key in fields else None
        if inner is not None and isinstance(value, Mapping):
            problems.extend(unknown_keys(value, inner, f"{dotted}."))
    return problems


def reject_unknown(data: Any, model: type[BaseModel]) -> Any:
    """`data` unchanged if every key is known to `model`; else ValueError naming each unknown key."""
    if isinstance(data, Mapping):
        problems = unknown_keys(data, model)
        if problems:
            raise ValueError("; ".join(problems))
    return data


def settings_error(error: Exception) -> str:
    """A pydantic ValidationError as one line per problem, `location: message`, without its URLs."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    lines = []
    for e in errors():
        where = ".".join(str(p) for p in e.get("loc", ()))
        msg = e.get("msg", "").removeprefix("Value error, ")
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n".join(lines)
