"""Held-out evaluation: information gain, NLL with and without thinking, accuracy, thoughts.

Every number is a mean over held-out prompt positions with its standard error (`<name>_se`), so
before/after comparisons come with their uncertainty. The same key is used at every evaluation
(common random numbers), so differences between two evaluations are not sampling noise of the
thoughts' draws alone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlp_jax import rollouts, sharding
from rlp_jax.batch import PromptBatch, step_fields
from rlp_jax.rollouts import RolloutConfig


def _replicate(tree, replicated: NamedSharding | None):
    """Outputs every process can read (multi-host: a sharded output spans other hosts' devices)."""
    if replicated is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated), tree)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "greedy", "replicated"))
def _rollouts(graphdef, params, batch, key, cfg, greedy, replicated=None):
    return _replicate(rollouts.sample_and_score(graphdef, params, batch, key, cfg, greedy=greedy), replicated)


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "replicated"))
def _no_think(graphdef, params, batch, cfg, replicated=None):
    return _replicate(rollouts.no_think_logprobs(graphdef, params, batch, cfg), replicated)


def _on_mesh(batch: PromptBatch, mesh: jax.sharding.Mesh, rules) -> PromptBatch:
    """A held-out batch that every process holds whole, as global arrays split over the mesh's
    batch axes."""
    return jax.tree.map(lambda x: sharding.place_batch(x, mesh, rules), batch)


def lowered_programs(graphdef: nnx.GraphDef, abstract_params: Any, abstract_baseline_params: Any, batch_size: int,
                     max_context: int, target_len: int, cfg: RolloutConfig, mesh: jax.sharding.Mesh,
                     rules=sharding.DEFAULT_RULES) -> list[tuple[str, Callable[[], jax.stages.Lowered]]]:
    """The programs `evaluate` runs on `mesh`, as `(name, lower)` over abstract inputs
    (ShapeDtypeStructs with shardings) for `rlp-jax compile`: sampled and greedy rollouts, and the
    no-think scoring of the trained params and, when its dtypes differ, of the baselines' (the EMA
    is float32)."""
    from rlp_jax.data import batching

    spec = batching.prompt_batch_spec(batch_size, max_context, target_len)
    fields = {f.name: None for f in dataclasses.fields(PromptBatch)}
    for name in ("context_BxT", "context_len_B", "target_BxK", "target_mask_BxK", "example_mask_B"):
        shape, dtype = spec[name]
        fields[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(shape, mesh, rules))
    batch = PromptBatch(**fields)
    key = jax.eval_shape(lambda: jax.random.key(0))
    replicated = NamedSharding(mesh, P())
    programs = [
        ("held-out evaluation: sampled thoughts",
         lambda: _rollouts.lower(graphdef, abstract_params, batch, key, cfg, False, replicated)),
        ("held-out evaluation: greedy thoughts",
         lambda: _rollouts.lower(graphdef, abstract_params, batch, key, cfg, True, replicated)),
        ("held-out evaluation: no-think scores",
         lambda: _no_think.lower(graphdef, abstract_params, batch, cfg, replicated)),
    ]
    dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]
    if dtypes(abstract_baseline_params) != dtypes(abstract_params):
        programs.append(("held-out evaluation: no-think scores of the EMA baseline",
                         lambda: _no_think.lower(graphdef, abstract_baseline_params, batch, cfg, replicated)))
    return programs


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    se = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else float("nan")
    return float(values.mean()), float(se)


def printable(text: str) -> str:
    """`text` safe to print in a terminal or a markdown table cell: control and other unprintable
    characters (a byte tokenizer's thoughts hold any byte) become escapes such as `\\n` or
    `\\x1b`; `|` and `\\` are escaped with a backslash."""
    out = []
    for char in text:
        if char in "|\\":
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


