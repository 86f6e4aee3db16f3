"""ToyLLM Serve core: `serving` (what the server runs), `lab` (what trains and measures), and what both
share here: configuration, checkpoints, tokenizers, chat templates, GGUF interchange, the command line."""
