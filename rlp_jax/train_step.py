"""ONE pure function `(state, batch) -> (state, metrics)`: Algorithm 1 of the RLP paper.

1. θ_old ← θ: this step's params sample G thoughts per prompt (rollouts.sample_and_score), and the
   true next token(s) are scored after each thought on the rollout cache (S_pred).
2. φ ← θ on the very first step (lazy EMA init), then the EMA scores the targets with no thought
   (S_ema).
3. Rewards (eq. 5, or the RPT-style match), group-relative advantages (eq. 7).
4. Clipped-surrogate updates of the thought tokens only (eq. 8) (+ β·KL to a frozen reference),
   `ppo_epochs × num_minibatches` optimizer steps per rollout batch, each accumulated over
   `grad_accum_steps` micro-batches; φ ← τφ + (1−τ)θ after every optimizer step.
The objective `ntp` (continued pretraining on the same documents) runs through the same state,
batch and metrics. See docs/train_step.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from rlp_jax import losses, rollouts, sharding
from rlp_jax.rollouts import RolloutConfig

Array = jax.Array
Objective = Literal["rlp", "rpt", "ntp"]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    rollout: RolloutConfig
    objective: Objective = "rlp"
    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0  # β; the paper's default is 0
    kl_estimator: losses.KLEstimator = "k3"
    ema_decay: float = 0.999  # τ
    ppo_epochs: int = 1
    num_minibatches: int = 1
    grad_accum_steps: int = 1
    rollout_microbatches: int = 1  # prompts in this many sequential chunks: rollouts and S_ema
    head_chunk_len: int = 0  # > 0: the update's LM head over this many thought positions at a time
    skip_nonfinite: bool = True  # a non-finite loss or gradient leaves θ, φ and the optimizer as they were

    def __post_init__(self):
        if self.objective not in ("rlp", "rpt", "ntp"):
            raise ValueError(f"objective={self.objective!r}; choose 'rlp', 'rpt' or 'ntp'.")
        for name in ("ppo_epochs", "num_minibatches", "grad_accum_steps", "rollout_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.head_chunk_len < 0:
            raise ValueError(f"head_chunk_len must be >= 0 (0: off), got {self.head_chunk_len}.")

    def check_batch_size(self, batch_size: int) -> None:
        for name, parts in (("rollout_microbatches", self.rollout_microbatches),
                            ("num_minibatches × grad_accum_steps", self.num_minibatches * self.grad_accum_steps)):
            if batch_size % parts:
                raise ValueError(f"batch size {batch_size} does not divide into {name} = {parts}; "
                                 "choose a batch size that is a multiple of it.")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # θ (nnx.State of the model's Params)
    ema_params: Any  # φ, float32 always
    opt_state: Any
    step: Array
    rng: Array  # raw uint32 key data (checkpointable)
    ref_params: Any = None  # frozen reference policy, only when kl_coef > 0


def _to_f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_state(params, optimizer: optax.GradientTransformation, seed: int | Array,
               with_reference: bool = False) -> TrainState:
    """A fresh TrainState around `params` (φ = θ in float32). Jit it with out_shardings."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return TrainState(params=params, ema_params=_to_f32(params), opt_state=optimizer.init(params),
                      step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(key),
                      ref_params=params if with_reference else None)


# ---------------------------------------------------------------- the step

def train_step(state: TrainState, batch: dict[str, Array], *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, cfg: StepConfig) -> tuple[TrainState, dict[str, Array]]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    # Algorithm 1 line 3: φ ← θ on the first batch.
    ema = jax.lax.cond(state.step == 0, lambda: _to_f32(state.params), lambda: state.ema_params)
    state = dataclasses.replace(state, ema_params=ema)
    if cfg.objective == "ntp":
        return _ntp_step(state, batch, graphdef, optimizer, cfg)
    return _policy_step(state, batch, key, graphdef, optimizer, cfg)


