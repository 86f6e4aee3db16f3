"""Reference point: Hugging Face transformers on the seed preset's dimensions, greedy decoding with
its own KV cache from a 960-token prompt (so the 64 timed steps end at context 1024).

Needs the `hf` extra (torch, CPU). Run: .venv/bin/python benchmarks/hf_decode.py
"""

import statistics
import time

import torch
import transformers

torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True)
m = transformers.LlamaForCausalLM(cfg).eval()
for B in (1, 16):
    ts = []
    for rep in range(4):
        ids = torch.randint(0, 50257, (B, 960))
        with torch.no_grad():
            out = m(ids, use_cache=True); past = out.past_key_values; tok = out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(64):
                out = m(tok, past_key_values=past, use_cache=True); past = out.past_key_values; tok = out.logits[:, -1:].argmax(-1)
            ts.append((time.perf_counter() - t) / 64 * 1e3)
    print(f"HF transformers {transformers.__version__} torch {torch.__version__} batch {B}: median {statistics.median(ts[1:]):.3f} ms/step")
