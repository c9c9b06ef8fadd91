"""Mamba-2 mixer pieces as pure functions (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060).

The selective state-space recurrence of one head h (state `[P, N]`, eq. 2 of the paper with the
scalar-times-identity A of Mamba-2, §3.1):

    h_t = exp(Δ_t · A) · h_{t−1} + Δ_t · x_t ⊗ B_t          y_t = h_t · C_t + D · x_t

with Δ_t = clamp(softplus(dt_t + dt_bias), time_step_limit) and A = −exp(A_log). Heads share B and C
within groups (head h reads group h // (heads / groups)). `ssd_chunked` evaluates it with the
chunked "state-space duality" algorithm (§6: quadratic attention-like form inside each chunk,
the recurrence across chunk boundaries only); `ssd_recurrent` is the token-by-token reference and
`ssm_step` the one-token decode update. Shapes: B batch, T tokens, H ssm heads, P head channels,
G groups, N state size, K conv width.

The rest of the mixer (input projections, depthwise causal conv, gated grouped RMSNorm, output
projection) lives in `mamba_mixer` and `mamba_extend`; the weights are a dict (see
`MAMBA_AXES` for names, shapes and logical axes). Everything runs in float32 inside the scan, as
transformers' reference path does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rlp_jax.sharding import constrain

Array = jax.Array

# Logical axes of one Mamba-2 mixer's weights, each stacked over a leading `layers` axis.
MAMBA_AXES = {
    "norm": ("layers", "norm"),  # the block's pre-norm [D]
    "in_z": ("layers", "embed", "ssm_heads", "ssm_head_dim"),  # gate z [D, H, P]
    "in_x": ("layers", "embed", "ssm_heads", "ssm_head_dim"),  # x [D, H, P]
    "in_B": ("layers", "embed", "ssm_groups", "ssm_state"),  # B [D, G, N]
    "in_C": ("layers", "embed", "ssm_groups", "ssm_state"),  # C [D, G, N]
    "in_dt": ("layers", "embed", "ssm_heads"),  # dt [D, H]
    "conv_x": ("layers", None, "ssm_heads", "ssm_head_dim"),  # depthwise taps [K, H, P]
    "conv_B": ("layers", None, "ssm_groups", "ssm_state"),  # [K, G, N]
    "conv_C": ("layers", None, "ssm_groups", "ssm_state"),  # [K, G, N]
    "conv_x_bias": ("layers", "ssm_heads", "ssm_head_dim"),  # [H, P] (when use_conv_bias)
    "conv_B_bias": ("layers", "ssm_groups", "ssm_state"),  # [G, N]
    "conv_C_bias": ("layers", "ssm_groups", "ssm_state"),  # [G, N]
    "dt_bias": ("layers", "ssm_heads"),  # [H]
    "A_log": ("layers", "ssm_heads"),  # [H]
    "D": ("layers", "ssm_heads"),  # [H]
    "gate_norm": ("layers", "ssm_heads", "ssm_head_dim"),  # gated RMSNorm scale [H, P]
    "out": ("layers", "ssm_heads", "ssm_head_dim", "embed"),  # [H, P, D]
}

# Logical axes of one Mamba layer's decode state: conv histories [B, K−1, ...] and the SSM state.
CONV_STATE_AXES = {"x": ("batch", None, "ssm_heads", "ssm_head_dim"),
                   "B": ("batch", None, "ssm_groups", "ssm_state"),
                   "C": ("batch", None, "ssm_groups", "ssm_state")}
SSM_STATE_AXES = ("batch", "ssm_heads", "ssm_head_dim", "ssm_state")


def mamba_shapes(num_layers: int, D: int, H: int, P: int, G: int, N: int, K: int,
                 conv_bias: bool) -> dict[str, tuple[int, ...]]:
    Z = num_layers
    shapes = {"norm": (Z, D), "in_z": (Z, D, H, P), "in_x": (Z, D, H, P), "in_B": (Z, D, G, N),
              "in_C": (Z, D, G, N), "in_dt": (Z, D, H), "conv_x": (Z, K, H, P), "conv_B": (Z, K, G, N),
              "conv_C": (Z, K, G, N), "dt_bias": (Z, H), "A_log": (Z, H), "D": (Z, H),
              "gate_norm": (Z, H, P), "out": (Z, H, P, D)}
    if conv_bias:
        shapes |= {"conv_x_bias": (Z, H, P), "conv_B_bias": (Z, G, N), "conv_C_bias": (Z, G, N)}
    return shapes


# ---------------------------------------------------------------- discretisation

def time_step(dt_raw_BxTxH: Array, dt_bias_H: Array, limit: tuple[float, float]) -> Array:
    """Δ = clamp(softplus(dt + dt_bias), *limit) in float32 (Mamba-2 §7.3), with the config's
    `time_step_limit` as NVIDIA's Nemotron-H code and transformers >= 5.25 use it."""
    dt = jax.nn.softplus(dt_raw_BxTxH.astype(jnp.float32) + dt_bias_H.astype(jnp.float32))
    return jnp.clip(dt, limit[0], limit[1])