def _split(tree, parts: int):
    """Leading axis B → [parts, B/parts]."""
    return jax.tree.map(lambda x: x.reshape(parts, x.shape[0] // parts, *x.shape[1:]), tree)


def _merge(tree):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


def _rollouts(state, batch, key, graphdef, cfg: StepConfig) -> rollouts.Rollouts:
    """Rollouts in `rollout_microbatches` sequential chunks of prompts (bounds the KV cache)."""
    rcfg = cfg.rollout
    if cfg.rollout_microbatches == 1:
        return rollouts.sample_and_score(graphdef, state.params, batch, key, rcfg)
    chunks = _split(batch, cfg.rollout_microbatches)
    keys = jax.random.split(key, cfg.rollout_microbatches)
    out = jax.lax.map(lambda xs: rollouts.sample_and_score(graphdef, state.params, xs[0], xs[1], rcfg),
                      (chunks, keys))
    return _merge(out)


def _ema_baseline(state, batch, graphdef, cfg: StepConfig) -> Array:
    """`S_ema = log p_φ(x_t | x_<t)` of every target token, over the same `rollout_microbatches`
    chunks of prompts as the rollouts (bounds the forward's activations and attention scores)."""
    def baseline(chunk):
        return rollouts.no_think_logprobs(graphdef, state.ema_params, chunk, cfg.rollout)[0]

    if cfg.rollout_microbatches == 1:
        s_ema_BxK = baseline(batch)
    else:
        s_ema_BxK = _merge(jax.lax.map(baseline, _split(batch, cfg.rollout_microbatches)))
    return jax.lax.stop_gradient(s_ema_BxK)


def _rewards(batch, roll: rollouts.Rollouts, s_ema_BxK: Array, cfg: StepConfig) -> Array:
    B, K = batch["target_BxK"].shape
    G = cfg.rollout.num_rollouts
    mask_Bx1xK = batch["target_mask_BxK"][:, None]
    if cfg.objective == "rlp":
        return losses.information_gain_reward(roll.s_pred_NxK.reshape(B, G, K), s_ema_BxK[:, None], mask_Bx1xK)
    return losses.sparse_match_reward(roll.predicted_NxK.reshape(B, G, K), batch["target_BxK"][:, None], mask_Bx1xK)


def _policy_step(state, batch, key, graphdef, optimizer, cfg: StepConfig):
    rcfg = cfg.rollout
    B, K = batch["target_BxK"].shape
    G, L = rcfg.num_rollouts, rcfg.max_thought_len
    cfg.check_batch_size(B)

    roll = _rollouts(state, batch, key, graphdef, cfg)
    s_ema_BxK = _ema_baseline(state, batch, graphdef, cfg)
    # Padding rows of a short final batch (example_mask_B False) get reward and advantage 0 and
    # are left out of every metric.
    valid_B = batch.get("example_mask_B", jnp.ones((B,), bool)).astype(bool)
    valid_BxG = jnp.broadcast_to(valid_B[:, None], (B, G))
    rewards_BxG = jnp.where(valid_BxG, _rewards(batch, roll, s_ema_BxK, cfg), 0.0)
    advantages_BxG = losses.group_relative_advantages(rewards_BxG, valid_BxG)

    seq_NxS, predict_at_NxL = rollouts.thought_sequences(roll, G)
    per_prompt = {
        "seq": seq_NxS.reshape(B, G, -1),
        "predict_at": predict_at_NxL.reshape(B, G, L),
        "thoughts": roll.thoughts_NxL.reshape(B, G, L),
        "mask": roll.thought_mask_NxL.reshape(B, G, L),
        "advantages": advantages_BxG,
    }
    fresh_old = cfg.ppo_epochs == 1 and cfg.num_minibatches == 1
    micro = cfg.num_minibatches * cfg.grad_accum_steps
    if not fresh_old:  # one no-grad pass with θ_old, in the update's micro-batch sizes
        per_prompt["old_logp"] = _thought_logprobs_chunked(graphdef, state.params, per_prompt, micro, cfg)
    if cfg.kl_coef:
        per_prompt["ref_logp"] = _thought_logprobs_chunked(graphdef, state.ref_params, per_prompt, micro, cfg)

    minibatches = _split(per_prompt, cfg.num_minibatches)

    def update(carry, index):
        params, ema_params, opt_state, skipped = carry
        mb = jax.tree.map(lambda x: x[index % cfg.num_minibatches], minibatches)
        grads, aux = _accumulated_grads(graphdef, params, mb, cfg, fresh_old)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(aux["loss"]) & jnp.isfinite(grad_norm)
        if not cfg.skip_nonfinite:
            ok = jnp.ones((), bool)
        changes, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, changes)
        new_ema = losses.ema_update(ema_params, new_params, cfg.ema_decay)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        carry = (keep(new_params, params), keep(new_ema, ema_params), keep(new_opt_state, opt_state),
                 skipped + (~ok).astype(jnp.int32))
        return carry, aux | {"grad_norm": grad_norm}

    num_updates = cfg.ppo_epochs * cfg.num_minibatches
    (params, ema_params, opt_state, skipped), aux = jax.lax.scan(
        update, (state.params, state.ema_params, state.opt_state, jnp.zeros((), jnp.int32)),
        jnp.arange(num_updates))

    tokens = jnp.maximum(aux["num_tokens"].sum(), 1.0)
    token_mean = lambda name: aux[name].sum() / tokens
    valid_N = valid_BxG.reshape(-1)
    num_rows = jnp.maximum(valid_N.sum(), 1)
    row_mean = lambda x_N: jnp.where(valid_N, x_N, 0).sum() / num_rows
    lengths_N = roll.thought_mask_NxL.sum(-1)
    target_mask_NxK = jnp.repeat(batch["target_mask_BxK"], G, axis=0)
    s_pred_N = jnp.where(target_mask_NxK, roll.s_pred_NxK, 0.0).sum(-1)
    rewards_N = rewards_BxG.reshape(-1)
    reward_mean = row_mean(rewards_N)
    metrics = {
        "loss": aux["loss"].mean(),
        "policy_loss": aux["policy_loss"].mean(),
        "kl": aux["kl"].mean(),
        "reward_mean": reward_mean,
        "reward_std": jnp.sqrt(row_mean((rewards_N - reward_mean) ** 2)),
        "reward_pos_frac": row_mean(rewards_N > 0),
        "s_pred_mean": row_mean(s_pred_N),
        "s_ema_mean": row_mean(jnp.repeat(jnp.where(batch["target_mask_BxK"], s_ema_BxK, 0.0).sum(-1), G)),
        "advantage_abs_mean": row_mean(jnp.abs(advantages_BxG.reshape(-1))),
        "thought_len_mean": row_mean(lengths_N),
        "thought_len_max": jnp.where(valid_N, lengths_N, 0).max(),
        "truncated_frac": row_mean(roll.truncated_N),
        "clip_frac_low": token_mean("clip_frac_low"),
        "clip_frac_high": token_mean("clip_frac_high"),
        "clip_frac": token_mean("clip_frac"),
        "ratio_mean": token_mean("ratio_mean"),
        "ratio_max": aux["ratio_max"].max(),
        "approx_kl": token_mean("approx_kl"),
        "entropy": token_mean("entropy"),
        "grad_norm": aux["grad_norm"].mean(),
        "nonfinite_skipped": skipped,
        "match_rate": row_mean((roll.predicted_NxK == jnp.repeat(batch["target_BxK"], G, 0))[:, 0]),
        "num_prompts": valid_B.sum(),
    }
    new_state = dataclasses.replace(state, params=params, ema_params=ema_params, opt_state=opt_state,
                                    step=state.step + 1)
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


def _thought_logprobs_chunked(graphdef, params, per_prompt, chunks: int, cfg: StepConfig) -> Array:
    def one(mb):
        b, G, S = mb["seq"].shape
        logp, _ = rollouts.thought_logprobs(graphdef, params, mb["seq"].reshape(b * G, S),
                                            mb["predict_at"].reshape(b * G, -1),
                                            mb["thoughts"].reshape(b * G, -1), cfg.rollout.temperature,
                                            cfg.head_chunk_len)
        return jax.lax.stop_gradient(logp.reshape(b, G, -1))

    inputs = {k: per_prompt[k] for k in ("seq", "predict_at", "thoughts")}
    return _merge(jax.lax.map(one, _split(inputs, chunks)))


def _accumulated_grads(graphdef, params, mb, cfg: StepConfig, fresh_old: bool):
    """Gradient of the minibatch loss, summed over `grad_accum_steps` micro-batches with weights
    that make it equal to the loss of the whole minibatch at once."""
    rcfg = cfg.rollout
    micro = _split(mb, cfg.grad_accum_steps)
    thoughts_per_micro = (micro["mask"].sum(-1) > 0).sum(axis=(1, 2)).astype(jnp.float32)
    total_thoughts = jnp.maximum(thoughts_per_micro.sum(), 1.0)

    def loss_fn(p, m):
        b, G, S = m["seq"].shape
        logp, entropy = rollouts.thought_logprobs(graphdef, p, m["seq"].reshape(b * G, S),
                                                  m["predict_at"].reshape(b * G, -1),
                                                  m["thoughts"].reshape(b * G, -1), rcfg.temperature,
                                                  cfg.head_chunk_len)
        logp, entropy = logp.reshape(b, G, -1), entropy.reshape(b, G, -1)
        old = jax.lax.stop_gradient(logp) if fresh_old else m["old_logp"]
        policy_loss, sm = losses.clipped_surrogate_loss(logp, old, m["advantages"], m["mask"],
                                                        cfg.eps_low, cfg.eps_high)
        kl = (losses.kl_penalty(logp, m["ref_logp"], m["mask"], cfg.kl_estimator)
              if cfg.kl_coef else jnp.zeros((), jnp.float32))
        weight = sm["num_thoughts"] / total_thoughts
        num_tokens = m["mask"].sum().astype(jnp.float32)
        aux = {name: sm[name] * num_tokens for name in
               ("clip_frac_low", "clip_frac_high", "clip_frac", "ratio_mean", "approx_kl")}
        aux |= {"entropy": jnp.where(m["mask"], entropy, 0.0).sum(), "num_tokens": num_tokens,
                "ratio_max": sm["ratio_max"], "policy_loss": policy_loss * weight, "kl": kl * weight}
        return (policy_loss + cfg.kl_coef * kl) * weight, aux

    def accumulate(grads, m):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, m)
        return jax.tree.map(jnp.add, grads, g), aux | {"loss": loss}

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, aux = jax.lax.scan(accumulate, zeros, micro)
    summed = {k: v.sum() for k, v in aux.items() if k != "ratio_max"}
    return grads, summed | {"ratio_max": aux["ratio_max"].max()}


