"""Range checks on one config section, shared by the modules that own the sections.

Every failure is one ConfigError line `section.key=value: what is wrong and the fix`, raised on the first bad value.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from omegaconf import OmegaConf

from trainrun.errors import ConfigError


class SectionChecks:
    def __init__(self, section: Any, prefix: str):
        self.section = section
        self.prefix = f"{prefix}." if prefix else ""

    def value(self, key: str) -> Any:
        return OmegaConf.select(self.section, key) if OmegaConf.is_config(self.section) \
            else getattr(self.section, key)

    def fail(self, key: str, message: str) -> None:
        raise ConfigError(f"{self.prefix}{key}={self.value(key)!r}: {message}")

    def one_of(self, key: str, allowed: Iterable[str]) -> None:
        allowed = tuple(allowed)
        if self.value(key) not in allowed:
            self.fail(key, f"must be one of {', '.join(allowed)}")

    def positive(self, *keys: str, allow_zero: bool = False) -> None:
        for key in keys:
            value = self.value(key)
            if value is None:
                continue
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(key, "must be a finite number")
            if value < 0 or (value == 0 and not allow_zero):
                self.fail(key, "must be > 0" if not allow_zero else "must be >= 0")

    def unit(self, *keys: str, closed: bool = False) -> None:
        """In [0, 1) or, closed, [0, 1]."""
        for key in keys:
            value = self.value(key)
            if value is not None and not (0 <= value <= 1 if closed else 0 <= value < 1):
                self.fail(key, "must be in [0, 1]" if closed else "must be in [0, 1)")