# ---------------------------------------------------------------- the SSM: chunked, recurrent, one step

def _heads_to_groups(a: Array, G: int) -> Array:
    """`[..., H, ...rest]` at axis 2 → `[..., G, H/G, ...rest]` (head h in group h // (H/G))."""
    return a.reshape(*a.shape[:2], G, a.shape[2] // G, *a.shape[3:])


def ssd_chunked(x_BxTxHxP: Array, dt_BxTxH: Array, A_H: Array, B_BxTxGxN: Array, C_BxTxGxN: Array,
                chunk_size: int, initial_state_BxHxPxN: Array | None = None) -> tuple[Array, Array]:
    """The selective SSM over T tokens by the chunked SSD algorithm (Mamba-2 §6, "Listing 1"):
    within each chunk of `chunk_size` tokens the output is the masked quadratic form
    `y_l = Σ_{s≤l} (C_l·B_s) exp(Σ_{k=s+1..l} Δ_k A) Δ_s x_s`; chunk-final states are carried across
    chunks by the recurrence and read out by C. Returns `y_BxTxHxP` (without the D skip) and the
    state after the last token `[B, H, P, N]`, both float32. A token with Δ = 0 and x = 0 leaves
    the state unchanged (how padding is skipped)."""
    Bsz, T, H, P = x_BxTxHxP.shape
    G, N = B_BxTxGxN.shape[2:]
    L = chunk_size
    pad = (-T) % L
    nc = (T + pad) // L
    f32 = jnp.float32
    dt = dt_BxTxH.astype(f32)
    u = x_BxTxHxP.astype(f32) * dt[..., None]  # Δ_s x_s
    a = dt * A_H.astype(f32)  # Δ_t A ≤ 0

    def chunks(v):  # [B, T, ...] → [B, nc, L, ...], zero-padded (zero Δ and input: no effect)
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(Bsz, nc, L, *v.shape[2:])

    R = H // G
    u = chunks(u).reshape(Bsz, nc, L, G, R, P)
    a = chunks(a).reshape(Bsz, nc, L, G, R)
    Bc = chunks(B_BxTxGxN.astype(f32))
    Cc = chunks(C_BxTxGxN.astype(f32))

    # Segment sums seg[l, s] = Σ_{k=s+1..l} a_k (l ≥ s), by a cumulative sum of masked values
    # rather than a difference of prefix sums (which loses precision when the sums grow).
    a_t = jnp.moveaxis(a, 2, -1)  # [B, nc, G, R, L]
    strictly_below = jnp.tril(jnp.ones((L, L), bool), -1)  # [k, s]: k > s
    seg = jnp.cumsum(jnp.where(strictly_below, a_t[..., :, None], 0.0), axis=-2)  # [.., l, s]
    causal = jnp.tril(jnp.ones((L, L), bool))
    decay = jnp.where(causal, jnp.exp(jnp.where(causal, seg, 0.0)), 0.0)  # [B, nc, G, R, l, s]

    # 1. Within each chunk (the diagonal blocks).
    CB = jnp.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y_diag = jnp.einsum("bcgls,bcgrls,bcsgrp->bclgrp", CB, decay, u)
    # 2. Each chunk's own final state: decay from s to the chunk's last token.
    states = jnp.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", Bc, decay[..., L - 1, :], u)
    # 3. The recurrence across chunks: the state entering chunk c.
    chunk_decay = jnp.exp(jnp.sum(a, axis=2))  # [B, nc, G, R]
    if initial_state_BxHxPxN is None:
        h0 = jnp.zeros((Bsz, G, R, P, N), f32)
    else:
        h0 = initial_state_BxHxPxN.astype(f32).reshape(Bsz, G, R, P, N)

    def across(h, inputs):
        decay_c, state_c = inputs
        return decay_c[..., None, None] * h + state_c, h

    final, entering = jax.lax.scan(across, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1)  # [B, nc, G, R, P, N]
    # 4. The entering state read out at each token, decayed through tokens 0 … l of the chunk.
    decay_in = jnp.exp(jnp.cumsum(a, axis=2))  # [B, nc, L, G, R]
    y_off = jnp.einsum("bclgn,bcgrpn,bclgr->bclgrp", Cc, entering, decay_in)
    y = (y_diag + y_off).reshape(Bsz, nc * L, H, P)[:, :T]
    return y, final.reshape(Bsz, H, P, N)


def ssm_step(state_BxHxPxN: Array, x_BxHxP: Array, dt_BxH: Array, A_H: Array, B_BxGxN: Array,
             C_BxGxN: Array) -> tuple[Array, Array]:
    """One token of the recurrence `h ← exp(ΔA) h + Δ x ⊗ B`, `y = h · C` (no D skip), float32;
    returns `(y_BxHxP, new_state)`."""
    f32 = jnp.float32
    Bsz, H, P = x_BxHxP.shape
    G = B_BxGxN.shape[1]
    R = H // G
    dt = dt_BxH.astype(f32)
    h = state_BxHxPxN.astype(f32).reshape(Bsz, G, R, P, -1)
    dA = jnp.exp(dt * A_H.astype(f32)).reshape(Bsz, G, R)
    u = (x_BxHxP.astype(f32) * dt[..., None]).reshape(Bsz, G, R, P)
    h = dA[..., None, None] * h + u[..., None] * B_BxGxN.astype(f32)[:, :, None, None, :]
    # The readout as a multiply-and-sum, not a dot: XLA then makes the update and the readout one
    # fusion that reads the old state once and writes the new one in place; with a dot it
    # recomputes the update for the dot's operand, reads the old state twice and copies it at
    # every decode step.
    y = (h * C_BxGxN.astype(f32)[:, :, None, None, :]).sum(-1)
    return y.reshape(Bsz, H, P), h.reshape(Bsz, H, P, -1)


def ssd_recurrent(x_BxTxHxP: Array, dt_BxTxH: Array, A_H: Array, B_BxTxGxN: Array, C_BxTxGxN: Array,
                  initial_state_BxHxPxN: Array | None = None) -> tuple[Array, Array]:
    """The same SSM token by token (`ssm_step` scanned over T): the reference for `ssd_chunked`."""
    Bsz, T, H, P = x_BxTxHxP.shape
    N = B_BxTxGxN.shape[-1]
    h0 = (jnp.zeros((Bsz, H, P, N), jnp.float32) if initial_state_BxHxPxN is None
          else initial_state_BxHxPxN.astype(jnp.float32))

    def step(h, inputs):
        y, h = ssm_step(h, *inputs[:2], A_H, *inputs[2:])
        return h, y

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (x_BxTxHxP, dt_BxTxH, B_BxTxGxN, C_BxTxGxN))
    final, ys = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(ys, 0, 1), final


