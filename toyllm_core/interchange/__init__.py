"""GGUF interchange: import a Llama GGUF into a checkpoint directory, export one back, and pull the
pinned models this project serves."""
