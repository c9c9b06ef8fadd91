"""`rlp-jax plan` for the Transformer family (rlp_jax.plan runs it for a Qwen3 / Llama model):
per-device memory and FLOPs from shapes alone, and the knob to turn when the plan does not fit.

The train state is sized exactly (plan_common.state_bytes: every leaf's shape, dtype and
`NamedSharding` under the real rules, with `sharding.fit_spec`'s replication of dimensions a mesh
axis does not divide). Everything that lives only inside the jitted step (KV cache, activations,
logits) is an estimate from the formulas below, written for the code as it is (plain XLA
attention that materialises its scores, unless a fused kernel runs). The peak is
`state + rollout buffers + max(phase)`; the phases of a step never overlap:

- rollouts, chunk by chunk (`rlp.rollout_microbatches`): KV cache + the larger of one prefill
  layer and one decode step;
- the EMA no-think baseline S_ema: a forward per rollout chunk (one layer alive at a time);
- old/reference log-probs (only with several updates per batch or β > 0): forward per micro-batch;
- the policy update per grad-accum micro-batch: gradients + activations + thought logits +
  the vocabulary matrices' full copies in the parameter dtype (`VOCAB_COPIES_IN_UPDATE`).

See docs/launch.md for the formulas and the table of configs.
"""

from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path

from rlp_jax import plan_common
from rlp_jax.plan_common import (GiB, USABLE_FRACTION, Ways, abstract_mesh, model_config_for, phase_lines, split_rows,
                                 state_lines, suffix_len)


def shapes_without_files(config, notes: list[str], tokenizer):
    """The model's shapes from `model.preset` when the weights or the tokenizer that
    `build.model_config` needs are not on this machine (said in `notes`)."""
    from rlp_jax.models.transformer_family import FAMILY

    path_ok = config.init.kind == "scratch" or (config.init.path and Path(config.init.path).exists())
    base = FAMILY.preset(config.model.preset)
    vocab = config.model.vocab_size or (tokenizer.vocab_size if tokenizer and config.init.kind == "scratch"
                                        else base.vocab_size)
    if config.init.kind != "scratch" and not path_ok:
        where = f"{config.init.path} is not on this machine" if config.init.path else "init.path is not set"
        notes.append(f"{where}: shapes from model.preset={config.model.preset!r}")
    elif tokenizer is None:
        notes.append(f"tokenizer {config.tokenizer!r} is not here: vocabulary from model.preset ({vocab})")
    model_config = base.replace(vocab_size=vocab, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                                remat=config.model.remat, attention=config.model.attention)
    return model_config


def state_bytes(config, model_config, mesh) -> dict[str, int]:
    """Exact per-device bytes of each part of the train state under the rules of `mesh.rules`."""
    from rlp_jax import build

    return plan_common.state_bytes(config, model_config, mesh, build.rules(config))


# ---------------------------------------------------------------- the estimate

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


# Per vocabulary matrix (the embedding, and the head when it is not tied), the copies of its
# whole vocabulary share that the compiled update holds in the parameter dtype: the forward's
# gather over the batch axes, the backward's gather again, the gradient accumulator (the lookup's
# scatter-add into zeros) and a transposed copy (XLA:GPU's buffer assignment of the 8B step,
# docs/launch.md).
VOCAB_COPIES_IN_UPDATE = 4


