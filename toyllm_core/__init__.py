"""ToyLLM Serve core: model, KV cache, compression policies, generation, checkpoints."""
