"""The policy registry. Every module in this package that defines a policy registers it with
`@register`; the package's modules are imported on first use, so adding a policy is adding a file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import Policy

_POLICIES: dict[str, Policy] = {}
_loaded = False


def register(cls: type[Policy]) -> type[Policy]:
    _POLICIES[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__package__}.{module.name}")
        _loaded = True


def get_policy(name: str) -> Policy:
    _load_all()
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(policy_names())}") from None


def policy_names() -> list[str]:
    _load_all()
    return sorted(_POLICIES)
