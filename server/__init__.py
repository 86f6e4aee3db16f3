"""ToyLLM Serve's HTTP server: the routes, the engine thread, sessions (their store, the
memory-pressure ladder, their clients) and the playground, over the serving core in toyllm_core."""
