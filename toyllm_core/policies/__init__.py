"""KV-cache compression policies, one module each: `full`, `streaming`, `snapkv`, `h2o`, `knorm`,
`random`, and those whose budget varies over heads or layers, `adakv` and `pyramidkv`, and the
query-agnostic `expected`."""

from .base import EvictingPolicy, Evicted, Policy, Signals, compress, compress_split, protected_slots
from .registry import make_policy, parse_policy, policy_class, policy_names, register

__all__ = ["EvictingPolicy", "Evicted", "compress_split", "Policy", "Signals", "compress", "make_policy", "parse_policy", "policy_class", "policy_names",
           "protected_slots", "register"]
