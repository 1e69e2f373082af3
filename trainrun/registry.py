"""One small open registry: models, optimizers, schedules, datasets and tasks register their factories by name.

The names the config validator accepts are the registered names, so adding a component is one `register` call
(plus a YAML option file if it should be selectable as `group=name`), never an edit of a hand-kept list.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

from trainrun.errors import ConfigError


class Registry:
    """name -> object. `key` is the config key that selects from it (e.g. "optimizer.name"), used in errors."""

    def __init__(self, key: str):
        self.key = key
        self._objects: Dict[str, Any] = {}
        self._docs: Dict[str, str] = {}

    def register(self, name: str, obj: Any = None, *, doc: Optional[str] = None) -> Any:
        """`register(name, obj)`, or `@register(name)` as a decorator; a name registered twice is an error (a
        silent replacement would make `name` mean different code depending on import order)."""
        if obj is None:
            return lambda target: self.register(name, target, doc=doc)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.key}: a registered name must be a non-empty string, got {name!r}")
        if name in self._objects:
            raise ValueError(f"{self.key}={name!r} is already registered (to {self._objects[name]!r}); "
                             "choose another name")
        self._objects[name] = obj
        self._docs[name] = doc if doc is not None else _first_line(getattr(obj, "__doc__", None))
        return obj

    def get(self, name: str) -> Any:
        if name not in self._objects:
            raise ConfigError(f"{self.key}={name!r}: must be one of {', '.join(self.names())}")
        return self._objects[name]

    def names(self) -> List[str]:
        """In registration order (built-ins first, in the order the docs list them)."""
        return list(self._objects)

    def describe(self) -> Dict[str, str]:
        """name -> one line saying what it is."""
        return dict(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._objects

    def __iter__(self) -> Iterator[str]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def __repr__(self) -> str:
        return f"Registry({self.key!r}: {', '.join(self._objects)})"


def _first_line(doc: Optional[str]) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""

