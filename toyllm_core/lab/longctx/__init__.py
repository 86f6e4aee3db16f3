"""Long-context evaluation: what a compressed cache keeps, on tasks where keeping it matters.

- `tasks`: the generated tasks (passkey, multi-key needle in a haystack, multi-turn document
  questions), deterministic given their seed, each knowing where its answer sits;
- `oneshot`: one prompt, one answer: the prompt is prefilled once, then every policy compresses
  its own copy of the cache and answers from it;
- `session`: a multi-turn session through the engine, compressed after each turn as the server does;
- `perplexity`: perplexity of long texts streamed through a policy;
- `report`: cells with bootstrap intervals, tables, JSON.
"""