# ---------------------------------------------------------------- depthwise causal conv

def causal_conv(x_BxTxC: Array, taps_KxC: Array, bias_C: Array | None,
                history_BxKm1xC: Array | None = None) -> Array:
    """Depthwise causal convolution over T (any trailing channel shape): `out_t = bias + Σ_k
    taps[k] · x_{t−K+1+k}`, with the K−1 inputs before the first token taken from `history` (zeros
    when None). No activation."""
    K = taps_KxC.shape[0]
    T = x_BxTxC.shape[1]
    if history_BxKm1xC is None:
        history_BxKm1xC = jnp.zeros((x_BxTxC.shape[0], K - 1, *x_BxTxC.shape[2:]), x_BxTxC.dtype)
    padded = jnp.concatenate([history_BxKm1xC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    out = sum(taps_KxC[k] * padded[:, k:k + T] for k in range(K))
    return out if bias_C is None else out + bias_C


def conv_history(x_BxTxC: Array, lengths_B: Array, K: int, history_BxKm1xC: Array | None = None) -> Array:
    """The K−1 conv inputs before position `lengths_B[b]` of each row (the conv state after its
    last real token; earlier history or zeros where the row is shorter than K−1)."""
    if history_BxKm1xC is None:
        history_BxKm1xC = jnp.zeros((x_BxTxC.shape[0], K - 1, *x_BxTxC.shape[2:]), x_BxTxC.dtype)
    padded = jnp.concatenate([history_BxKm1xC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    index_BxKm1 = lengths_B[:, None] + jnp.arange(K - 1)[None, :]
    return jnp.take_along_axis(padded, index_BxKm1.reshape(*index_BxKm1.shape, *(1,) * (x_BxTxC.ndim - 2)),
                               axis=1)


# ---------------------------------------------------------------- the mixer

def gated_rms_norm(y_BxTxHxP: Array, z_BxTxHxP: Array, scale_HxP: Array, n_groups: int, eps: float) -> Array:
    """`scale · RMSNorm_g(y · silu(z))` with the statistics over each of `n_groups` contiguous
    blocks of the H·P channels (Mamba-2 §7.4 "norm after gating"; transformers
    NemotronHRMSNormGated), in float32."""
    f32 = jnp.float32
    g = y_BxTxHxP.astype(f32) * jax.nn.silu(z_BxTxHxP.astype(f32))
    shape = g.shape
    g = g.reshape(*shape[:-2], n_groups, -1)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    return scale_HxP.astype(f32) * g.reshape(shape)


def _project_in(h_BxTxD: Array, w: dict[str, Any]):
    z = jnp.einsum("btd,dhp->bthp", h_BxTxD, w["in_z"])
    x = jnp.einsum("btd,dhp->bthp", h_BxTxD, w["in_x"])
    Bm = jnp.einsum("btd,dgn->btgn", h_BxTxD, w["in_B"])
    Cm = jnp.einsum("btd,dgn->btgn", h_BxTxD, w["in_C"])
    dt = jnp.einsum("btd,dh->bth", h_BxTxD, w["in_dt"])
    heads = ("batch", "length", "ssm_heads", None)
    return constrain(z, heads), constrain(x, heads), Bm, Cm, constrain(dt, ("batch", "length", "ssm_heads"))


def _project_out(y_BxTxHxP: Array, w: dict[str, Any], dtype) -> Array:
    out = jnp.einsum("bthp,hpd->btd", y_BxTxHxP.astype(dtype), w["out"])
    return constrain(out, ("batch", "length", None))


def _mask(v: Array, valid_BxT: Array | None) -> Array:
    if valid_BxT is None:
        return v
    return v * valid_BxT.reshape(*valid_BxT.shape, *(1,) * (v.ndim - 2)).astype(v.dtype)


def mamba_mixer(h_BxTxD: Array, w: dict[str, Any], c, valid_BxT: Array | None = None,
                lengths_B: Array | None = None):
    """The Mamba-2 mixer over T tokens (the block's pre-norm already applied): in-projections,
    depthwise causal conv + SiLU on x, B, C, the chunked SSD scan with the D skip, gated RMSNorm,
    out-projection. Returns `(out_BxTxD, state)`; `state` is None unless `lengths_B` is given,
    then `({'x','B','C'} conv histories [B, K−1, …], ssm state [B, H, P, N] float32)` after each
    row's first `lengths_B` tokens (right padding).

    Tokens with `valid_BxT == False` are zeroed before the in-projection and after the conv (as
    transformers does with its attention mask) and get Δ = 0, so they leave the SSM state seen by
    later tokens unchanged. `c` is a NemotronHConfig (conv width, groups, chunk size, Δ limits, ε).
    """
    dtype = h_BxTxD.dtype
    h_BxTxD = _mask(h_BxTxD, valid_BxT)
    z, x, Bm, Cm, dt_raw = _project_in(h_BxTxD, w)
    bias = lambda name: w.get(name)
    streams = {"x": x, "B": Bm, "C": Cm}
    conved = {k: _mask(jax.nn.silu(causal_conv(v, w["conv_" + k], bias(f"conv_{k}_bias"))), valid_BxT)
              for k, v in streams.items()}
    dt = time_step(dt_raw, w["dt_bias"], c.time_step_limit)
    dt = _mask(dt, valid_BxT)
    A = -jnp.exp(w["A_log"].astype(jnp.float32))
    y, final = ssd_chunked(conved["x"], dt, A, conved["B"], conved["C"], c.chunk_size)
    y = y + w["D"].astype(jnp.float32)[:, None] * conved["x"].astype(jnp.float32)
    y = gated_rms_norm(y, z, w["gate_norm"], c.n_groups, c.layer_norm_epsilon)
    out = _project_out(y, w, dtype)
    if lengths_B is None:
        return out, None
    history = {k: conv_history(v, lengths_B, c.conv_kernel) for k, v in streams.items()}
    return out, (history, final)


def mamba_extend(h_BxTxD: Array, w: dict[str, Any], c, conv_state: dict[str, Array], ssm_state_BxHxPxN: Array,
                 advance_B: Array | None = None):
    """T tokens of the mixer continued from its recurrent state (T = 1: one decode step): the conv
    over the K−1 remembered inputs and the new ones, then the recurrence (`ssm_step`, scanned over
    T when T > 1). Returns `(out_BxTxD, new conv state, new ssm state)`, the conv state the last
    K−1 inputs in its own dtype, the ssm state in its own dtype. Δ is clamped as in `mamba_mixer`,
    so this continues the forward exactly; transformers' one-token path skips the clamp (the two
    differ only for a config whose `time_step_limit` is narrower than the default (0, ∞))."""
    dtype = h_BxTxD.dtype
    T = h_BxTxD.shape[1]
    z, x, Bm, Cm, dt_raw = _project_in(h_BxTxD, w)
    conved, new_conv = {}, {}
    for k, v in {"x": x, "B": Bm, "C": Cm}.items():
        history = conv_state[k].astype(v.dtype)
        conved[k] = jax.nn.silu(causal_conv(v, w["conv_" + k], w.get(f"conv_{k}_bias"), history))
        new_conv[k] = jnp.concatenate([history, v], axis=1)[:, T:].astype(conv_state[k].dtype)
    dt = time_step(dt_raw, w["dt_bias"], c.time_step_limit)
    if advance_B is not None:
        # Rows not advanced: Δ = 0 and no input leave the SSM state exactly as it was (exp(0·A) = 1),
        # and the conv history keeps its last K−1 inputs. Masking the inputs, not selecting between
        # old and new states, lets XLA update the state in place.
        dt = jnp.where(advance_B[:, None, None], dt, 0.0)
        new_conv = {k: jnp.where(advance_B.reshape((-1,) + (1,) * (v.ndim - 1)), v, conv_state[k])
                    for k, v in new_conv.items()}
    A = -jnp.exp(w["A_log"].astype(jnp.float32))
    if T == 1:
        y, h = ssm_step(ssm_state_BxHxPxN, conved["x"][:, 0], dt[:, 0], A, conved["B"][:, 0], conved["C"][:, 0])
        y = y[:, None]
    else:
        y, h = ssd_recurrent(conved["x"], dt, A, conved["B"], conved["C"], ssm_state_BxHxPxN)
    y = y + w["D"].astype(jnp.float32)[:, None] * conved["x"].astype(jnp.float32)
    y = gated_rms_norm(y, z, w["gate_norm"], c.n_groups, c.layer_norm_epsilon)
    return _project_out(y, w, dtype), new_conv, h.astype(ssm_state_BxHxPxN.dtype)
