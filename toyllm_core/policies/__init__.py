"""KV-cache compression policies: `full`, `streaming`, `snapkv`, `h2o` (one module each)."""

from .base import EvictingPolicy, Policy, Signals, compress, protected_slots
from .registry import make_policy, parse_policy, policy_class, policy_names, register

__all__ = ["EvictingPolicy", "Policy", "Signals", "compress", "make_policy", "parse_policy", "policy_class", "policy_names",
           "protected_slots", "register"]
