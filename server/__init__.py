"""ToyLLM Serve HTTP server (see the server issue)."""