def _ntp_step(state, batch, graphdef, optimizer, cfg: StepConfig):
    """Continued pretraining: next-token cross-entropy over `[context, targets]` of the batch."""
    B = next(iter(batch.values())).shape[0]
    cfg.check_batch_size(B)
    if "tokens_BxT" in batch:  # a document batch (rlp_jax.data.document_batches): whole documents
        seq_BxS, total_len_B = batch["tokens_BxT"], batch["token_mask_BxT"].sum(-1).astype(jnp.int32)
        if "example_mask_B" in batch:
            total_len_B = jnp.where(batch["example_mask_B"], total_len_B, 0)
    else:
        seq_BxS, _ = rollouts.context_then_targets(batch)
        total_len_B = batch["context_len_B"] + batch["target_mask_BxK"].sum(-1)
    inputs = {"seq": seq_BxS, "len": total_len_B}
    updates_per_step = cfg.ppo_epochs * cfg.num_minibatches
    minibatches = _split(inputs, cfg.num_minibatches)

    def loss_sum(p, m):
        model = nnx.merge(graphdef, p)
        positions = jnp.broadcast_to(jnp.arange(m["seq"].shape[1]), m["seq"].shape)
        logits, _ = model(m["seq"][:, :-1], positions[:, :-1])
        mask = jnp.arange(1, m["seq"].shape[1])[None] < m["len"][:, None]
        nll = -losses.token_logprobs(logits, m["seq"][:, 1:])
        return jnp.where(mask, nll, 0.0).sum(), mask.sum()

    def update(carry, index):
        params, ema_params, opt_state, skipped = carry
        mb = jax.tree.map(lambda x: x[index % cfg.num_minibatches], minibatches)
        micro = _split(mb, cfg.grad_accum_steps)
        total = jnp.maximum((jnp.arange(1, mb["seq"].shape[1])[None] < mb["len"][:, None]).sum(), 1)

        def accumulate(grads, m):
            (s, n), g = jax.value_and_grad(loss_sum, has_aux=True)(params, m)
            return jax.tree.map(lambda a, b: a + b / total, grads, g), s / total

        grads, loss = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), micro)
        loss = loss.sum()
        grad_norm = optax.tree.norm(grads)
        ok = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)) | (not cfg.skip_nonfinite)
        changes, new_opt = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, changes)
        new_ema = losses.ema_update(ema_params, new_params, cfg.ema_decay)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        return (keep(new_params, params), keep(new_ema, ema_params), keep(new_opt, opt_state),
                skipped + (~ok).astype(jnp.int32)), {"loss": loss, "grad_norm": grad_norm}

    (params, ema_params, opt_state, skipped), aux = jax.lax.scan(
        update, (state.params, state.ema_params, state.opt_state, jnp.zeros((), jnp.int32)),
        jnp.arange(updates_per_step))
    metrics = {"loss": aux["loss"].mean(), "grad_norm": aux["grad_norm"].mean(),
               "nonfinite_skipped": skipped,
               "tokens": jnp.maximum(total_len_B - 1, 0).sum()}
    new_state = dataclasses.replace(state, params=params, ema_params=ema_params, opt_state=opt_state,
                                    step=state.step + 1)
    return new_state, jax.tree.map(lambda x: x.astype(jnp.float32), metrics)


