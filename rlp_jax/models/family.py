"""`ModelFamily`: the one interface through which the library uses a model family (the Qwen3 /
Llama-3 `Transformer`, the Nemotron-H hybrid, ...). Each family builds ONE `ModelFamily` in its
own module (`transformer_family.py`, `nemotron_h_family.py`) and rlp_jax.models.families
registers it with one line; everything outside rlp_jax/models asks the registry
(`families.family_of(config_or_model)`, `family_for_hf_model_type`, `family_named`) and never
tests a model's or a config's type.

A family's config is a frozen dataclass with `replace(**changes)`, `num_params()`, `vocab_size`,
`hidden_size`, `num_layers`, `num_heads`, `num_kv_heads`, `head_dim`, the dtypes (`param_dtype`,
`dtype`), `remat`, `attention` and `platform` (rlp_jax.models.kernels); its model is an
`nnx.Module` built as `model_class(config, nnx.Rngs[, init_std])` that keeps `config` and offers the forward
pieces the RLP step calls on any model: `__call__(tokens, positions, valid) -> logits`,
`hidden_states`, `head_weights`, `logits`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How a family samples and scores on its own decode state (a KV cache, a recurrent state):
    what rlp_jax.sampling and rlp_jax.rollouts run, whatever the family. `W` is the sampler's
    weights, `cache` its decode state, `cfg` an rlp_jax.sampling.SamplingConfig; every function
    is pure and traceable (jit it with `cfg`, `num_samples`, `extra_slots` static)."""

    # live model -> W: the weights cast for decoding, made once per rollout outside any loop
    weights: Callable[[Any], Any]
    # (W, prompts_BxP, prompt_lengths_B, cfg, num_samples, extra_slots) -> sampling_core.Prefilled:
    # each prompt once, room for `cfg.max_new_tokens + extra_slots` more tokens per row
    prefill: Callable[..., Any]
    # (W, Prefilled, key, cfg) -> sampling_core.SampleOutput
    decode_loop: Callable[..., Any]
    # (W, cache, tokens_NxT, first_slot_N) -> (final-norm hidden states [N, T, D], cache): T tokens
    # fed after what each row holds, the first at slot `first_slot_N` where slots are addressed
    feed: Callable[..., tuple[Any, Any]]
    # (W, hidden [N, T, D]) -> logits [N, T, V]
    logits: Callable[[Any, Any], Any]
    # True: `feed` writes tokens into cache slots that a later feed may rewrite (an attention
    # cache), so what follows the scored targets (RPT's prediction) continues from the cache
    # `feed` returned, and a timed scoring may donate the cache it writes. False: a recurrent
    # state that cannot take a token back; each continuation starts from the state after the
    # thought, which scoring only reads.
    rewrites_slots: bool


@dataclasses.dataclass(frozen=True)
class Costs:
    """Model FLOPs and memory traffic from a config's shapes alone (rlp-jax bench, through
    rlp_jax.bench.measure; the formulas are in docs/benchmarks.md)."""

    # config -> weights that multiply every token in the decoder body
    matmul_params: Callable[[Any], int]
    # (config, rows, seq_len, scored) -> model FLOPs of one teacher-forced causal forward over
    # rows × seq_len tokens whose LM head runs at `scored` positions per row
    forward_flops: Callable[[Any, int, int, int], float]
    # (config, context) -> one decode step of one row attending to `context` cached tokens
    decode_flops_per_token: Callable[[Any, float], float]
    # (config, *, prompts, prompt_tokens, rows, suffix_tokens) -> {part: bytes} one decode step
    # reads (`weights`, `kv`, and any state of the family's own, e.g. `recurrent_state`)
    decode_step_bytes: Callable[..., dict[str, float]]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str  # registry key: `family_named(name)`
    title: str  # for people: "Qwen3 / Llama-3 decoder", "Nemotron-H hybrid"
    config_type: type  # its config dataclass
    model_class: type  # its nnx.Module: `model_class(config, nnx.Rngs)`
    presets: Mapping[str, Any]  # named configs (`model.preset`)
    preset: Callable[..., Any]  # (name, **overrides) -> config; ValueError naming the choices
    # HF folders: the config.json `model_type`s it reads, and its import / export
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[..., Any]  # (parsed config.json, **overrides) -> config
    load_hf: Callable[..., Any]  # (folder, *, mesh=None, rules=None, **overrides) -> model
    save_hf: Callable[..., Any]  # (model, folder, *, dtype) -> folder
    # model_config.json (rlp_jax.models.convert): the `family` it records for a config (first in
    # the file), every value it claims when reading one, and the config from the file's fields
    json_tag: Callable[[Any], str]
    json_tags: tuple[str, ...]
    config_from_fields: Callable[[dict[str, Any]], Any]
    sampler: Sampler
    costs: Costs
    # The smallest preset: the tests every family passes (tests/test_family_contract.py) run on it.
    test_preset: str
    # Layers of several kinds (Mamba-2, attention, MLP) in `config.pattern`: reports name the pattern.
    hybrid: bool = False

    def build(self, config, rngs: nnx.Rngs, init_std: float | None = None):
        """A model of `config` with weights drawn from `rngs` (its random matrices with standard
        deviation `init_std`, the family's default when None)."""
        return self.model_class(config, rngs) if init_std is None else self.model_class(config, rngs, init_std)

    def abstract_model(self, config):
        """A model of `config` whose weights are shapes only (nothing allocated, unsharded): fill it
        with `nnx.update`, or split off its graph."""
        with nnx.use_eager_sharding(False):
            return nnx.eval_shape(lambda: self.model_class(config, nnx.Rngs(0)))
