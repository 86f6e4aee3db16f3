"""KV-cache compression policies: `full`, `streaming`, `snapkv`, `h2o` (one module each)."""

from .base import CacheConfig, Policy, compress, protected_slots
from .registry import get_policy, policy_names, register

__all__ = ["CacheConfig", "Policy", "compress", "get_policy", "policy_names", "protected_slots", "register"]