# ---------------------------------------------------------------- sharded compilation

def state_shardings(abstract_state: TrainState, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES) -> TrainState:
    """NamedShardings for every leaf of the state: params, EMA and reference by their logical
    axes, optimizer moments like their params, scalars replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params_sharding = sharding.param_shardings(abstract_state.params, mesh, rules)
    opt_sharding = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_state.opt_state, params_sharding,
        transform_non_params=lambda _: replicated)
    return TrainState(params=params_sharding, ema_params=params_sharding, opt_state=opt_sharding,
                      step=replicated, rng=replicated,
                      ref_params=None if abstract_state.ref_params is None else params_sharding)


def batch_shardings(batch_example: dict[str, Any], mesh: jax.sharding.Mesh, rules=sharding.DEFAULT_RULES):
    spec = sharding.logical_to_mesh(("batch",), rules)
    return {k: jax.sharding.NamedSharding(mesh, spec) for k in batch_example}


def create_sharded_state(params, optimizer, seed: int, mesh, rules=sharding.DEFAULT_RULES,
                         with_reference: bool = False) -> tuple[TrainState, TrainState]:
    """(state, its shardings): `params` (already sharded or not) wrapped into a TrainState by a
    jitted init with out_shardings, so no device ever holds more than its shard."""
    init = functools.partial(init_state, optimizer=optimizer, seed=seed, with_reference=with_reference)
    abstract = jax.eval_shape(init, params)
    shardings = state_shardings(abstract, optimizer, mesh, rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.jit(init, out_shardings=shardings)(params)
    return state, shardings


def abstract_state_from_scratch(model_config, optimizer, seed: int, mesh, rules=sharding.DEFAULT_RULES,
                                with_reference: bool = False):
    """(graphdef, abstract state, shardings, init) for a randomly initialised model, without
    creating any weights: `init()` builds the state inside one jitted init with out_shardings,
    identical on every process and never unsharded on any device."""
    from rlp_jax.models.transformer import Transformer

    def init_fn(key):
        with nnx.use_eager_sharding(False):
            model = Transformer(model_config, nnx.Rngs(params=key))
        return init_state(nnx.state(model, nnx.Param), optimizer, jax.random.fold_in(key, 1), with_reference)

    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_config, nnx.Rngs(0))), nnx.Param)
    key = jax.random.key(seed)
    abstract = jax.eval_shape(init_fn, key)
    shardings = state_shardings(abstract, optimizer, mesh, rules)

    def init():
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jax.jit(init_fn, out_shardings=shardings)(key)

    return graphdef, abstract, shardings, init


def create_state_from_scratch(model_config, optimizer, seed: int, mesh, rules=sharding.DEFAULT_RULES,
                              with_reference: bool = False):
    """(graphdef, state, shardings) for a randomly initialised model (see abstract_state_from_scratch)."""
    graphdef, _, shardings, init = abstract_state_from_scratch(model_config, optimizer, seed, mesh, rules,
                                                               with_reference)
    return graphdef, init(), shardings


def compile_train_step(graphdef, optimizer, cfg: StepConfig, mesh, state_sharding: TrainState,
                       batch_sharding, rules=sharding.DEFAULT_RULES):
    """The jitted step with explicit in/out shardings and the state donated; call it as
    `state, metrics = step(state, batch)`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    jitted = jax.jit(functools.partial(train_step, graphdef=graphdef, optimizer=optimizer, cfg=cfg),
                     in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, replicated), donate_argnums=0)

    def step(state, batch):
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            return jitted(state, batch)

    step.jitted = jitted
    return step