def evaluate(graphdef: nnx.GraphDef, params: Any, baselines: dict[str, Any], batches: list[PromptBatch],
             cfg: RolloutConfig, key: jax.Array, decode: Callable[[list[int]], str] | None = None,
             show_thoughts: int = 4, mesh: jax.sharding.Mesh | None = None,
             rules=sharding.DEFAULT_RULES) -> dict[str, Any]:
    """Evaluates `params` on held-out prompt `batches` (host `PromptBatch`es).

    With `mesh` (the params' mesh; required when they span several processes), every process
    passes the same whole `batches`: each batch is split over the mesh's batch axes (`rules`)
    and every process gets every result, so all processes return the same numbers.

    `baselines` names the no-think scorers the information gain is measured against, e.g.
    `{"ema": φ, "start": θ_0}`: the gain against the EMA is what training rewards; the gain against
    a frozen starting model tells real progress from a sinking baseline.

    Returns means and standard errors over positions: `gain_<name>`, `nll_think`, `nll_no_think`
    (per target token), `acc_think` (sampled thought), `acc_greedy_think`, `acc_no_think` (all K
    target tokens predicted by argmax), thought-length statistics, `num_positions`, and
    `samples` (decoded thoughts with their context and target) when `decode` is given.
    """
    per_position: dict[str, list[np.ndarray]] = {}
    lengths, truncated, samples = [], [], []
    G = cfg.num_rollouts

    def add(name, values):
        per_position.setdefault(name, []).append(np.asarray(values))

    replicated = None if mesh is None else NamedSharding(mesh, P())
    for i, batch in enumerate(batches):
        host = jax.device_get(step_fields(batch))
        batch = host if mesh is None else _on_mesh(host, mesh, rules)
        batch_key = jax.random.fold_in(key, i)
        roll = jax.device_get(_rollouts(graphdef, params, batch, batch_key, cfg, False, replicated))
        greedy = jax.device_get(_rollouts(graphdef, params, batch, batch_key, cfg, True, replicated))
        s_self, pred_self = jax.device_get(_no_think(graphdef, params, batch, cfg, replicated))
        B, K = host.target_BxK.shape
        valid = np.asarray(host.example_mask_B, bool)
        mask = np.asarray(host.target_mask_BxK, bool)
        num_targets = np.maximum(mask.sum(-1), 1)
        s_pred_BxG = np.where(mask[:, None], roll.s_pred_NxK.reshape(B, G, K), 0).sum(-1)
        s_pred_B = s_pred_BxG.mean(-1)
        for name, base_params in baselines.items():
            s_base, _ = jax.device_get(_no_think(graphdef, base_params, batch, cfg, replicated))
            add(f"gain_{name}", (s_pred_B - np.where(mask, s_base, 0).sum(-1))[valid])
        add("nll_think", (-s_pred_B / num_targets)[valid])
        add("nll_no_think", (-np.where(mask, s_self, 0).sum(-1) / num_targets)[valid])
        target = host.target_BxK
        correct = lambda pred_BxK: np.all((pred_BxK == target) | ~mask, axis=-1)
        sampled_correct = np.stack([correct(roll.predicted_NxK.reshape(B, G, K)[:, g]) for g in range(G)], -1)
        add("acc_think", sampled_correct.mean(-1)[valid])
        add("acc_greedy_think", correct(greedy.predicted_NxK.reshape(B, G, K)[:, 0])[valid])
        add("acc_no_think", correct(pred_self)[valid])
        rows = np.repeat(valid, G)
        lengths.append(roll.thought_mask_NxL.sum(-1)[rows])
        truncated.append(roll.truncated_N[rows])
        if decode is not None and len(samples) < show_thoughts:
            for b in np.flatnonzero(valid)[: show_thoughts - len(samples)]:
                n = int(host.context_len_B[b])
                thought = roll.thoughts_NxL[b * G][roll.thought_mask_NxL[b * G]]
                show = lambda ids: printable(decode(ids.tolist()))
                samples.append({"context": show(host.context_BxT[b, :n]), "thought": show(thought),
                                "target": show(target[b][mask[b]]),
                                "predicted": show(roll.predicted_NxK[b * G][mask[b]])})

    result: dict[str, Any] = {}
    for name, chunks in per_position.items():
        result[name], result[f"{name}_se"] = _mean_se(np.concatenate(chunks))
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0)
    result |= {
        "num_positions": int(sum(len(c) for c in per_position.get("nll_think", []))),
        "thought_len_mean": float(all_lengths.mean()) if all_lengths.size else float("nan"),
        "thought_len_p50": float(np.percentile(all_lengths, 50)) if all_lengths.size else float("nan"),
        "thought_len_p90": float(np.percentile(all_lengths, 90)) if all_lengths.size else float("nan"),
        "thought_len_max": int(all_lengths.max()) if all_lengths.size else 0,
        "truncated_frac": float(np.concatenate(truncated).mean()) if truncated else float("nan"),
    }
    if decode is not None:
        result["samples"] = samples
    return result
