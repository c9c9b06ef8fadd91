"""`rlp-jax eval`: evaluate a finished run (or an HF folder) on held-out prompt positions.

Writes JSON and markdown: information gain against the chosen no-think baselines, NLL with and
without thinking, exact-match accuracy of the answer with and without a thought, the thought-length
distribution and sample thoughts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rlp_jax import build
from rlp_jax import checkpoint as ckpt_lib
from rlp_jax import evaluate as eval_lib
from rlp_jax.config import ConfigError
from rlp_jax.models import kernels


def run_config(run_dir: Path) -> ml_collections.ConfigDict:
    path = ckpt_lib.RunDir(run_dir).require_run().config
    if not path.exists():
        raise ConfigError(f"{run_dir} has no config.json; pass the --workdir of an rlp-jax training run.")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _params(model) -> Any:
    return nnx.state(model, nnx.Param)


def _start_params(run_dir: Path, like):
    """θ_0 that the trainer saved in WORKDIR/start_params, or None."""
    run = ckpt_lib.RunDir(run_dir)
    if not run.start_params.exists():
        return None
    pure = run.restore_start_params()
    state = jax.tree.map(lambda x: x, like)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return state


def evaluate_run(run_dir: str | Path | None = None, hf_dir: str | Path | None = None, *,
                 config: ml_collections.ConfigDict | None = None, start_from: str | Path | None = None,
                 num_positions: int | None = None, num_thoughts: int | None = None) -> dict:
    """Evaluates the newest weights of `run_dir` (or the model in `hf_dir`).

    Baselines for the information gain: `self` (the same model without a thought), `start` (the
    run's starting weights, or the final weights of the run `start_from`).
    `config` defaults to the run's own config (needed for an HF folder: tokenizer and data).
    """
    if (run_dir is None) == (hf_dir is None):
        raise ConfigError("give exactly one of a run directory (--workdir) or an HF folder (--hf).")
    if run_dir is not None:
        run_dir = Path(run_dir).absolute()
        config = config or run_config(run_dir)
        model = build.model_from_run(run_dir)
    else:
        if config is None:
            raise ConfigError("evaluating an HF folder needs a config for the tokenizer and data; pass --config.")
        from rlp_jax.models import convert  # any family's HF folder, by its config.json model_type

        model = kernels.on_local_platform(convert.load_hf(hf_dir))
    graphdef, params = nnx.split(model, nnx.Param)
    baselines = {"self": params}
    start = (_params(build.model_from_run(start_from)) if start_from is not None
             else _start_params(run_dir, params) if run_dir is not None else None)
    if start is not None:
        baselines["start"] = start
    config = ml_collections.ConfigDict(config.to_dict())
    if num_positions is not None:
        config.eval.num_positions = num_positions
    if num_thoughts is not None:
        config.eval.num_thoughts = num_thoughts
    if config.data.kind == "documents":  # an NTP run: evaluate at the RLP prompt positions of the demo task
        config.data.kind = "prompts"
    tokenizer = build.tokenizer(config)
    corpus = build.corpus(config, Path(run_dir or hf_dir))
    held_out = build.eval_batches(config, corpus, tokenizer)
    if not held_out:
        raise ConfigError(f"corpus {corpus.name} gives no held-out positions (its validation split is missing or "
                          "empty); evaluate with a config whose data.validation_fraction or validation_corpus makes one.")
    rcfg = build.rollout_config(config, tokenizer, config.eval.num_thoughts)
    result = eval_lib.evaluate(graphdef, params, baselines, held_out, rcfg, jax.random.key(config.seed + 12345),
                               decode=tokenizer.decode, show_thoughts=config.eval.show_thoughts)
    result["num_positions_asked"] = config.eval.num_positions
    if note := build.eval_note(config, corpus, held_out):
        result["note"] = note
    return result


def to_markdown(result: dict, title: str) -> str:
    rows = [("gain_start", "information gain vs the start model (nats)"),
            ("gain_self", "information gain vs the same model without a thought (nats)"),
            ("nll_think", "NLL per target token, sampled thought"),
            ("nll_no_think", "NLL per target token, no thought"),
            ("acc_greedy_think", "exact match, greedy thought"), ("acc_think", "exact match, sampled thought"),
            ("acc_no_think", "exact match, no thought")]
    lines = [f"# {title}", "", f"{result['num_positions']} held-out positions; mean ± standard error."
             + (f" Note: {result['note']}." if result.get("note") else ""), "",
             "| metric | value |", "|---|---|"]
    for name, label in rows:
        if name in result:
            lines.append(f"| {label} | {result[name]:.4f} ± {result[name + '_se']:.4f} |")
    lines += [f"| thought length mean / p50 / p90 / max | {result['thought_len_mean']:.1f} / "
              f"{result['thought_len_p50']:.0f} / {result['thought_len_p90']:.0f} / {result['thought_len_max']} |",
              f"| truncated thoughts | {result['truncated_frac']:.3f} |", ""]
    if result.get("samples"):
        lines += ["| context | thought | true | predicted |", "|---|---|---|---|"]
        lines += [f"| `{s['context']}` | `{s['thought']}` | `{s['target']}` | `{s['predicted']}` |"
                  for s in result["samples"]]
    return "\n".join(lines) + "\n"
