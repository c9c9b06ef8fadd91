"""The rlp-jax half of the bench: matmul roofline, memory bandwidth, policy update, the sampler's
prefill and decode loop (timed apart), RLP step pieces.

Every function here jits what it times, runs it once untimed (compilation) and then up to `repeats`
times, blocking on the results (`measure.timeit`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rlp_jax import losses, rollouts, sampling, sharding
from rlp_jax import train_step as ts
from rlp_jax.batch import PromptBatch, prompt_batch
from rlp_jax.bench import measure
from rlp_jax.models.families import family_of

THINK_OPEN, THINK_CLOSE = 1, 2


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What one RLP step of the bench looks like, and the decode and roofline sizes."""

    batch: int  # B prompts
    rollouts: int  # G thoughts per prompt
    context: int  # T context tokens (every row full)
    thought: int  # L thought tokens (every thought runs to L: min_thought_len = L)
    targets: int  # K scored next tokens
    decode_prompt: int
    decode_new: int
    decode_batches: tuple[int, ...]
    roofline_sizes: tuple[int, ...]
    repeats: int
    temperature: float = 0.7
    block_len: int = 256  # rollout-cache block (RolloutConfig.cache_block_len)
    bandwidth_mib: int = 256  # the array the memory bandwidth is measured on

    @property
    def rows(self) -> int:
        return self.batch * self.rollouts

    @property
    def prompt_len(self) -> int:  # [context, <think>]
        return self.context + 1

    @property
    def seq_len(self) -> int:  # [context, <think>, thought]: what the update runs over
        return self.prompt_len + self.thought


def rollout_config(shapes: Shapes) -> rollouts.RolloutConfig:
    return rollouts.RolloutConfig(think_open_id=THINK_OPEN, think_close_id=THINK_CLOSE,
                                  num_rollouts=shapes.rollouts, max_thought_len=shapes.thought,
                                  min_thought_len=shapes.thought, temperature=shapes.temperature,
                                  cache_block_len=shapes.block_len)


def make_batch(config, shapes: Shapes, seed: int = 0) -> PromptBatch:
    rng = np.random.RandomState(seed)
    B, T, K = shapes.batch, shapes.context, shapes.targets
    return jax.tree.map(jnp.asarray, prompt_batch(rng.randint(3, config.vocab_size, (B, T)).astype(np.int32),
                                                  np.full((B,), T, np.int32),
                                                  rng.randint(3, config.vocab_size, (B, K)).astype(np.int32)))


def optimizer() -> optax.GradientTransformation:
    return optax.adamw(1e-6, b1=0.9, b2=0.95, weight_decay=0.1)  # the paper's settings


def single_device_mesh() -> jax.sharding.Mesh:
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# ---------------------------------------------------------------- (1) roofline

