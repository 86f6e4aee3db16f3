#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (the HTTP peer of benchmarks/server_peers.py) from the llama.cpp
# that llama-cpp-python's sdist vendors (PyPI is the only reachable source here), CPU only, into
# $DEST (default out/llama.cpp). ~20 minutes on 2 cores; a no-op when the binary is there.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DEST=${DEST:-out/llama.cpp}
PIP=${PIP:-.venv/bin/pip}
BIN="$DEST/build/bin/llama-server"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v cmake >/dev/null || { apt-get install -y -qq cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }; }
mkdir -p "$DEST"
"$PIP" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST"
tar -xzf "$DEST/llama_cpp_python-$VERSION.tar.gz" -C "$DEST"
SRC="$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON >/dev/null
cmake --build "$DEST/build" --target llama-server -j "$(nproc)" >/dev/null
echo "$BIN"
