"""`rlp-jax plan` for the Nemotron-H hybrid family (rlp_jax.plan runs it for a Nemotron
`model.preset`, or a Nemotron folder or run at `init.path`): the exact train state plus the
rollout cache (per row its Mamba conv and SSM states and suffix keys and values, each prompt's
keys once) and the sampler's weight copy. A lower
bound: the hybrid step's activations, logits and FLOPs are not estimated yet (docs/models.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rlp_jax import plan_common
from rlp_jax.plan_common import (GiB, USABLE_FRACTION, Ways, abstract_mesh, phase_lines, split_rows, state_lines,
                                 suffix_len)


def hybrid_config(config, notes: list[str]):
    """The NemotronHConfig when the config's model is the Nemotron-H hybrid (a Nemotron HF or params
    folder or run at `init.path`, or a Nemotron `model.preset` when that folder is not here), else
    None. Dtypes come from `model`; the vocabulary is `model.vocab_size` or the model's own."""
    from rlp_jax.models.nemotron_h_family import FAMILY

    overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                     attention=config.model.attention)
    kind, path = config.init.kind, config.init.path
    here = kind != "scratch" and bool(path) and Path(path).exists()
    try:
        if here and kind == "hf" and (Path(path) / "config.json").exists():
            hf_json = json.loads((Path(path) / "config.json").read_text())
            if hf_json.get("model_type") in FAMILY.hf_model_types:
                return FAMILY.config_from_hf(hf_json, **overrides)
        saved = Path(path) / "model_config.json"  # of a params folder, or of a run directory
        if here and kind in ("params", "checkpoint") and saved.exists():
            fields = json.loads(saved.read_text())
            if fields.get("family") in FAMILY.json_tags:
                return FAMILY.config_from_fields(fields).replace(**overrides)
    except ValueError as error:  # HFFormatError, bad JSON: one sentence
        raise ValueError(f"{path}: {error}") from None
    if config.model.preset not in FAMILY.presets or here:
        return None
    if kind != "scratch":
        where = f"{path} is not on this machine" if path else "init.path is not set"
        notes.append(f"{where}: shapes from model.preset={config.model.preset!r}")
    base = FAMILY.preset(config.model.preset)
    if not config.model.vocab_size:
        notes.append(f"vocabulary {base.vocab_size:,}: the preset's own (set model.vocab_size for another)")
    return base.replace(vocab_size=config.model.vocab_size or base.vocab_size, **overrides)


def shapes_without_files(config, notes: list[str], tokenizer):
    """`hybrid_config` for plan_common.model_config_for (the hybrid's vocabulary is its own, not
    the tokenizer's, unless `model.vocab_size` says otherwise)."""
    return hybrid_config(config, notes)


def rules(config):
    """`mesh.rules` plus the Mamba axes of DEFAULT_RULES that it does not name."""
    from rlp_jax import build, sharding

    given = tuple(build.rules(config))
    named = {logical for logical, _ in given}
    return given + tuple(rule for rule in sharding.DEFAULT_RULES if rule[0] not in named)


def state_bytes(config, model_config, mesh) -> dict[str, int]:
    """Exact per-device bytes of each part of the hybrid's train state under `rules(config)`."""
    return plan_common.state_bytes(config, model_config, mesh, rules(config))


def row_bytes(m, ways, suffix_slots: int) -> dict[str, int]:
    """Per-device bytes of ONE rollout row's own part of the hybrid's rollout cache
    (rlp_jax.models.nemotron_h_decode.HybridCache): per Mamba layer the K−1 last conv inputs of x
    (Hm·P channels) and of B and C (G·N each) in the compute dtype and the SSM state [Hm, P, N] in
    `mamba_ssm_cache_dtype`; per attention layer the keys and values of its `suffix_slots` suffix
    slots in the compute dtype. `ways(logical, size)`: how many ways the rules split that dimension."""
    import jax.numpy as jnp

    b, bc = jnp.dtype(m.dtype).itemsize, jnp.dtype(m.mamba_ssm_cache_dtype).itemsize
    Hm = m.mamba_num_heads // ways("ssm_heads", m.mamba_num_heads)
    P = m.mamba_head_dim // ways("ssm_head_dim", m.mamba_head_dim)
    G = m.n_groups // ways("ssm_groups", m.n_groups)
    N = m.ssm_state_size // ways("ssm_state", m.ssm_state_size)
    Lm = m.count("mamba")
    return {"mamba_conv": Lm * (m.conv_kernel - 1) * (Hm * P + 2 * G * N) * b,
            "mamba_ssm": Lm * Hm * P * N * bc,
            "kv_suffix": suffix_slots * kv_token_bytes(m, ways)}


