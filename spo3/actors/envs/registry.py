"""`make_env(name, **options)`: build an environment adapter by name.

Adapters are imported lazily, so a missing engine (no Java, no alfworld...) only breaks its own
name. Options go to the adapter's constructor:

- "textworld":    TextWorldEnv(include_description=True, max_loaded_games=4, fast_snapshot=True)
- "twx":          TwxEnv(include_task_in_reset_text=True)
- "scienceworld": ScienceWorldEnv(simplification="", max_actions=200, partial_credit=False,
                                  admissible=True, include_task_in_reset_text=True)
- "alfworld":     AlfWorldEnv(data_dir=None, state="facts", check_data=True, max_loaded_games=8)
                  (state="facts": keys from the world state; "observation": from the feedback text)
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from spo3.actors.envs.base import Env, EnvError

_ADAPTERS: dict[str, tuple[str, str]] = {
    "textworld": ("spo3.actors.envs.textworld_env", "TextWorldEnv"),
    "twx": ("spo3.actors.envs.twx_env", "TwxEnv"),
    "scienceworld": ("spo3.actors.envs.scienceworld_env", "ScienceWorldEnv"),
    "alfworld": ("spo3.actors.envs.alfworld_env", "AlfWorldEnv"),
}
_ALIASES = {
    "tw": "textworld",
    "textworld-express": "twx",
    "textworld_express": "twx",
    "sciworld": "scienceworld",
    "science_world": "scienceworld",
}

ENV_NAMES = tuple(_ADAPTERS)


def canonical_name(name: str) -> str:
    """The adapter name that `name` stands for ("tw" -> "textworld"; case and spaces ignored); a
    name that no alias has comes back normalised, known or not."""
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def env_class(name: str) -> type:
    """The adapter class for `name` (imports its module; EnvError if unknown or not importable)."""
    key = canonical_name(name) if isinstance(name, str) else name
    if key not in _ADAPTERS:
        raise EnvError(f"unknown environment {name!r}; one of {', '.join(ENV_NAMES)}")
    module_name, class_name = _ADAPTERS[key]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EnvError(f"environment {key!r} is not available: {e}") from e
    return getattr(module, class_name)


def make_env(name: str, **options: Any) -> Env:
    """Build the adapter `name` ("textworld", "twx", "scienceworld", "alfworld") with `options`."""
    cls = env_class(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as e:
        raise EnvError(f"bad options for environment {name!r}: {e}") from e
    try:
        return cls(**options)
    except ImportError as e:
        raise EnvError(f"environment {name!r} is not available: {e}") from e
