"""`rlp-jax plan`: per-device memory and FLOPs of a config from shapes alone (no weights, no
accelerator), and a verdict on whether it fits, naming the knob to turn when it does not.

The train state is sized exactly: `train_step.abstract_state_from_scratch` on an `AbstractMesh` of
the config's mesh gives every leaf's shape, dtype and `NamedSharding` (the real rules, with
`sharding.fit_spec`'s replication of dimensions a mesh axis does not divide). Everything that
lives only inside the jitted step (KV cache, activations, logits) is an estimate from the formulas
below, written for the code as it is (plain XLA attention that materialises its scores). The peak
is `state + rollout buffers + max(phase)`; the phases of a step never overlap:

- rollouts, chunk by chunk (`rlp.rollout_microbatches`): KV cache + the larger of one prefill
  layer and one decode step;
- the EMA no-think baseline S_ema: a forward per rollout chunk (one layer alive at a time);
- old/reference log-probs (only with several updates per batch or β > 0): forward per micro-batch;
- the policy update per grad-accum micro-batch: gradients + activations + thought logits.

See docs/launch.md for the formulas and the table of configs.

For the Nemotron-H hybrid (a Nemotron `model.preset`, or a Nemotron folder at `init.path`), the
plan is the exact train state plus the rollout's recurrent state per row (Mamba conv and SSM
states, attention keys and values): a lower bound, as the hybrid step's activations, logits and
FLOPs are not estimated yet (`hybrid_estimate`; docs/models.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

GiB = 2**30
USABLE_FRACTION = 0.9  # of HBM, for XLA's workspace, fragmentation and the compiled program


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    hbm_gib: float | None  # per device
    peak_tflops: float | None  # dense bf16, per device


# Per JAX device. TPU v5p-N has N/2 chips (N counts TensorCores; a chip is one megacore device);
# v5e-N and v6e-N have N chips.
PLATFORMS = {
    "tpu-v5p": Platform("TPU v5p chip (95 GiB HBM)", 95.0, 459.0),
    "tpu-v5e": Platform("TPU v5e chip (16 GiB HBM)", 16.0, 197.0),
    "tpu-v6e": Platform("TPU v6e chip (32 GiB HBM)", 32.0, 918.0),
    "h100": Platform("NVIDIA H100 SXM (80 GiB HBM)", 80.0, 989.0),
    "h200": Platform("NVIDIA H200 (141 GiB HBM)", 141.0, 989.0),
    "cpu": Platform("simulated CPU device (host RAM shared by all devices)", None, None),
}


# ---------------------------------------------------------------- shapes

def _platform_of(config_path: str | None) -> str | None:
    """The optional module-level `PLATFORM` of a config file (a key of PLATFORMS)."""
    if not config_path or not Path(config_path).is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"rlp_plan_{Path(config_path).stem}", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "PLATFORM", None)


def model_config_for(config, notes: list[str]):
    """The ModelConfig `rlp-jax train` would build, or the preset's shapes when the weights or the
    tokenizer it needs are not on this machine (said in `notes`)."""
    from rlp_jax import build
    from rlp_jax.config import ConfigError
    from rlp_jax.models.config import preset

    try:
        tokenizer = build.tokenizer(config)
    except ConfigError:  # a tokenizer path that exists only on the cluster
        tokenizer = None
    path_ok = config.init.kind == "scratch" or (config.init.path and Path(config.init.path).exists())
    if tokenizer is not None and path_ok:
        return build.model_config(config, tokenizer), tokenizer
    hybrid = hybrid_model_config(config, notes)
    if hybrid is not None:
        return hybrid, tokenizer
    base = preset(config.model.preset)
    vocab = config.model.vocab_size or (tokenizer.vocab_size if tokenizer and config.init.kind == "scratch"
                                        else base.vocab_size)
    if config.init.kind != "scratch" and not path_ok:
        where = f"{config.init.path} is not on this machine" if config.init.path else "init.path is not set"
        notes.append(f"{where}: shapes from model.preset={config.model.preset!r}")
    elif tokenizer is None:
        notes.append(f"tokenizer {config.tokenizer!r} is not here: vocabulary from model.preset ({vocab})")
    model_config = base.replace(vocab_size=vocab, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                remat=config.model.remat, attention=config.model.attention)
    return model_config, tokenizer


def _suffix_len(config, tokenizer) -> int:
    template = config.rlp.prompt_template
    if not template:
        return 0
    return len(tokenizer.encode(template)) if tokenizer is not None else len(template.encode())


def abstract_mesh(shape, axes):
    import jax

    return jax.sharding.AbstractMesh(tuple(shape), tuple(axes),
                                     axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def state_bytes(config, model_config, mesh) -> dict[str, int]:
    """Exact per-device bytes of each part of the train state under the real shardings (of a
    Transformer, or of the Nemotron-H hybrid for a NemotronHConfig)."""
    import jax

    from rlp_jax import build
    from rlp_jax import train_step as ts
    from rlp_jax.models.nemotron_h import NemotronHConfig

    if isinstance(model_config, NemotronHConfig):
        abstract, shardings = _hybrid_abstract_state(config, model_config, mesh)
    else:
        _, abstract, shardings, _ = ts.abstract_state_from_scratch(
            model_config, build.optimizer(config), config.seed, mesh, build.rules(config),
            with_reference=build.needs_reference(config))

    def size(tree, tree_shardings) -> int:
        leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)
        return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize for a, s in zip(leaves, specs))

    return {"params": size(abstract.params, shardings.params),
            "ema": size(abstract.ema_params, shardings.ema_params),
            "optimizer": size(abstract.opt_state, shardings.opt_state),
            "reference": 0 if abstract.ref_params is None else size(abstract.ref_params, shardings.ref_params),
            "other": size((abstract.step, abstract.rng), (shardings.step, shardings.rng))}


# ---------------------------------------------------------------- the estimate

class _Ways:
    """How many ways the real rules split a dimension (1 where the mesh axes do not divide it)."""

    def __init__(self, mesh, rules):
        from rlp_jax import sharding

        self.mesh, self.sharding, self.rules = mesh, sharding, rules

    def __call__(self, logical: str, size: int) -> int:
        spec = self.sharding.fit_spec((size,), self.sharding.logical_to_mesh((logical,), self.rules), self.mesh)
        names = () if spec[0] is None else (spec[0] if isinstance(spec[0], tuple) else (spec[0],))
        return math.prod(self.mesh.shape[n] for n in names)


def _scores_bytes(rows, S, m, w, b, fused: bool) -> float:
    """A layer's attention probabilities for `rows` sequences of S tokens: float32 scores and
    compute-dtype probabilities (Q·S·S·(4 + b)), or with a fused kernel only its float32
    log-sum-exp per query (Q·S·4)."""
    Q = m.num_heads // w.heads
    return rows * Q * S * (4 if fused else S * (4 + b))


def _layer_bytes(rows, S, m, w, b, fused: bool = False):
    """Per-device bytes of one decoder layer's tensors for `rows` sequences of `S` tokens:
    `(all of them, the part remat='dots_saveable' keeps)`. All: per token the residual stream,
    two norms and the residual after attention (4·D), q/k/v raw, normed and rotated, and the
    attention output (≈ 4·(Q + J)·hd for Q query and J kv heads), gate, up, silu(gate) and their
    product (4·F), all in the compute dtype; per row the attention probabilities
    (`_scores_bytes`). Dots: the matmul outputs q, k, v, o, gate, up, down."""
    D, hd = m.hidden_size, m.head_dim
    Q, J, F = m.num_heads // w.heads, m.num_kv_heads // w.kv, m.intermediate_size // w.mlp
    token = b * (4 * D + 4 * (Q + J) * hd + 4 * F)
    full = rows * S * token + _scores_bytes(rows, S, m, w, b, fused)
    dots = rows * S * b * ((Q + 2 * J) * hd + 2 * D + 2 * F)
    return full, dots


def _forward_layer_bytes(rows, S, m, w, b, fused: bool = False):
    """Per-device peak of one decoder layer in a forward pass without gradients (earlier layers'
    tensors are freed): residual and normed input, q/k/v, and the larger of the attention
    probabilities (`_scores_bytes`) and the MLP's gate, up and product (3·F)."""
    D, hd = m.hidden_size, m.head_dim
    Q, J, F = m.num_heads // w.heads, m.num_kv_heads // w.kv, m.intermediate_size // w.mlp
    return rows * S * b * (2 * D + (Q + 2 * J) * hd) + max(_scores_bytes(rows, S, m, w, b, fused),
                                                            rows * 3 * S * F * b)


