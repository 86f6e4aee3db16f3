# `make serve` and `make test` bootstrap .venv themselves (Python 3.11).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve pull test test-warmup test-lab test-longctx test-model test-deploy test-image test-api test-ui lint bench bench-peers bench-server-peers bench-kvpress-peer verify-cache train-base clean

# The default served model: imported from a pinned PyPI wheel by `toyllm pull` (made, git-ignored).
MODEL := smollm2-135m-instruct

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Stamps: reinstall when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,hf]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-deploy: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,deploy]'
	touch $@

$(VENV)/.installed-peers: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,peers]'
	touch $@

$(VENV)/.installed-ui: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,ui]'
	touch $@

$(VENV)/.installed-api: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,api]'
	touch $@

# The HTTP server (settings: TOYLLM_* environment variables, see README). Serving the default model
# pulls it first when it is missing; TOYLLM_CHECKPOINT=weights/toyllm-base serves the model trained here.
serve: $(VENV)/.installed
	@if [ -z "$$TOYLLM_CHECKPOINT" ] && [ -z "$$TOYLLM_PRESET" ]; then $(BIN)/toyllm pull $(MODEL); fi
	$(BIN)/toyllm serve

pull: $(VENV)/.installed
	$(BIN)/toyllm pull $(MODEL)

# Unit, engine and server tests (in-process and against a real uvicorn).
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not deploy and not image and not model and not longctx and not lab and not ui and not warmup"

# A server that warms every kind of cache class (every policy family, KVzip, tiers) and then
# compiles nothing over every prompt length, session continuation and memory-pressure step.
test-warmup: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m warmup

# The lab's tools: the offline corpus and data specs, training, evaluation, the benchmarks and the
# dashboard (tiny models).
test-lab: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m lab

# The long-context protocols (generators, runners against direct scoring and the engine), the
# policies whose budget varies over heads or layers against NumPy references (tiny models), and
# what compression keeps on the trained model (weights/toyllm-base: copying, two tiers, pressure).
test-longctx: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m longctx

# The real model: pull it, check its logits against transformers' reference numbers, ask a live server.
test-model: $(VENV)/.installed-dev
	$(BIN)/toyllm pull $(MODEL)
	$(BIN)/python -m pytest -q -s -m model tests/model

# Retrain the small model shipped as weights/toyllm-base (its MODEL_CARD.md has the study behind the
# recipe and what each stage measured): the offline corpus and an 8k byte-level BPE trained on it;
# 1. language: 900 steps of a 2,200-step schedule, 8 x 1024 tokens, half the windows repeating a span;
# 2. from it, 600 steps of a 1,250-step schedule, three quarters of the windows repeating a span, half
#    of those spans random tokens;
# 3. from it, induction: 2,000 steps of 32 x 64 tokens, every window random tokens ending in a random
#    sequence of random length written twice (the heads formed here, near step 500);
# 4. the copying grown to longer windows: 128, 256 and 512 tokens, a quarter of the windows text;
# 5. language at 1024 tokens with copying kept: 3/8 of the windows induction windows.
# ~2 hours on 2 cores; a stopped stage continues with RESUME=--resume.
BASE_RUN ?= runs/toyllm-base
BASE_TRAIN = $(BIN)/toyllm train --data offline:data/offline --tokenizer $(BASE_RUN)/bpe --preset base \
    --eval-every 250 --checkpoint-every 50 $(RESUME)
