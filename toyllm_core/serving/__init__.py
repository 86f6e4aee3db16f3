"""The serving core: the model, its KV cache and cold tier, compression policies, the engine, sampling
and sessions (parked between turns, and written as blobs); everything `toyllm serve` runs."""
