"""KV-cache compression policies, one module each: `full`, `streaming`, `snapkv`, `h2o`, `knorm`,
`random`, and those whose budget varies over heads or layers, `adakv` and `pyramidkv`, and the
query-agnostic `expected`."""

from .base import Evicted, EvictingPolicy, Policy, compress, compress_split, protected_slots
from .registry import make_policy, parse_policy, policy_class, policy_names, register

__all__ = [
           "Evicted",
           "EvictingPolicy",
           "Policy",
           "compress",
           "compress_split",
           "make_policy",
           "parse_policy",
           "policy_class",
           "policy_names",
           "protected_slots",
           "register",
]
