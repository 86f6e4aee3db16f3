"""The inference engine: cache classes (fixed geometries), jitted steps, the engine object that
starts and decodes sequences in fixed slots, and the closed-form list of programs it compiles."""

from .classes import MIN_CHUNK, RECALL_TAIL, CacheClass, chunk_sizes, next_piece, plan_classes, row_buckets
from .engine import DecodeFailed, Engine, Prefill, Sequence, StepOutput
from .programs import Program, programs, warm_up

__all__ = ["MIN_CHUNK", "RECALL_TAIL", "CacheClass", "DecodeFailed", "Engine", "Prefill", "Program", "Sequence", "StepOutput", "chunk_sizes",
           "next_piece", "plan_classes", "programs", "row_buckets", "warm_up"]