def _decode_weight_bytes(m, w, b) -> float:
    """The rollout's own copy of the weights (rlp_jax.models.decode.decode_weights): per layer,
    in the compute dtype, split over the tensor axes only (not over fsdp, so that it is gathered
    once per rollout rather than at every decode step)."""
    D, hd, F = m.hidden_size, m.head_dim, m.intermediate_size
    layer = D * hd * (2 * m.num_heads // w.heads + 2 * m.num_kv_heads // w.kv) + 3 * D * F // w.mlp + 2 * D
    return b * (m.num_layers * layer + D * m.vocab_size // w.vocab + D)


def fused_attention(platform: str | None, dtype: str) -> bool:
    """Whether `ModelConfig.attention='auto'` runs a fused kernel there (no S×S scores kept)."""
    if platform is None or platform == "cpu":
        return False
    return platform.startswith("tpu") or dtype in ("bfloat16", "float16")


def _rows(total: int, ways: int, warnings: list[str], what: str) -> int:
    if total % ways == 0:
        return total // ways
    warnings.append(f"{what}: {total} rows do not divide over the {ways} batch devices, so every device "
                    f"computes all {total} (choose the knob so the rows are a multiple of {ways})")
    return total


@dataclasses.dataclass
class Estimate:
    memory: dict[str, float]  # bytes per device, by term
    phases: dict[str, dict[str, float]]  # phase → its terms (bytes per device)
    peak_phase: str
    peak_bytes: float
    flops: dict[str, float]  # per step, whole mesh
    tokens: dict[str, float]
    warnings: list[str]
    state: dict[str, int]  # exact per-device bytes of the train state (state_bytes)


def estimate(config, model_config, mesh_shape, suffix_len: int = 0, state: dict | None = None,
             platform: str | None = None) -> Estimate:
    """Per-device memory (bytes) and per-step FLOPs of `config` on a mesh of `mesh_shape`
    (`state`: `state_bytes` already computed for this model, optimizer and mesh) on `platform`
    (a key of PLATFORMS; it decides whether attention runs fused)."""
    import jax.numpy as jnp

    from rlp_jax import build
    from rlp_jax import train_step as ts

    mesh = abstract_mesh(mesh_shape, config.mesh.axes)
    ways = _Ways(mesh, build.rules(config))
    m = model_config
    r = config.rlp
    b = jnp.dtype(m.dtype).itemsize
    B, G, L = config.train.batch_size, r.num_rollouts, r.max_thought_len
    C, K = config.data.max_context, config.data.target_len
    P = C + suffix_len + 1
    layers, D, V = m.num_layers, m.hidden_size, m.vocab_size
    w = types.SimpleNamespace(heads=ways("heads", m.num_heads), kv=ways("kv_heads", m.num_kv_heads),
                              mlp=ways("mlp", m.intermediate_size), vocab=ways("vocab", V),
                              batch=ways("batch", math.prod(mesh.shape.values())))
    warnings: list[str] = []
    state = state_bytes(config, model_config, mesh) if state is None else state
    memory = {k: float(v) for k, v in state.items()}
    memory["gradients"] = 2.0 * state["params"]  # accumulator + one micro-batch's gradient (param dtype)
    Vd = V // w.vocab
    fused = fused_attention(platform, m.dtype) and m.attention in ("auto", "cudnn", "splash")
    micro = r.num_minibatches * r.grad_accum_steps
    fresh_old = r.ppo_epochs == 1 and r.num_minibatches == 1

    def head_positions(positions):
        chunk = r.get("head_chunk_len", 0) if r.objective != "ntp" else 0
        return min(positions, chunk) if chunk > 0 else positions

    def update_activations(rows, S, logit_positions):
        full, dots = _layer_bytes(rows, S, m, w, b, fused)
        carry = rows * S * D * b
        saved, transient = {"none": (full, 0), "full": (carry, full),
                            "dots_saveable": (carry + dots, full - dots)}[m.remat]
        # hidden states at the thought positions, then logits, f32 log-softmax and its gradient
        # (of one rlp.head_chunk_len chunk of positions at a time when that is set)
        logits = rows * (logit_positions * D * b + head_positions(logit_positions) * Vd * (b + 12))
        return {"activations": layers * saved + transient, "logits": logits}

    phases: dict[str, dict[str, float]] = {}
    flops: dict[str, float] = {}
    body = 2 * layers * (D * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * D * m.intermediate_size)
    head = 2 * D * V
    attn = 4 * layers * m.num_heads * m.head_dim  # × attended keys, per token

    if r.objective == "ntp":
        S = config.data.seq_len if config.data.kind == "documents" else C + K
        rows = _rows(B // micro, w.batch, warnings, "NTP micro-batch")
        phases["update"] = {"gradients": memory["gradients"], **update_activations(rows, S - 1, S - 1)}
        fwd = B * ((S - 1) * (body + head) + attn * (S - 1) ** 2 / 2)
        flops["update (fwd + bwd)"] = 3 * fwd * r.ppo_epochs
        tokens = {"trained": float(B * (S - 1))}
        buffers = 0.0
    else:
        block = r.get("cache_block_len", 256)
        S_suffix, S = -(-(L + 1 + K) // block) * block, P + L
        chunk = B // r.rollout_microbatches
        prow = _rows(chunk, w.batch, warnings, "rollout prefill (prompts per chunk)")
        crow = _rows(chunk * G, w.batch, warnings, "rollout chunk")
        kv_token = layers * (m.num_kv_heads // w.kv) * m.head_dim * 2 * b  # keys + values, one token
        # The rollout cache: each prompt's keys and values once, each row's own suffix blocks;
        # the rollout's own weights; then the larger of a prefill layer and one decode step's
        # logits (compute dtype, 3 float32 copies for sampling) and attention scores.
        prefill = _forward_layer_bytes(prow, P, m, w, b, fused)
        decode = crow * (Vd * (b + 12) + (m.num_heads // w.heads) * (P + S_suffix) * (8 + b))
        phases["rollouts"] = {"kv_prefix": prow * P * kv_token, "kv_suffix": crow * S_suffix * kv_token,
                              "decode_weights": _decode_weight_bytes(m, w, b),
                              "prefill_or_decode": max(prefill, decode)}
        erow = _rows(chunk, w.batch, warnings, "EMA baseline chunk")
        phases["ema_baseline"] = {"forward": _forward_layer_bytes(erow, C + K, m, w, b, fused)}
        urow = _rows(B // micro * G, w.batch, warnings, "update micro-batch")
        if not fresh_old or r.kl_coef > 0:
            phases["old_logprobs"] = {"forward": _forward_layer_bytes(urow, S, m, w, b, fused)
                                                 + urow * head_positions(L) * Vd * (b + 8)}
        phases["update"] = {"gradients": memory["gradients"], **update_activations(urow, S, L)}
        extra = (0 if fresh_old else 4 * L) + (4 * L if r.kl_coef > 0 else 0)
        buffers = float(B * G // w.batch * (9 * L + 4 * (P + L) + 4 * L + extra))
        N = B * G
        flops["rollout prefill"] = B * (P * body + head + attn * P * P / 2)
        flops["rollout decode"] = N * L * (body + head + attn * (P + L / 2))
        flops["S_pred scoring"] = N * (K + 1) * (body + head + attn * (P + L))
        flops["S_ema baseline"] = B * ((C + K) * body + K * head + attn * (C + K) ** 2 / 2)
        seq_fwd = N * (S * body + L * head + attn * S * S / 2)
        if not fresh_old:
            flops["old log-probs"] = seq_fwd
        if r.kl_coef > 0:
            flops["reference log-probs"] = seq_fwd
        flops["update (fwd + bwd)"] = 3 * seq_fwd * r.ppo_epochs
        # The paper's accounting at every length's maximum, as the train step counts what it processed.
        prediction = r.rpt_prediction_len if r.objective == "rpt" else 0
        t_inp = B * ts.input_flop_tokens(C, K)
        t_flop = G * ts.rollout_flop_tokens(C, L + prediction, 1, K, suffix_len) * B + t_inp
        tokens = {"thought_tokens": float(N * L), "t_flop": float(t_flop), "t_inp": float(t_inp),
                  "t_flop_run": float(t_flop * config.train.steps)}
    # Applying the update: new θ, φ and moments are built while the old ones (and the gradient)
    # are still alive, because a non-finite update keeps the old ones.
    phases["optimizer_apply"] = {"gradients": memory["gradients"] / 2,
                                 "new_state": memory["params"] + memory["ema"] + memory["optimizer"]}
    memory["buffers"] = buffers
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    base = sum(v for k, v in memory.items() if k != "gradients")
    return Estimate(memory, phases, peak_phase, base + totals[peak_phase], flops, tokens, warnings, state)


# ---------------------------------------------------------------- the Nemotron-H hybrid

def hybrid_model_config(config, notes: list[str]):
    """The NemotronHConfig when the config's model is the Nemotron-H hybrid (a Nemotron HF or params
    folder at `init.path`, or a Nemotron `model.preset` when that folder is not here), else None.
    Dtypes come from `model`; the vocabulary is `model.vocab_size` or the model's own."""
    from rlp_jax.models import nemotron_h as nh

    overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                     attention=config.model.attention)
    kind, path = config.init.kind, config.init.path
    here = kind != "scratch" and bool(path) and Path(path).exists()
    try:
        if here and kind == "hf" and (Path(path) / "config.json").exists():
            from rlp_jax.models import nemotron_h_hf

            hf_json = json.loads((Path(path) / "config.json").read_text())
            if hf_json.get("model_type") == "nemotron_h":
                return nemotron_h_hf.config_from_hf(hf_json, **overrides)
        if here and kind == "params" and (Path(path) / "model_config.json").exists():
            from rlp_jax.models import convert

            text = (Path(path) / "model_config.json").read_text()
            if convert.family_of_json(text) == "nemotron_h":
                return convert.config_from_json(text).replace(**overrides)
    except ValueError as error:  # HFFormatError, bad JSON: one sentence
        raise ValueError(f"{path}: {error}") from None
    if config.model.preset not in nh.PRESETS or here:
        return None
    if kind != "scratch":
        where = f"{path} is not on this machine" if path else "init.path is not set"
        notes.append(f"{where}: shapes from model.preset={config.model.preset!r}")
    base = nh.preset(config.model.preset)
    if not config.model.vocab_size:
        notes.append(f"vocabulary {base.vocab_size:,}: the preset's own (set model.vocab_size for another)")
    return base.replace(vocab_size=config.model.vocab_size or base.vocab_size, **overrides)


def _hybrid_rules(config):
    """`mesh.rules` plus the Mamba axes of DEFAULT_RULES that it does not name."""
    from rlp_jax import build, sharding

    rules = tuple(build.rules(config))
    named = {logical for logical, _ in rules}
    return rules + tuple(rule for rule in sharding.DEFAULT_RULES if rule[0] not in named)


def _hybrid_abstract_state(config, model_config, mesh):
    """(abstract TrainState, its shardings) of the hybrid, as `train_step` would build them."""
    import jax
    from flax import nnx

    from rlp_jax import build
    from rlp_jax import train_step as ts
    from rlp_jax.models.nemotron_h import NemotronH

    optimizer = build.optimizer(config)

    def init_fn(key):
        with nnx.use_eager_sharding(False):
            model = NemotronH(model_config, nnx.Rngs(params=key))
        return ts.init_state(nnx.state(model, nnx.Param), optimizer, jax.random.fold_in(key, 1),
                             build.needs_reference(config))

    abstract = jax.eval_shape(init_fn, jax.random.key(config.seed))
    return abstract, ts.state_shardings(abstract, optimizer, mesh, _hybrid_rules(config))


def hybrid_row_bytes(m, ways, slots: int) -> dict[str, int]:
    """Per-device bytes of ONE rollout row's recurrent state (nemotron_h.State): per Mamba layer
    the K−1 last conv inputs of x (Hm·P channels) and of B and C (G·N each) in the compute dtype
    and the SSM state [Hm, P, N] in `mamba_ssm_cache_dtype`; per attention layer the keys and
    values of `slots` slots in the compute dtype. `ways(logical, size)`: how many ways the rules
    split that dimension."""
    import jax.numpy as jnp

    b, bc = jnp.dtype(m.dtype).itemsize, jnp.dtype(m.mamba_ssm_cache_dtype).itemsize
    Hm = m.mamba_num_heads // ways("ssm_heads", m.mamba_num_heads)
    P = m.mamba_head_dim // ways("ssm_head_dim", m.mamba_head_dim)
    G = m.n_groups // ways("ssm_groups", m.n_groups)
    N = m.ssm_state_size // ways("ssm_state", m.ssm_state_size)
    J = m.num_kv_heads // ways("kv_heads", m.num_kv_heads)
    H = m.head_dim // ways("head_dim", m.head_dim)
    Lm, La = m.count("mamba"), m.count("attention")
    return {"mamba_conv": Lm * (m.conv_kernel - 1) * (Hm * P + 2 * G * N) * b,
            "mamba_ssm": Lm * Hm * P * N * bc,
            "kv": 2 * La * slots * J * H * b}


@dataclasses.dataclass
class HybridEstimate:
    memory: dict[str, float]  # bytes per device: the train state's parts and the gradients
    phases: dict[str, dict[str, float]]  # phase → its terms (bytes per device), of those estimated
    peak_phase: str
    peak_bytes: float  # a lower bound: activations, logits and the rollout's other buffers not counted
    row_bytes: dict[str, int]  # one rollout row's recurrent state (hybrid_row_bytes)
    rows: int  # rollout rows per device (one chunk of prompts × G)
    slots: int  # attention slots per row
    warnings: list[str]
    state: dict[str, int]


def hybrid_estimate(config, model_config, mesh_shape, suffix_len: int = 0, state: dict | None = None) -> HybridEstimate:
    """What `rlp-jax plan` can say of the hybrid (its step's activations are not modelled yet): the
    exact train state (`state_bytes`), the gradients, and the rollout's recurrent state for one chunk of
    `train.batch_size / rlp.rollout_microbatches` prompts × G rows, each with S = P + L + 1 + K
    attention slots (prompt, thought, </think>, targets: the hybrid's State keeps each row's own)."""
    mesh = abstract_mesh(mesh_shape, config.mesh.axes)
    ways = _Ways(mesh, _hybrid_rules(config))
    r, warnings = config.rlp, []
    P = config.data.max_context + suffix_len + 1
    slots = P + r.max_thought_len + 1 + config.data.target_len
    row = hybrid_row_bytes(model_config, ways, slots)
    chunk = config.train.batch_size // r.rollout_microbatches
    rows = _rows(chunk * r.num_rollouts, ways("batch", math.prod(mesh.shape.values())), warnings, "rollout chunk")
    state = state_bytes(config, model_config, mesh) if state is None else state
    memory = {k: float(v) for k, v in state.items()}
    memory["gradients"] = 2.0 * state["params"]
    phases = {"rollouts": {k: float(rows * v) for k, v in row.items()},
              "update": {"gradients": memory["gradients"]},
              "optimizer_apply": {"gradients": memory["gradients"] / 2,
                                  "new_state": memory["params"] + memory["ema"] + memory["optimizer"]}}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    base = sum(v for k, v in memory.items() if k != "gradients")
    return HybridEstimate(memory, phases, peak_phase, base + totals[peak_phase], row, rows, slots, warnings, state)


def _hybrid_plan(config, config_path, model_config, mesh_shape, devices, spec, hbm_gib, notes) -> dict:
    from rlp_jax import build
    from rlp_jax.config import ConfigError

    try:
        tokenizer = build.tokenizer(config)
    except ConfigError:
        tokenizer = None
    est = hybrid_estimate(config, model_config, mesh_shape, _suffix_len(config, tokenizer))
    m = model_config
    path = config.init.path
    from_folder = config.init.kind in ("hf", "params") and bool(path) and Path(path).exists()
    notes.append("the Nemotron-H hybrid's activations, logits and FLOPs in the RLP step are not estimated yet, "
                 "so the peak is a lower bound")
    out = {"config": config_path, "platform": spec.name if spec else None, "devices": devices,
           "mesh_shape": list(mesh_shape), "mesh_axes": list(config.mesh.axes), "hybrid": True,
           "model": {"preset": path if from_folder else config.model.preset, "family": "nemotron_h", "num_params": m.num_params(),
                     "pattern": m.pattern, "mamba_layers": m.count("mamba"), "attention_layers": m.count("attention"),
                     "mlp_layers": m.count("mlp"), "param_dtype": m.param_dtype, "dtype": m.dtype,
                     "mamba_ssm_cache_dtype": m.mamba_ssm_cache_dtype, "vocab_size": m.vocab_size},
           "memory_gib": {k: v / GiB for k, v in est.memory.items()},
           "phases_gib": {p: {k: v / GiB for k, v in terms.items()} for p, terms in est.phases.items()},
           "row_bytes": est.row_bytes, "rollout_rows_per_device": est.rows, "slots_per_row": est.slots,
           "peak_phase": est.peak_phase, "peak_gib": est.peak_bytes / GiB,
           "warnings": est.warnings, "notes": notes, "hbm_gib": hbm_gib}
    if hbm_gib:
        out["usable_gib"] = hbm_gib * USABLE_FRACTION
        out["fits"] = out["peak_gib"] <= out["usable_gib"]
    return out


def _state_lines(p: dict, model_line: str):
    """The plan's heading, notes and train-state memory lines (shared by both model kinds), the
    number formatter, and the unit and scale it chose."""
    unit, scale = ("GiB", 1) if p["peak_gib"] >= 1 else ("MiB", 1024)
    g = lambda x: f"{x * scale:9.3f}"  # noqa: E731
    mem = p["memory_gib"]
    lines = [f"rlp-jax plan: {p['config'] or 'config'}", model_line,
             f"mesh {tuple(p['mesh_shape'])} over {tuple(p['mesh_axes'])} = {p['devices']} devices"
             + (f" of {p['platform']}" if p["platform"] else "")]
    lines += [f"note: {n}" for n in p["notes"]]
    lines += ["", f"per-device memory ({unit})",
              f"  params                       {g(mem['params'])}",
              f"  EMA teacher (float32)        {g(mem['ema'])}",
              f"  optimizer (AdamW moments)    {g(mem['optimizer'])}",
              f"  reference policy (KL)        {g(mem['reference'])}"]
    return lines, g, unit, scale


def _format_hybrid_plan(p: dict) -> str:
    model, row = p["model"], p["row_bytes"]
    lines, g, unit, scale = _state_lines(p, f"model {model['preset']} (Nemotron-H hybrid: {model['mamba_layers']} Mamba, "
                               f"{model['attention_layers']} attention, {model['mlp_layers']} MLP layers): "
                               f"{model['num_params']:,} params, vocab {model['vocab_size']:,}; params "
                               f"{model['param_dtype']}, compute {model['dtype']}, SSM state "
                               f"{model['mamba_ssm_cache_dtype']}")
    lines += [f"  rollout state, one row: Mamba conv {row['mamba_conv']:,} B, SSM {row['mamba_ssm']:,} B, "
              f"KV {row['kv']:,} B ({p['slots_per_row']} slots); {p['rollout_rows_per_device']} rows per device",
              "  phases (only the largest counts; they never overlap):"]
    for phase, terms in p["phases_gib"].items():
        detail = ", ".join(f"{k} {v * scale:.2f}" for k, v in terms.items())
        mark = "  <- peak" if phase == p["peak_phase"] else ""
        lines.append(f"    {phase:<26} {g(sum(terms.values()))}   ({detail}){mark}")
    lines.append(f"  peak, lower bound            {g(p['peak_gib'])}")
    lines += [f"warning: {w}" for w in p["warnings"]]
    lines.append("")
    if "fits" not in p:
        lines.append("verdict: unknown — pass --hbm-gib H (memory per device) or --platform.")
    elif p["fits"]:
        lines.append(f"verdict: the lower bound fits — {p['peak_gib'] * scale:.2f} of {p['usable_gib'] * scale:.2f} "
                     f"{unit} usable; the rest of the step is not estimated yet.")
    else:
        lines.append(f"verdict: DOES NOT FIT — even the lower bound {p['peak_gib']:.2f} GiB > {p['usable_gib']:.2f} "
                     f"GiB usable; largest phase: {p['peak_phase']}. Shard over more devices (fsdp for the "
                     "state, data or fsdp for the rollout rows) or raise rlp.rollout_microbatches.")
    return "\n".join(lines)


# ---------------------------------------------------------------- verdict and knobs

def suggest(config, model_config, mesh_shape, usable: float, est: Estimate, suffix_len: int,
            platform: str | None = None) -> str:
    """The knob settings with which the plan fits: for each phase over the limit, the smallest
    change of the knob behind it (batch size first, as the other knobs must divide it)."""
    from rlp_jax import config as config_lib

    devices = math.prod(mesh_shape)
    changes: dict[str, object] = {}

    def trial_estimate(extra):
        trial = config.copy_and_resolve_references()
        for key, value in {**changes, **extra}.items():
            section, leaf = key.split(".")
            trial[section][leaf] = value
        try:
            config_lib.validate_shapes(trial, devices)
        except config_lib.ConfigError:
            return None
        return estimate(trial, model_config.replace(remat=trial.model.remat), mesh_shape, suffix_len, est.state,
                        platform)

    def phase_fits(phase, **extra) -> bool:
        e = trial_estimate({k.replace("__", "."): v for k, v in extra.items()})
        if e is None:
            return False
        base = sum(v for k, v in e.memory.items() if k != "gradients")
        return base + sum(e.phases[phase].values()) <= usable if phase in e.phases else True

    state = sum(est.memory[k] for k in ("params", "ema", "optimizer", "reference"))
    if state + est.memory["gradients"] / 2 > usable:
        return ("the train state alone does not fit: shard parameters over more devices (a larger fsdp "
                "axis in mesh.shape, e.g. all devices on fsdp) or use more devices"
                + (", or set rlp.kl_coef=0 (drops the reference copy)" if config.rlp.kl_coef > 0 else ""))
    over = [p for p in est.phases if not phase_fits(p)]
    advice = []
    B, r = config.train.batch_size, config.rlp
    if {"rollouts", "ema_baseline"} & set(over):
        # Both run over the same rlp.rollout_microbatches chunks of prompts.
        value = next((v for v in range(1, B + 1) if B % v == 0 and phase_fits("rollouts", rlp__rollout_microbatches=v)
                      and phase_fits("ema_baseline", rlp__rollout_microbatches=v)), None)
        if value is None:
            return ("one prompt's rollouts or EMA no-think baseline do not fit: shorten rlp.max_thought_len or "
                    "data.max_context, or shard the batch or the kv heads (tensor axis) over more devices")
        if value != r.rollout_microbatches:
            changes["rlp.rollout_microbatches"] = value
            advice.append(f"set rlp.rollout_microbatches to {value} (fewer prompts per rollout and S_ema chunk)")
    for phase in ("update", "old_logprobs"):
        if phase not in est.phases or phase_fits(phase):
            continue
        remat = config.model.remat
        if remat != "full" and phase_fits(phase, model__remat="full"):
            changes["model.remat"] = "full"
            advice.append("set model.remat='full' (recompute each layer in the backward pass)")
            continue
        for remat in (remat, "full"):
            value = next((v for v in range(1, B // r.num_minibatches + 1)
                          if phase_fits(phase, rlp__grad_accum_steps=v, model__remat=remat)), None)
            if value is not None:
                break
        if value is None:
            return ("even one prompt's G thoughts per update micro-batch do not fit: put more devices on the "
                    "tensor axis (it splits heads, MLP and vocabulary) or shorten rlp.max_thought_len")
        changes["rlp.grad_accum_steps"] = value
        if remat != config.model.remat:
            changes["model.remat"] = remat
        advice.append(f"set rlp.grad_accum_steps to {value}" + (" and model.remat='full'" if remat != config.model.remat
                                                               else "") + " (smaller update micro-batches)")
    if not advice:
        return "shard parameters and batch over more devices"
    final = trial_estimate({})
    text = "; ".join(advice)
    if final is None or final.peak_bytes > usable:
        text += " — and re-run the plan: together these may still not fit"
    return text


# ---------------------------------------------------------------- report

def _fmt_flops(x: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.3g} FLOP"


def _fmt_tokens(x: float) -> str:
    return f"{x / 1e9:,.2f}B" if x >= 1e9 else f"{x / 1e6:,.2f}M" if x >= 1e6 else f"{x:,.0f}"


def plan(config, config_path: str | None = None, devices: int | None = None, hbm_gib: float | None = None,
         platform: str | None = None) -> dict:
    """The plan as a dict (what `rlp-jax plan --json` prints)."""
    from rlp_jax import config as config_lib

    notes: list[str] = []
    platform = platform or _platform_of(config_path)
    if platform is not None and platform not in PLATFORMS:
        raise config_lib.ConfigError(f"platform {platform!r} is unknown; choose one of {', '.join(PLATFORMS)}.")
    config_lib.resolve_batch_tokens(config)
    shape = tuple(int(s) for s in config.mesh.shape)
    if devices is None:
        if -1 in shape:
            raise config_lib.ConfigError(f"mesh.shape {shape} has a -1; pass --devices N to say how many devices.")
        devices = math.prod(shape)
    mesh_shape = config_lib.validate_shapes(config.copy_and_resolve_references(), devices)
    spec = PLATFORMS.get(platform) if platform else None
    if hbm_gib is None and spec is not None:
        hbm_gib = spec.hbm_gib
        if hbm_gib is None and platform == "cpu":
            hbm_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / devices
            notes.append(f"CPU devices share this machine's RAM: {hbm_gib:.2f} GiB per device")
    hybrid = hybrid_model_config(config, notes)
    if hybrid is not None:
        return _hybrid_plan(config, config_path, hybrid, mesh_shape, devices, spec, hbm_gib, notes)
    model_config, tokenizer = model_config_for(config, notes)
    suffix_len = _suffix_len(config, tokenizer)
    est = estimate(config, model_config, mesh_shape, suffix_len, platform=platform)
    out = {"config": config_path, "platform": spec.name if spec else None, "devices": devices,
           "mesh_shape": list(mesh_shape), "mesh_axes": list(config.mesh.axes),
           "model": {"preset": config.model.preset, "num_params": model_config.num_params(),
                     "param_dtype": model_config.param_dtype, "dtype": model_config.dtype,
                     "remat": model_config.remat, "vocab_size": model_config.vocab_size},
           "memory_gib": {k: v / GiB for k, v in est.memory.items()},
           "phases_gib": {p: {k: v / GiB for k, v in terms.items()} for p, terms in est.phases.items()},
           "peak_phase": est.peak_phase, "peak_gib": est.peak_bytes / GiB,
           "flops": est.flops, "flops_total": sum(est.flops.values()), "tokens": est.tokens,
           "warnings": est.warnings, "notes": notes, "hbm_gib": hbm_gib}
    if spec is not None and spec.peak_tflops:
        out["seconds_at_peak"] = out["flops_total"] / (devices * spec.peak_tflops * 1e12)
    if hbm_gib:
        usable = hbm_gib * USABLE_FRACTION
        out["usable_gib"] = usable
        out["fits"] = out["peak_gib"] <= usable
        if not out["fits"]:
            out["knob"] = suggest(config, model_config, mesh_shape, usable * GiB, est, suffix_len, platform)
    return out


def format_plan(p: dict) -> str:
    if p.get("hybrid"):
        return _format_hybrid_plan(p)
    mem, model = p["memory_gib"], p["model"]
    lines, g, unit, scale = _state_lines(p, f"model {model['preset']}: {model['num_params']:,} params, vocab "
                               f"{model['vocab_size']:,}; params {model['param_dtype']}, compute {model['dtype']}, "
                               f"remat {model['remat']}")
    lines += [f"  rollout buffers              {g(mem['buffers'])}",
              "  phases (only the largest counts; they never overlap):"]
    for phase, terms in p["phases_gib"].items():
        detail = ", ".join(f"{k} {v * scale:.2f}" for k, v in terms.items())
        mark = "  <- peak" if phase == p["peak_phase"] else ""
        lines.append(f"    {phase:<26} {g(sum(terms.values()))}   ({detail}){mark}")
    lines.append(f"  peak                         {g(p['peak_gib'])}")
    if "fits" in p:
        lines.append(f"  usable                       {g(p['usable_gib'])}   ({USABLE_FRACTION:.0%} of "
                     f"{p['hbm_gib']:.1f} GiB)")
    lines += ["", "FLOPs per step (model FLOPs; upper bound: full contexts, every thought at its maximum length)"]
    for name, value in p["flops"].items():
        lines.append(f"  {name:<26} {_fmt_flops(value):>14}")
    lines.append(f"  {'total':<26} {_fmt_flops(p['flops_total']):>14}"
                 + (f"   ({p['seconds_at_peak']:.1f} s/step at 100% of peak)" if "seconds_at_peak" in p else ""))
    t = p["tokens"]
    if "t_flop" in t:
        lines.append(f"  sampled thought tokens ≤ {t['thought_tokens']:,.0f} per step")
        lines.append(f"  paper's T_flop = n·l_seq·bs·iters + T_inp = {t['t_flop']:,.0f} tokens per step "
                     f"(T_inp {t['t_inp']:,.0f}), {_fmt_tokens(t['t_flop_run'])} over the run's steps: "
                     "the CPT tokens of equal compute")
    lines += [f"warning: {w}" for w in p["warnings"]]
    lines.append("")
    if "fits" not in p:
        lines.append("verdict: unknown — pass --hbm-gib H (memory per device) or --platform.")
    elif p["fits"]:
        lines.append(f"verdict: FITS — peak {p['peak_gib'] * scale:.2f} of {p['usable_gib'] * scale:.2f} {unit} usable "
                     f"({p['peak_gib'] / p['usable_gib']:.0%}), largest phase: {p['peak_phase']}.")
    else:
        lines.append(f"verdict: DOES NOT FIT — peak {p['peak_gib']:.2f} GiB > {p['usable_gib']:.2f} GiB usable; "
                     f"largest phase: {p['peak_phase']}. Turn: {p['knob']}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="per-device memory, FLOPs and a fits/does-not-fit verdict for a config (no accelerator)",
        description="rlp-jax plan --config configs/X.py [--devices N] [--hbm-gib H] [--config.a.b=value ...]")
    parser.add_argument("--config", required=True, help="config .py with get_config()")
    parser.add_argument("--devices", type=int, default=None, help="device count (default: the mesh's product)")
    parser.add_argument("--hbm-gib", type=float, default=None, help="memory per device in GiB (default: the platform's)")
    parser.add_argument("--platform", default=None, choices=sorted(PLATFORMS),
                        help="hardware (default: the config file's PLATFORM)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    import jax

    jax.config.update("jax_platforms", "cpu")  # shapes only: never claim an accelerator
    from rlp_jax import config as config_lib

    try:
        config = config_lib.load_config(args.config, getattr(args, "overrides", []) or [])
        result = plan(config, args.config, args.devices, args.hbm_gib, args.platform)
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as error:
        print(f"rlp-jax plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0 if result.get("fits", True) else 1
