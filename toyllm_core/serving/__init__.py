"""The serving core: the model, its KV cache and cold tier, compression policies, the engine, sampling
and sessions; everything `toyllm serve` runs."""
