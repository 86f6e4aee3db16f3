"""Signals: what the forward records in the KV cache for the compression policies, one module each
(`base` says what a signal declares)."""

from .attention_peak import AttentionPeak
from .attention_sum import AttentionSum
from .base import Signal, Want, merge
from .recent_queries import RecentQueries

__all__ = ["AttentionPeak", "AttentionSum", "RecentQueries", "Signal", "Want", "merge"]
