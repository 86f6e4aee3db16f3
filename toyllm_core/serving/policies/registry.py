"""The policy registry. Every module in this package that defines a policy registers its class with
`@register`; the package's modules are imported on first use, so adding a policy is adding a file."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from .base import Policy

_POLICIES: dict[str, type[Policy]] = {}
_loaded = False


def register(cls: type[Policy]) -> type[Policy]:
    _POLICIES[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__package__}.{module.name}")
        _loaded = True


def policy_class(name: str) -> type[Policy]:
    _load_all()
    try:
        return _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(policy_names())}") from None


def make_policy(name: str, **params) -> Policy:
    """The policy `name` with `params` (the rest at their defaults), validated; ValueError naming the
    parameters it takes when one is unknown."""
    cls = policy_class(name)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        takes = ", ".join(known) if known else "no parameters"
        raise ValueError(f"policy {name!r} has no parameter {', '.join(unknown)}; it takes {takes}")
    return cls(**params).validate()


def policy_names() -> list[str]:
    _load_all()
    return sorted(_POLICIES)


def parse_policy(text: str) -> Policy:
    """A policy from its compact form, `name` or `name:key=value,key=value` (integer values), as
    `Policy.label` writes it: `snapkv:budget=128,slack=32`."""
    name, _, args = text.strip().partition(":")
    params = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{text!r}: expected name:key=integer,... (got {item!r})")
        params[key.strip()] = int(value)
    return make_policy(name, **params)
