"""`rlp-jax losses-example`: the loss library driving a toy thought policy, in plain JAX + optax.

This is the pattern docs/losses.md describes for another codebase's train step, at the size of a
table. Each context has a hidden answer token and a hint token; the frozen predictor puts more
mass on the answer the more hint tokens the thought holds, and the no-think baseline is the same
predictor without the thought. Only the thought policy is trained, with `rlp_loss`, so the mean
information gain should climb from about 0 towards its maximum as thoughts fill with hints.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from rlp_jax import losses

NUM_CONTEXTS, VOCAB, THOUGHT_VOCAB, MAX_THOUGHT_LEN = 32, 16, 8, 4
HINT_STRENGTH = 4.0


def make_world(key):
    k_base, k_answer, k_hint = jax.random.split(key, 3)
    return {
        "base_logits": jax.random.normal(k_base, (NUM_CONTEXTS, VOCAB)),
        "answer": jax.random.randint(k_answer, (NUM_CONTEXTS,), 0, VOCAB),
        "hint": jax.random.randint(k_hint, (NUM_CONTEXTS,), 0, THOUGHT_VOCAB),
    }


def predictor_logits(world, ctx_B, thoughts_BxGxL, mask_BxGxL):
    """Frozen predictor: logits of the next token given context and thought."""
    hits = ((thoughts_BxGxL == world["hint"][ctx_B, None, None]) & mask_BxGxL).sum(-1)
    frac_BxG = hits / jnp.maximum(mask_BxGxL.sum(-1), 1)
    boost_BxGxV = HINT_STRENGTH * frac_BxG[..., None] * jax.nn.one_hot(world["answer"][ctx_B], VOCAB)[:, None]
    return world["base_logits"][ctx_B][:, None] + boost_BxGxV


def sample(policy_logits, world, key, batch_size, num_rollouts):
    """Draws contexts, their true next tokens, and G thoughts of random length per context."""
    k_ctx, k_tok, k_len, k_next = jax.random.split(key, 4)
    ctx_B = jax.random.randint(k_ctx, (batch_size,), 0, NUM_CONTEXTS)
    shape = (batch_size, num_rollouts, MAX_THOUGHT_LEN)
    thoughts = jax.random.categorical(k_tok, policy_logits[ctx_B][:, None, None], shape=shape)
    lengths = jax.random.randint(k_len, shape[:2], 1, MAX_THOUGHT_LEN + 1)
    mask = jnp.arange(MAX_THOUGHT_LEN) < lengths[..., None]
    # True next token from the data distribution: mostly the answer.
    data_logits = world["base_logits"][ctx_B] + HINT_STRENGTH * jax.nn.one_hot(world["answer"][ctx_B], VOCAB)
    next_B = jax.random.categorical(k_next, data_logits)
    return ctx_B, thoughts, mask, next_B


def thought_logprobs(policy_logits, ctx_B, thoughts_BxGxL):
    logits = jnp.broadcast_to(policy_logits[ctx_B][:, None, None], thoughts_BxGxL.shape + (THOUGHT_VOCAB,))
    return losses.token_logprobs(logits, thoughts_BxGxL)


@functools.partial(jax.jit, static_argnames=("optimizer", "batch_size", "num_rollouts", "updates"))
def train_step(policy_logits, opt_state, world, key, *, optimizer, batch_size, num_rollouts, updates):
    ctx_B, thoughts, mask, next_B = sample(policy_logits, world, key, batch_size, num_rollouts)
    old_logp = thought_logprobs(policy_logits, ctx_B, thoughts)
    logp_reasoned_BxG = losses.token_logprobs(
        predictor_logits(world, ctx_B, thoughts, mask), jnp.broadcast_to(next_B[:, None], ctx_B.shape + (num_rollouts,)))
    logp_baseline_B = losses.token_logprobs(world["base_logits"][ctx_B], next_B)

    def loss_fn(p):
        return losses.rlp_loss(thought_logprobs(p, ctx_B, thoughts), old_logp, mask,
                               logp_reasoned_BxG, logp_baseline_B)

    metrics = {}
    for _ in range(updates):  # several policy updates per rollout batch: ratios move off 1
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(policy_logits)
        change, opt_state = optimizer.update(grads, opt_state, policy_logits)
        policy_logits = optax.apply_updates(policy_logits, change)
    return policy_logits, opt_state, metrics


def run(steps: int = 150, batch_size: int = 64, num_rollouts: int = 8, updates: int = 2,
        learning_rate: float = 0.05, seed: int = 0, log_every: int = 25, echo=print):
    """Trains the toy policy; returns the per-step mean information gain."""
    key = jax.random.key(seed)
    world = make_world(jax.random.fold_in(key, 0))
    policy_logits = jnp.zeros((NUM_CONTEXTS, THOUGHT_VOCAB))
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(policy_logits)
    gains = []
    for step in range(steps):
        policy_logits, opt_state, metrics = train_step(
            policy_logits, opt_state, world, jax.random.fold_in(key, step + 1), optimizer=optimizer,
            batch_size=batch_size, num_rollouts=num_rollouts, updates=updates)
        gains.append(float(metrics["reward_mean"]))
        if step % log_every == 0 or step == steps - 1:
            echo(f"step {step:4d}  information gain {gains[-1]:+.3f} nats  "
                 f"clip frac {float(metrics['clip_frac']):.3f}  ratio {float(metrics['ratio_mean']):.3f}")
    hint_prob = jax.nn.softmax(policy_logits)[jnp.arange(NUM_CONTEXTS), world["hint"]].mean()
    echo(f"policy mass on the helpful thought token: {1 / THOUGHT_VOCAB:.3f} -> {float(hint_prob):.3f}")
    return gains