def roofline(sizes: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Square matmuls, f32 and bf16 inputs with f32 accumulation; GFLOP/s per size and the peak."""
    out: dict[str, Any] = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        per_size = {}
        for n in sizes:
            a = jax.random.normal(jax.random.key(0), (n, n), dtype)
            b = jax.random.normal(jax.random.key(1), (n, n), dtype)
            mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
            t = measure.timeit(lambda: mm(a, b), repeats)
            per_size[str(n)] = 2.0 * n ** 3 / t.median_s / 1e9
        out[name] = {"gflops_by_size": per_size, "peak_gflops": max(per_size.values())}
    return out


def bandwidth(size_mib: int, repeats: int) -> dict[str, float]:
    """The device's memory bandwidth, measured: a jitted float32 sum over a `size_mib` array (bytes
    read per second) and a jitted in-place `x + 1` (bytes read + written per second)."""
    x = jnp.ones((size_mib * 2**20 // 4,), jnp.float32)
    nbytes = x.nbytes
    read = jax.jit(jnp.sum)
    t_read = measure.timeit(lambda: read(x), repeats)
    # In place (the input donated): a fresh output buffer per call would time page faults too.
    copy = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    holder = [x]

    def copy_once():
        holder[0] = copy(holder[0])
        return holder[0]

    t_copy = measure.timeit(copy_once, repeats)
    read_bps, copy_bps = nbytes / t_read.median_s, 2 * nbytes / t_copy.median_s
    # The bandwidth decode is held against: the better of the two (a denominator never too low).
    return {"bytes": nbytes, "read_bytes_per_s": read_bps, "copy_bytes_per_s": copy_bps,
            "bytes_per_s": max(read_bps, copy_bps)}


# ---------------------------------------------------------------- setup shared by (2) and (4)

@dataclasses.dataclass
class Prepared:
    config: Any  # the model's config (of any family)
    shapes: Shapes
    graphdef: Any
    params: Any
    batch: PromptBatch
    rcfg: rollouts.RolloutConfig
    step_cfg: ts.StepConfig
    rows: ts.UpdateBatch  # the update's inputs, from real rollouts of `params`
    sample_and_score: Any  # jitted (params, batch, key) -> Rollouts
    state: Any  # a TrainState with the same params, for the whole compiled step (donated there)
    state_sharding: Any


def prepare(config, shapes: Shapes, seed: int = 0) -> Prepared:
    graphdef, state, state_sharding = ts.create_state_from_scratch(config, optimizer(), seed,
                                                                   single_device_mesh())
    params = jax.tree.map(jnp.copy, state.params)
    batch = make_batch(config, shapes, seed)
    rcfg = rollout_config(shapes)
    step_cfg = ts.StepConfig(rollout=rcfg)
    sample_and_score = jax.jit(functools.partial(rollouts.sample_and_score, graphdef, cfg=rcfg))
    roll = sample_and_score(params, batch, jax.random.key(seed))
    B, G = shapes.batch, shapes.rollouts
    advantages = jax.random.normal(jax.random.key(seed + 1), (B, G))
    rows = ts.update_batch(roll, advantages, jnp.ones((B, G), bool))
    return Prepared(config, shapes, graphdef, params, batch, rcfg, step_cfg, rows,
                    sample_and_score, state, state_sharding)


def model_of(p: Prepared) -> nnx.Module:
    return nnx.merge(p.graphdef, p.params)


# ---------------------------------------------------------------- (2) the policy update

def update(p: Prepared) -> dict[str, Any]:
    """Forward + backward of the clipped surrogate over `[context, <think>, thought]` of all B·G
    rows (train_step's own gradient code), and the whole update: gradient, AdamW, EMA."""
    opt = optimizer()
    cfg = p.step_cfg

    @jax.jit
    def fwd_bwd(params, mb):
        grads, aux = ts.policy_gradient(p.graphdef, params, mb, cfg)
        return grads, aux["loss"]

    @jax.jit
    def full_update(params, opt_state, ema, mb):
        grads, aux = ts.policy_gradient(p.graphdef, params, mb, cfg)
        changes, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, changes)
        return params, opt_state, losses.ema_update(ema, params, cfg.ema_decay), aux["loss"]

    opt_state = opt.init(p.params)
    ema = jax.tree.map(lambda x: x.astype(jnp.float32), p.params)
    s = p.shapes
    t_fb = measure.timeit(lambda: fwd_bwd(p.params, p.rows), s.repeats)
    t_up = measure.timeit(lambda: full_update(p.params, opt_state, ema, p.rows), s.repeats)
    flops = measure.train_flops(p.config, s.rows, s.seq_len, s.thought)
    tokens = s.rows * s.seq_len
    return {"rows": s.rows, "seq_len": s.seq_len, "tokens": tokens, "model_flops": flops,
            "fwd_bwd": t_fb.as_dict(), "update": t_up.as_dict(),
            "fwd_bwd_tokens_per_s": tokens / t_fb.median_s,
            "update_tokens_per_s": tokens / t_up.median_s,
            "fwd_bwd_gflops": flops / t_fb.median_s / 1e9,
            "update_gflops": flops / t_up.median_s / 1e9}


# ---------------------------------------------------------------- (3) prefill and decode

def decode_inputs(model: nnx.Module, shapes: Shapes, batch_size: int, seed: int = 0):
    """What the bench's prefill and decode run on: the sampler's weights of `model` (made once),
    `batch_size` rows of one random `decode_prompt`-token prompt each (as HF `generate` is given
    them), their lengths, and the config that samples `decode_new` tokens."""
    rng = np.random.RandomState(seed)
    P = shapes.decode_prompt
    prompts_BxP = jnp.asarray(rng.randint(3, model.config.vocab_size, (batch_size, P)), jnp.int32)
    lengths_B = jnp.full((batch_size,), P, jnp.int32)
    cfg = sampling.SamplingConfig(max_new_tokens=shapes.decode_new, temperature=shapes.temperature,
                                  block_len=shapes.block_len)
    return jax.jit(sampling.weights_of)(model), prompts_BxP, lengths_B, cfg


