"""Benchmark evaluation (`rlp-jax evaluate`): the RLP paper's metric, pass@1 on math and science
suites. `tasks` (registry, offline loaders, suites), `prompts`, `graders` (answer extraction,
math-verify equivalence), `metrics` (pass@k), `loglik` (multiple choice by option likelihood),
`generate` (batched sampling through rlp_jax.sampling), `runner` (model → JSON + markdown;
`evaluate_run_dir` for a run's checkpoint), `training` (the trainer's periodic benchmark).
See docs/evaluation.md.
"""