def _vocab_copies_bytes(m, w, param_bytes: int) -> float:
    """The update's full-vocabulary copies of the embedding (and untied head) in the parameter
    dtype, split over the vocabulary axis only (`VOCAB_COPIES_IN_UPDATE` per matrix)."""
    matrices = 1 if m.tie_embeddings else 2
    return VOCAB_COPIES_IN_UPDATE * matrices * m.vocab_size // w.vocab * m.hidden_size * param_bytes


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
    ways = Ways(mesh, build.rules(config))
    m = model_config
    r = config.rlp
    b = jnp.dtype(m.dtype).itemsize
    param_bytes = jnp.dtype(m.param_dtype).itemsize
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
        return {"activations": layers * saved + transient, "logits": logits,
                "vocab_copies": _vocab_copies_bytes(m, w, param_bytes)}

    phases: dict[str, dict[str, float]] = {}
    flops: dict[str, float] = {}
    body = 2 * layers * (D * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * D * m.intermediate_size)
    head = 2 * D * V
    attn = 4 * layers * m.num_heads * m.head_dim  # × attended keys, per token

    if r.objective == "ntp":
        S = config.data.seq_len if config.data.kind == "documents" else C + K
        rows = split_rows(B // micro, w.batch, warnings, "NTP micro-batch")
        phases["update"] = {"gradients": memory["gradients"], **update_activations(rows, S - 1, S - 1)}
        fwd = B * ((S - 1) * (body + head) + attn * (S - 1) ** 2 / 2)
        flops["update (fwd + bwd)"] = 3 * fwd * r.ppo_epochs
        tokens = {"trained": float(B * (S - 1))}
        buffers = 0.0
    else:
        block = r.get("cache_block_len", 256)
        S_suffix, S = -(-(L + 1 + K) // block) * block, P + L
        chunk = B // r.rollout_microbatches
        prow = split_rows(chunk, w.batch, warnings, "rollout prefill (prompts per chunk)")
        crow = split_rows(chunk * G, w.batch, warnings, "rollout chunk")
        kv_token = layers * (m.num_kv_heads // w.kv) * m.head_dim * 2 * b  # keys + values, one token
        # The rollout cache: each prompt's keys and values once, each row's own suffix blocks;
        # the rollout's own weights; then the larger of a prefill layer and one decode step's
        # logits (compute dtype, 3 float32 copies for sampling) and attention scores.
        prefill = _forward_layer_bytes(prow, P, m, w, b, fused)
        decode = crow * (Vd * (b + 12) + (m.num_heads // w.heads) * (P + S_suffix) * (8 + b))
        phases["rollouts"] = {"kv_prefix": prow * P * kv_token, "kv_suffix": crow * S_suffix * kv_token,
                              "decode_weights": _decode_weight_bytes(m, w, b),
                              "prefill_or_decode": max(prefill, decode)}
        erow = split_rows(chunk, w.batch, warnings, "EMA baseline chunk")
        phases["ema_baseline"] = {"forward": _forward_layer_bytes(erow, C + K, m, w, b, fused)}
        urow = split_rows(B // micro * G, w.batch, warnings, "update micro-batch")
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


def plan(config, config_path, mesh_shape, devices: int, spec, hbm_gib: float | None, platform: str | None,
         notes: list[str]) -> dict:
    """The plan as a dict (what `rlp-jax plan --json` prints) on `devices` devices of `spec`
    (a plan_common.Platform, or None) with `hbm_gib` per device (None: unknown)."""
    model_config, tokenizer = model_config_for(config, notes, shapes_without_files)
    suffix = suffix_len(config, tokenizer)
    est = estimate(config, model_config, mesh_shape, suffix, platform=platform)
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
            out["knob"] = suggest(config, model_config, mesh_shape, usable * GiB, est, suffix, platform)
    return out


def format_plan(p: dict) -> str:
    """The plan as `rlp-jax plan` prints it."""
    mem, model = p["memory_gib"], p["model"]
    lines, g, unit, scale = state_lines(p, f"model {model['preset']}: {model['num_params']:,} params, vocab "
                               f"{model['vocab_size']:,}; params {model['param_dtype']}, compute {model['dtype']}, "
                               f"remat {model['remat']}")
    lines += [f"  rollout buffers              {g(mem['buffers'])}",
              "  phases (only the largest counts; they never overlap):"]
    lines += phase_lines(p, g, scale)
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


def check_memory(config, model_config, mesh_shape, suffix: int, usable: float, what: str, platform: str) -> str:
    """preflight's check: refuses (ConfigError) a config whose estimated peak exceeds `usable`
    bytes per device (`what`: where that number comes from); returns a one-line note of it."""
    from rlp_jax.config import ConfigError

    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    est = estimate(config, model_config, mesh_shape, suffix, platform=platform)
    if est.peak_bytes > usable:
        knob = suggest(config, model_config, mesh_shape, usable, est, suffix, platform)
        raise ConfigError(
            f"this config needs about {gib(est.peak_bytes)} per device at its largest phase ({est.peak_phase}) "
            f"but {gib(usable)} is usable ({what}); {knob}, or pass --config.train.check_memory=False "
            "to start anyway.")
    return f"memory: about {gib(est.peak_bytes)} per device at the peak ({est.peak_phase}) of {gib(usable)} usable"