train-base: $(VENV)/.installed-dev
	[ -f data/offline/train.txt ] || $(BIN)/toyllm data build-offline --out data/offline
	[ -f $(BASE_RUN)/bpe/tokenizer.json ] || $(BIN)/toyllm data train-tokenizer --data offline:data/offline \
	    --out $(BASE_RUN)/bpe --vocab-size 8192
	[ -f $(BASE_RUN)/1-language/final/model.safetensors ] || $(BASE_TRAIN) --out $(BASE_RUN)/1-language \
	    --seq-len 1024 --batch-size 8 --steps 2200 --stop-at 900 --lr 3e-3 --warmup-steps 150 --copy-share 0.5
	[ -f $(BASE_RUN)/2-spans/final/model.safetensors ] || $(BASE_TRAIN) --out $(BASE_RUN)/2-spans \
	    --init $(BASE_RUN)/1-language/final --seq-len 1024 --batch-size 8 --steps 1250 --stop-at 600 \
	    --lr 2e-3 --warmup-steps 50 --copy-share 0.75 --copy-random 0.5
	[ -f $(BASE_RUN)/3-induction/final/model.safetensors ] || $(BASE_TRAIN) --out $(BASE_RUN)/3-induction \
	    --init $(BASE_RUN)/2-spans/final --seq-len 64 --batch-size 32 --steps 2000 --lr 3e-3 --warmup-steps 50 \
	    --induction-share 1.0
	prev=3-induction; for stage in 128:32 256:16 512:8; do len=$${stage%:*}; \
	    [ -f $(BASE_RUN)/4-longer-$$len/final/model.safetensors ] || $(BASE_TRAIN) --out $(BASE_RUN)/4-longer-$$len \
	        --init $(BASE_RUN)/$$prev/final --seq-len $$len --batch-size $${stage#*:} --steps 300 --lr 1e-3 \
	        --warmup-steps 50 --induction-share 0.75 || exit 1; \
	    prev=4-longer-$$len; done
	$(BASE_TRAIN) --out $(BASE_RUN)/5-language --init $(BASE_RUN)/4-longer-512/final --seq-len 1024 \
	    --batch-size 8 --steps 400 --lr 1e-3 --warmup-steps 50 --induction-share 0.375

# Debian tools the deployment tests drive (root; the package registries are reachable).
DEB_DEPLOY := prometheus nginx-light redis-server
DEB_IMAGE := podman buildah debootstrap runc fuse-overlayfs slirp4netns uidmap curl

define apt_ensure
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing $$missing"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
	fi
endef

# Compose file, Dockerfile lint, promtool, a real Prometheus against a live server, nginx scale-out.
test-deploy: $(VENV)/.installed-dev $(VENV)/.installed-deploy
	$(call apt_ensure,$(DEB_DEPLOY))
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -m deploy

# The playground in a real browser: Playwright (PyPI) driving Debian's Chromium against a live server
# on the tiny model; screenshots of each state in out/playground/.
test-ui: $(VENV)/.installed-dev $(VENV)/.installed-ui
	$(call apt_ensure,chromium)
	$(BIN)/python -m pytest -q -m ui

# Schemathesis against a live server on the tiny random model: every check, a fixed seed, a bounded
# number of cases (API_FUZZ_MAX_EXAMPLES per operation); reports in out/api-fuzz/.
test-api: $(VENV)/.installed-dev $(VENV)/.installed-api
	bash tests/api_fuzz.sh

# Build the image with Podman on a debootstrap base, run it, stream a generation.
test-image:
	$(call apt_ensure,$(DEB_IMAGE))
	bash tests/image_test.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check toyllm_core server tests benchmarks

bench: $(VENV)/.installed
	$(BIN)/toyllm bench --preset seed --lengths 256,1024 --policies full,snapkv --batches 1,16 --json out/bench-decode.json

# The served model next to llama.cpp and transformers on the same weights, in one run
# (docs/serving-speed.md); builds llama-cpp-python the first time.
bench-peers: $(VENV)/.installed-peers
	$(BIN)/toyllm pull $(MODEL)
	$(BIN)/python benchmarks/peers.py --json out/peers.json

# This server next to llama.cpp's llama-server through HTTP, one client for both (docs/serving-speed.md);
# builds llama-server from the llama.cpp that llama-cpp-python's sdist vendors the first time (~20 min).
bench-server-peers: $(VENV)/.installed
	$(BIN)/toyllm pull $(MODEL)
	PIP=$(BIN)/pip bash benchmarks/build_llama_server.sh
	$(BIN)/python benchmarks/server_peers.py --json out/server_peers.json

# NVIDIA's kvpress next to this project's policies on the session-qa `once` protocol: the same documents,
# questions and prompt tokens, accuracy per press/policy and compression ratio (benchmarks/kvpress_peer.py).
# kvpress pins transformers < 5.3 and needs torch, so it gets a virtual environment of its own (never this
# project). Torch's CPU build: here pip's find-links carry the +cpu wheel; elsewhere
# KVPRESS_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'.
KVPRESS_VENV ?= .venv-kvpress
KVPRESS_PIP_ARGS ?=
$(KVPRESS_VENV)/.installed:
	$(PYTHON) -m venv $(KVPRESS_VENV)
	$(KVPRESS_VENV)/bin/pip install --quiet --upgrade pip
	$(KVPRESS_VENV)/bin/pip install --quiet $(KVPRESS_PIP_ARGS) torch==2.13.0+cpu kvpress==0.5.5
	touch $@

bench-kvpress-peer: $(VENV)/.installed $(KVPRESS_VENV)/.installed
	$(BIN)/toyllm pull $(MODEL)
	$(BIN)/python benchmarks/kvpress_peer.py --kvpress-python $(KVPRESS_VENV)/bin/python --json out/kvpress_peer.json

# Checks the default served model (pulled first, as `make serve` does; a no-op when it is there).
verify-cache: $(VENV)/.installed
	$(BIN)/toyllm pull $(MODEL)
	$(BIN)/toyllm verify-cache --length 1024

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
