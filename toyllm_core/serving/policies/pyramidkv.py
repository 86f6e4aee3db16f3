"""PyramidKV (Cai et al., 2024, arXiv:2406.02069, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling"): lower layers spread their attention over the whole context and
upper layers focus on a few tokens, so the budget shrinks with depth. Layer budgets fall
arithmetically from the first layer to the last, which keeps `budget / beta` (at least the sinks and
window); their mean is `budget`, so the model keeps `budget x layers` slots per KV head in all,
exactly (largest-remainder rounding). Each layer chooses its slots by SnapKV's pooled votes.

The first layer keeps the most, `2 x budget - last`: that is the room a row keeps after a
compression (`kept_slots`); a layer keeping fewer leaves the rest of its slots empty.
Parameters: SnapKV's and `beta`.
"""

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from .base import param
from .registry import register
from .snapkv import SnapKV


@register
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name = "pyramidkv"
    beta: int = param(20, "The last layer keeps budget / beta.", ge=1, le=1024)

    def validate(self) -> "PyramidKV":
        super().validate()
        if self.beta < 1:
            raise ValueError("beta must be >= 1")
        return self

    @property
    def last_budget(self) -> int:
        return min(self.budget, max(self.budget // self.beta, self.sink_size + self.window_size, 1))

    @property
    def kept_slots(self) -> int:
        return 2 * self.budget - self.last_budget

    def layer_budgets(self, n_layers: int) -> np.ndarray:
        """Slots each layer keeps per KV head: falling arithmetically, summing to budget x layers."""
        if n_layers == 1:
            return np.array([self.budget])
        exact = np.linspace(self.kept_slots, self.last_budget, n_layers)
        budgets = np.floor(exact).astype(np.int64)
        short = self.budget * n_layers - budgets.sum()  # whole slots lost to rounding down
        budgets[np.argsort(budgets - exact, kind="stable")[:short]] += 1
        return budgets

    def allocate(self, scores, live, protected):
        layers, batch, heads, _ = scores.shape
        per_layer = jnp.asarray(self.layer_budgets(layers), jnp.int32)
        return jnp.broadcast_to(per_layer[:, None, None], (layers, batch, heads))