def decode(model: nnx.Module, shapes: Shapes, batch_size: int, seed: int = 0,
           read_bytes_per_s: float | None = None) -> dict[str, Any]:
    """The sampler's two halves timed apart: `sampling.prefill` (the prompts to the first token's
    logits) and `sampling.decode_loop` (the `decode_new` = n steps alone), every decode call
    starting from the same prefilled cache made beforehand, so that noise in the prefill cannot
    reach the decode figure."""
    weights, prompts_BxP, lengths_B, cfg = decode_inputs(model, shapes, batch_size, seed)
    key = jax.random.key(seed)
    t_prefill = measure.timeit(lambda: sampling.prefill_jit(weights, prompts_BxP, lengths_B, cfg), shapes.repeats)
    start = sampling.prefill_jit(weights, prompts_BxP, lengths_B, cfg)
    t_decode = measure.timeit(lambda: sampling.decode_loop_jit(weights, start, key, cfg), shapes.repeats)
    return decode_result(model.config, batch_size, shapes.decode_prompt, shapes.decode_new, t_prefill, t_decode,
                         read_bytes_per_s)


def decode_result(config, batch_size: int, P: int, n: int, t_prefill: measure.Timing, t_decode: measure.Timing,
                  read_bytes_per_s: float | None = None) -> dict[str, Any]:
    """Decode throughput from the n decode steps timed alone (`t_decode`), prefill throughput
    from the prefill timed alone, and "generate incl. prefill" as B·n over the sum of the two
    medians. With the measured read bandwidth: the bytes a step must read (weights once + every
    row's filled cache) and the fraction of the bandwidth that achieves. `notes` says which of the
    two timings spread widely (a busy machine), so that no figure is taken on trust silently."""
    step_s = t_decode.median_s / n
    # Mean context of the decode steps: P … P + n − 1 cached keys.
    flops_per_token = measure.decode_flops_per_token(config, P + n / 2)
    parts = measure.decode_step_bytes_parts(config, prompts=batch_size, prompt_tokens=P, rows=batch_size,
                                            suffix_tokens=n / 2)
    step_bytes = sum(parts.values())
    notes = [note for note in (measure.spread_note("prefill", t_prefill), measure.spread_note("decode", t_decode))
             if note]
    return {"batch": batch_size, "prompt": P, "new_tokens": n,
            "prefill": t_prefill.as_dict(), "decode": t_decode.as_dict(),
            "prefill_tokens_per_s": batch_size * P / t_prefill.median_s,
            "decode_tokens_per_s": batch_size / step_s,
            "decode_ms_per_step": 1e3 * step_s,
            "generate_tokens_per_s": batch_size * n / (t_prefill.median_s + t_decode.median_s),
            "decode_gflops": batch_size / step_s * flops_per_token / 1e9,
            "step_bytes": step_bytes, "step_bytes_parts": parts,
            "bandwidth_fraction": step_bytes / step_s / read_bytes_per_s if read_bytes_per_s else None,
            "notes": notes}


# ---------------------------------------------------------------- (4) the step, piece by piece

