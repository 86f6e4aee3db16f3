"""What the serving core does differently per XLA backend, in one place, chosen by
`jax.default_backend()`. Everything else (the model, the cache, the policies, the engine) is
backend-free and asks this module.

Each choice answers a slow path of XLA's CPU backend, measured on this project's CPU machines
(docs/serving-speed.md, benchmarks/matmul_forms.py):
- `bits_storage`: bfloat16 arrays that a jitted step slices or updates in place (the stacked layer
  weights, the K/V cache) are kept as their uint16 bit patterns. XLA-CPU slices and updates bfloat16
  by converting through float32, which copied the whole array every time (~10x slower for a layer's
  weights in the scan, ~100x for a batch-16 cache write); on integers these are in-place. The bits
  are reinterpreted (free) where they are used.
- `pair_one_row`: a one-row bfloat16 matmul runs as two rows; XLA-CPU sends one row down a path ~5x
  slower, most of a batch-1 decode step.
- `row_writes`: a chunk's keys and values go into the cache with one dynamic-update-slice per row;
  the equivalent scatter was slower and erratic on XLA-CPU at batch 1 (43-78 ms per decode step
  against 31-53 ms), as if it sometimes copied the cache.
- `decode_attention_f32`: a decode step (one query per row) reads its keys and values as float32
  for the two attention dots: XLA-CPU's batched bfloat16 dot is slow at one query row. SmolLM2's
  decode call, timed alternately with the bfloat16 form in one process: one row over 1,024 and
  2,064 slots 31.8 -> 29.3 and 47.3 -> 41.4 ms per step, 16 rows over 256 and 1,024 slots 62.3 ->
  58.0 and 183.3 -> 168.2 ms. The attention alone (`benchmarks/attention_forms.py`): one row over
  4,096 slots 21.1 -> 12.0 ms for 30 layers; 16 rows over 1,024 slower alone (58 -> 71 ms), where
  the conversion cannot fuse with the step's slicing of the layer out of the cache.
- `lazy_zero_pages`: a new cache's zeroed keys and values are handed back to the kernel as untouched
  pages (`release_zero_pages`), which read as zeros and become resident only when a token is written
  there. XLA fills a new buffer with zeros, so a class's decode state (1 GiB by default) was resident
  whole from its first row on; now resident memory follows the tokens the rows hold. The cache is
  updated in place from then on (donated), so the pages stay lazy.

Other backends (GPUs) store bfloat16 as it is, multiply one row as one, attend in the cache's dtype,
and write every row with one scatter: the plain forms, which XLA's GPU backend compiles to in-place updates. Those forms run
on CPU too (the tests check both give the same numbers there); they are unmeasured on a GPU here.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass
from functools import cache

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class Backend:
    platform: str
    bits_storage: bool
    pair_one_row: bool
    row_writes: bool
    decode_attention_f32: bool = False
    lazy_zero_pages: bool = False


CPU = Backend("cpu", bits_storage=True, pair_one_row=True, row_writes=True, decode_attention_f32=True,
              lazy_zero_pages=True)
PLAIN = Backend("plain", bits_storage=False, pair_one_row=False, row_writes=False)

# TOYLLM_BACKEND_CHOICES=plain runs the plain forms on any backend (the tests compare them on CPU).
_ENV = "TOYLLM_BACKEND_CHOICES"


@cache
def current() -> Backend:
    """The choices for the default backend (read once per process, at the first trace)."""
    if os.environ.get(_ENV) == "plain":
        return PLAIN
    return CPU if jax.default_backend() == "cpu" else PLAIN


def to_bits(x: jax.Array) -> jax.Array:
    """How the backend stores `x`: its bits for bfloat16 under `bits_storage`, else `x`."""
    if current().bits_storage and x.dtype == jnp.bfloat16:
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_bits(x: jax.Array) -> jax.Array:
    """The array in its real dtype (the inverse of `to_bits`)."""
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def storage_dtype(dtype):
    """The dtype arrays of `dtype` are stored as (see `to_bits`)."""
    return jnp.uint16 if current().bits_storage and jnp.dtype(dtype) == jnp.bfloat16 else dtype


def attention_dtype(cache_dtype, n_queries: int):
    """The dtype the attention dots read keys and values in, for chunks of `n_queries` per row."""
    return jnp.float32 if current().decode_attention_f32 and n_queries == 1 else cache_dtype


def pair_one_row(x: jax.Array, w_dtype) -> bool:
    """Whether x [..., in] (one row) times a `w_dtype` weight should run as two rows."""
    n_rows = 1
    for n in x.shape[:-1]:
        n_rows *= n
    return current().pair_one_row and jnp.dtype(w_dtype) == jnp.bfloat16 and n_rows == 1


_MADV_DONTNEED = 4  # Linux


def release_zero_pages(cache):
    """`cache` (a new, empty KV cache) with the whole pages of its zeroed keys and values
    returned to the kernel (madvise MADV_DONTNEED: they read as zeros again, and count as resident
    only once written). On the host backend only (`lazy_zero_pages`); elsewhere the cache as it is."""
    if not current().lazy_zero_pages or not hasattr(os, "sysconf"):
        return cache
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return cache
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for leaf in (cache.k, cache.v):
        if not hasattr(leaf, "unsafe_buffer_pointer"):
            continue
        leaf.block_until_ready()  # the zeros are written before the pages go
        start = leaf.unsafe_buffer_pointer()
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + leaf.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            madvise(first, last - first, _MADV_DONTNEED)
    return cache