def kv_token_bytes(m, ways) -> int:
    """Per-device bytes of one token's keys and values over all attention layers (compute dtype)."""
    import jax.numpy as jnp

    J = m.num_kv_heads // ways("kv_heads", m.num_kv_heads)
    H = m.head_dim // ways("head_dim", m.head_dim)
    return 2 * m.count("attention") * J * H * jnp.dtype(m.dtype).itemsize


def decode_weight_bytes(m, ways) -> int:
    """The rollout's own copy of the weights (nemotron_h_decode.decode_weights): every weight but
    the embedding table, in the compute dtype (the Mamba A_log, D, dt_bias in float32), split over
    the tensor axes only (not over `embed`, the fsdp axis: gathered once per rollout)."""
    import jax.numpy as jnp

    from rlp_jax.models import nemotron_h as nh

    b, total = jnp.dtype(m.dtype).itemsize, 0
    for block_type in nh.BLOCK_TYPES:
        if not m.count(block_type):
            continue
        for name, shape in nh.block_shapes(m, block_type).items():
            size = 1
            for axis, n in zip(nh.AXES[block_type][name], shape):
                size *= n if axis in (None, "layers", "embed") else n // ways(axis, n)
            total += size * (4 if name in nh.FLOAT32_WEIGHTS else b)
    return total + m.hidden_size * (m.vocab_size // ways("vocab", m.vocab_size)) * b + m.hidden_size * b


@dataclasses.dataclass
class HybridEstimate:
    memory: dict[str, float]  # bytes per device: the train state's parts and the gradients
    phases: dict[str, dict[str, float]]  # phase → its terms (bytes per device), of those estimated
    peak_phase: str
    peak_bytes: float  # a lower bound: activations, logits and the rollout's other buffers not counted
    row_bytes: dict[str, int]  # one rollout row's own part of the rollout cache (`row_bytes`)
    rows: int  # rollout rows per device (one chunk of prompts × G)
    slots: int  # attention suffix slots per row (its blocks); each prompt's P slots are kept once
    warnings: list[str]
    state: dict[str, int]


def estimate(config, model_config, mesh_shape, suffix_len: int = 0, state: dict | None = None) -> HybridEstimate:
    """What `rlp-jax plan` can say of the hybrid (its step's activations are not modelled yet): the
    exact train state (`state_bytes`), the gradients, and the rollout cache of one chunk of
    `train.batch_size / rlp.rollout_microbatches` prompts × G rows: each prompt's P attention slots
    once, each row's Mamba state and its suffix blocks (thought, </think>, targets), and the
    rollout's own copy of the weights."""
    mesh = abstract_mesh(mesh_shape, config.mesh.axes)
    ways = Ways(mesh, rules(config))
    r, warnings = config.rlp, []
    m = model_config
    P = config.data.max_context + suffix_len + 1
    suffix = r.max_thought_len + 1 + config.data.target_len
    block = min(r.get("cache_block_len", 256), suffix)  # as the sampler sizes its blocks
    slots = -(-suffix // block) * block
    row = row_bytes(m, ways, slots)
    chunk = config.train.batch_size // r.rollout_microbatches
    batch_ways = ways("batch", math.prod(mesh.shape.values()))
    prompts = split_rows(chunk, batch_ways, warnings, "rollout prefill (prompts per chunk)")
    rows = split_rows(chunk * r.num_rollouts, batch_ways, warnings, "rollout chunk")
    state = state_bytes(config, m, mesh) if state is None else state
    memory = {k: float(v) for k, v in state.items()}
    memory["gradients"] = 2.0 * state["params"]
    phases = {"rollouts": {**{k: float(rows * v) for k, v in row.items()},
                           "kv_prefix": float(prompts * P * kv_token_bytes(m, ways)),
                           "decode_weights": float(decode_weight_bytes(m, ways))},
              "update": {"gradients": memory["gradients"]},
              "optimizer_apply": {"gradients": memory["gradients"] / 2,
                                  "new_state": memory["params"] + memory["ema"] + memory["optimizer"]}}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    peak_phase = max(totals, key=totals.get)
    base = sum(v for k, v in memory.items() if k != "gradients")
    return HybridEstimate(memory, phases, peak_phase, base + totals[peak_phase], row, rows, slots, warnings, state)


def plan(config, config_path, mesh_shape, devices: int, spec, hbm_gib: float | None, platform: str | None,
         notes: list[str]) -> dict:
    """The plan as a dict (what `rlp-jax plan --json` prints) on `devices` devices of `spec`
    (a plan_common.Platform, or None) with `hbm_gib` per device (None: unknown); `platform` does
    not change the lower bound."""
    from rlp_jax import build
    from rlp_jax.config import ConfigError
    from rlp_jax.models.nemotron_h_family import FAMILY

    model_config = hybrid_config(config, notes)
    try:
        tokenizer = build.tokenizer(config)
    except ConfigError:
        tokenizer = None
    est = estimate(config, model_config, mesh_shape, suffix_len(config, tokenizer))
    m = model_config
    path = config.init.path
    from_folder = config.init.kind in ("hf", "params") and bool(path) and Path(path).exists()
    notes.append("the Nemotron-H hybrid's activations, logits and FLOPs in the RLP step are not estimated yet, "
                 "so the peak is a lower bound")
    out = {"config": config_path, "platform": spec.name if spec else None, "devices": devices,
           "mesh_shape": list(mesh_shape), "mesh_axes": list(config.mesh.axes), "hybrid": True,
           "model": {"preset": path if from_folder else config.model.preset, "family": FAMILY.json_tag(m),
                     "num_params": m.num_params(),
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


def format_plan(p: dict) -> str:
    """The plan as `rlp-jax plan` prints it."""
    model, row = p["model"], p["row_bytes"]
    lines, g, unit, scale = state_lines(p, f"model {model['preset']} (Nemotron-H hybrid: {model['mamba_layers']} Mamba, "
                               f"{model['attention_layers']} attention, {model['mlp_layers']} MLP layers): "
                               f"{model['num_params']:,} params, vocab {model['vocab_size']:,}; params "
                               f"{model['param_dtype']}, compute {model['dtype']}, SSM state "
                               f"{model['mamba_ssm_cache_dtype']}")
    lines += [f"  rollout cache, one row: Mamba conv {row['mamba_conv']:,} B, SSM {row['mamba_ssm']:,} B, "
              f"KV {row['kv_suffix']:,} B ({p['slots_per_row']} suffix slots; each prompt's keys once); "
              f"{p['rollout_rows_per_device']} rows per device",
              "  phases (only the largest counts; they never overlap):"]
    lines += phase_lines(p, g, scale)
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


def check_memory(config, model_config, mesh_shape, suffix: int, usable: float, what: str, platform: str) -> str:
    """preflight's check: refuses (ConfigError) a config whose lower bound exceeds `usable` bytes
    per device (`what`: where that number comes from); returns a one-line note of it."""
    from rlp_jax.config import ConfigError

    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    est = estimate(config, model_config, mesh_shape, suffix)
    if est.peak_bytes > usable:
        raise ConfigError(
            f"this config needs at least {gib(est.peak_bytes)} per device ({est.peak_phase}) but {gib(usable)} "
            f"is usable ({what}); shard over more devices or lower train.batch_size / raise "
            "rlp.rollout_microbatches, or pass --config.train.check_memory=False to start anyway.")
    return (f"memory: at least {gib(est.peak_bytes)} per device at the peak ({est.peak_phase}) of {gib(usable)} "
            "usable (the hybrid's activations are not estimated)")