def step_breakdown(p: Prepared, update_result: dict[str, Any]) -> dict[str, Any]:
    """Each piece of an RLP step jitted alone, then the whole compiled train step.

    - rollout: `sampling.sample` exactly as `sample_and_score` calls it (prefill, G-fold share,
      L decode steps), without the scoring;
    - scoring: the scoring half of `sample_and_score` jitted alone on a finished rollout (its cache
      donated and written in place, a fresh copy made outside the timed call); as a cross-check,
      `sample_and_score` − rollout (same key, so the same tokens);
    - EMA baseline: `rollouts.no_think_logprobs` with φ;
    - update: gradient + AdamW + EMA (from `update`);
    - step: `train_step.compile_train_step` on a one-device mesh (everything, plus rewards,
      advantages and metrics).
    """
    s, rcfg, gd = p.shapes, p.rcfg, p.graphdef
    key = jax.random.key(1)
    prompt_BxP, prompt_len_B = rollouts.build_prompts(p.batch.context_BxT, p.batch.context_len_B, rcfg)
    # Each family samples on its own decode state (sampling.sample goes through the family).
    weights_of = lambda params: sampling.weights_of(nnx.merge(gd, params))

    sample = jax.jit(lambda params, k: sampling.sample(weights_of(params), prompt_BxP, prompt_len_B, k,
                                                        rcfg.sampling_config(), s.rollouts, 1 + s.targets))
    t_rollout = measure.timeit(lambda: sample(p.params, key).tokens_NxL, s.repeats)
    t_both = measure.timeit(lambda: p.sample_and_score(p.params, p.batch, key).s_pred_NxK, s.repeats)

    out = sample(p.params, key)
    weights = jax.jit(weights_of)(p.params)
    if not family_of(p.config).sampler.rewrites_slots:
        # Scoring on a recurrent state: `[</think>, x_t, …]` fed from each row's state after its
        # thought (which it reads, not rewrites: nothing to donate).
        score = jax.jit(lambda w, o, t: rollouts.score_after_thoughts(w, o, t, rcfg)[:2])
        t_score_alone = measure.timeit(lambda: score(weights, out, p.batch.target_BxK), s.repeats)
    else:
        # The scoring half of sample_and_score on a finished rollout; its cache donated (written in
        # place), a fresh copy made outside the timed call.
        score = jax.jit(lambda w, cache, o, t: rollouts.score_after_thoughts(
            w, dataclasses.replace(o, cache=cache), t, rcfg)[::2], donate_argnums=(1,))
        rest = dataclasses.replace(out, cache=None)
        fresh = lambda: (weights, jax.tree.map(jnp.copy, out.cache), rest, p.batch.target_BxK)
        t_score_alone = measure.timeit(score, s.repeats, setup=fresh)

    ema = jax.tree.map(lambda x: x.astype(jnp.float32), p.params)
    baseline = jax.jit(functools.partial(rollouts.no_think_logprobs, gd, cfg=rcfg))
    t_baseline = measure.timeit(lambda: baseline(ema, p.batch), s.repeats)

    mesh = single_device_mesh()
    batch_sharding = ts.batch_shardings(p.batch, mesh)
    step = ts.compile_train_step(gd, optimizer(), p.step_cfg, mesh, p.state_sharding, batch_sharding)
    batch = jax.device_put(p.batch, batch_sharding)
    holder = {"state": p.state}

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    t_step = measure.timeit(one_step, s.repeats)

    pieces = {"rollout_s": t_rollout.median_s, "scoring_s": t_score_alone.median_s,
              "ema_baseline_s": t_baseline.median_s, "update_s": update_result["update"]["median_s"]}
    total = t_step.median_s
    return {
        "rollout": t_rollout.as_dict(), "sample_and_score": t_both.as_dict(),
        "scoring": t_score_alone.as_dict(), "ema_baseline": t_baseline.as_dict(),
        "step": t_step.as_dict(), **pieces,
        # Cross-check: what adding the scoring to the rollout program costs (noisy: a difference
        # of two medians; may come out negative when scoring is far below the timing noise).
        "scoring_in_sample_and_score_s": t_both.median_s - t_rollout.median_s,
        "other_s": total - sum(pieces.values()),
        "step_s": total,
        "fractions": {name[:-2]: value / total for name, value in pieces.items()},
        "thought_tokens_per_s": s.rows * s.thought / total,
        "rollout_tokens_per_s": s.rows * s.thought / t_rollout.median_s,
    }


# ---------------------------------------------------------------- --profile

def profile_update(p: Prepared, folder: str) -> dict[str, Any]:
    """Where one forward + backward of the update spends its time (see bench/profile.py)."""
    from rlp_jax.bench import profile

    fwd_bwd = jax.jit(lambda params, mb: ts.policy_gradient(p.graphdef, params, mb, p.step_cfg)[0])
    out = profile.top_ops(lambda: fwd_bwd(p.params, p.rows), folder)
    hlo = fwd_bwd.lower(p.params, p.rows).compile().as_text()
    return out | {"what": profile.describe(hlo, [op["name"] for op in out["ops"]])}


def profile_decode(model: nnx.Module, shapes: Shapes, batch_size: int, folder: str) -> dict[str, Any]:
    """Where the prefill and the `decode_new` decode steps at one batch size spend their time,
    each profiled alone as `decode` times them."""
    from rlp_jax.bench import profile

    weights, prompts_BxP, lengths_B, cfg = decode_inputs(model, shapes, batch_size)
    prefill_args = (weights, prompts_BxP, lengths_B, cfg)
    start = sampling.prefill_jit(*prefill_args)
    decode_args = (weights, start, jax.random.key(0), cfg)
    out = {}
    for name, program, args in (("prefill", sampling.prefill_jit, prefill_args),
                                ("decode", sampling.decode_loop_jit, decode_args)):
        ops = profile.top_ops(lambda: program(*args), f"{folder}/{name}")
        hlo = program.lower(*args).compile().as_text()
        out[name] = ops | {"what": profile.describe(hlo, [op["name"] for op in ops["ops"]])}
    return out
