"""The full cache: the uncompressed baseline. It never evicts; a request that would exceed the
model's context is refused instead."""

from dataclasses import dataclass

from .base import Policy
from .registry import register


@register
@dataclass(frozen=True)
class FullCache(Policy):
    name = "full"
    evicts = False
