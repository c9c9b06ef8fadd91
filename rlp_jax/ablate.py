"""`rlp-jax ablate`: the paper's key ablations at toy scale, on a demo task.

Every cell starts from the same NTP warm-up of its seed, runs for a matched budget, and is
evaluated on the same held-out positions against the same start model. Cells run one after
another with resumable checkpoints; a finished cell (it has `eval.json`) is not rerun, and a cell
whose run another grid already finished with the same settings (the `cpt` grid's RLP cell is the
`reward` grid's dense one) reads that run.

Layout: ROOT/warmup-s{seed}/, ROOT/<grid>/<cell>/s{seed}/{train run, eval.json},
ROOT/<grid>/table.md and <grid>.png, where ROOT is WORKDIR for the `addition` task and
WORKDIR/<task> for the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable

import ml_collections
import numpy as np

from rlp_jax.configs import demo as demo_configs
from rlp_jax.data.demo_corpus import DEMO_VARIANTS, plain_document_chars


def t_flop(n_rollouts: int, l_seq: int, batch_size: int, iters: int, t_inp: int) -> int:
    """The paper's compute accounting: `T_flop = n × l_seq × bs × iters + T_inp` (token-FLOP units)."""
    return n_rollouts * l_seq * batch_size * iters + t_inp


def rlp_token_budget(config: ml_collections.ConfigDict, suffix_len: int = 0) -> int:
    """T_flop of an RLP (or RPT) run with every length at its maximum: G rollouts per prompt of
    `train_step.rollout_flop_tokens` (full context, a thought cut at L and its forced `</think>`,
    RPT's prediction, the K targets), plus each prompt's `train_step.input_flop_tokens`."""
    from rlp_jax import train_step

    r, K, C = config.rlp, config.data.target_len, config.data.max_context
    prediction = r.rpt_prediction_len if r.objective == "rpt" else 0
    l_seq = train_step.rollout_flop_tokens(C, r.max_thought_len + prediction, 1, K, suffix_len)
    t_inp = config.train.batch_size * train_step.input_flop_tokens(C, K) * config.train.steps
    return t_flop(r.num_rollouts, l_seq, config.train.batch_size, config.train.steps, t_inp)


def ntp_steps_for_budget(budget_tokens: int, batch_size: int, tokens_per_document: int) -> int:
    """NTP steps whose tokens (`batch × document length` per step) match an RLP run's T_flop."""
    return max(1, math.ceil(budget_tokens / (batch_size * tokens_per_document)))


@dataclasses.dataclass(frozen=True)
class Cell:
    name: str
    overrides: dict  # "section.key" -> value on the demo RLP config
    # A compute-matched cell: the name of the cell (run first, same seed) whose processed T_flop
    # (the sum of its per-step `flop_tokens`) sets this cell's `train.steps`.
    matched_to: str | None = None


def plain_document_tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens of one plain document of the config's demo corpus, BOS and EOS included:
    `457+386=843` is 13, a 6-digit `471596+215403=687000` is 22, `lrolrrolol=3` 14."""
    return plain_document_chars(DEMO_VARIANTS[config.data.demo_variant]) + 2


_CPT_BATCH = 64


def _cpt_cell(base: ml_collections.ConfigDict, multiple: float, name: str, matched_to: str) -> Cell:
    """NTP on the same plain documents; its steps are set from `matched_to`'s processed T_flop at
    run time (the maximum-length budget below only when that run logged no counts)."""
    budget = int(rlp_token_budget(base) * multiple)
    doc_tokens = plain_document_tokens(base)
    return Cell(name, {"rlp.objective": "ntp", "data.kind": "documents",
                       "data.seq_len": -(-doc_tokens // 8) * 8,
                       "train.batch_size": _CPT_BATCH, "train.learning_rate": 1e-4,
                       "train.steps": ntp_steps_for_budget(budget, _CPT_BATCH, doc_tokens),
                       "eval.num_positions": 0, "checkpoint.every_steps": 10_000}, matched_to=matched_to)


def measured_flop_tokens(run_dir: Path) -> float | None:
    """A finished run's T_flop from what it processed: its per-step `flop_tokens` summed over
    metrics.jsonl (each step once), or None for a run that did not log them."""
    from rlp_jax import metrics_io

    return metrics_io.summed(Path(run_dir) / "metrics.jsonl", ("flop_tokens",)).get("flop_tokens")


GRID_NAMES = ("reward", "rollouts", "thought_len", "kl", "cpt")


def grids(base: ml_collections.ConfigDict) -> dict[str, list[Cell]]:
    G, B = base.rlp.num_rollouts, base.train.batch_size
    thoughts = G * B  # rollouts grid keeps sampled thoughts per step fixed
    return {
        "reward": [Cell("dense (RLP)", {"rlp.objective": "rlp"}),
                   Cell("sparse (RPT)", {"rlp.objective": "rpt"})],
        "rollouts": [Cell(f"G={g}", {"rlp.num_rollouts": g, "train.batch_size": thoughts // g})
                     for g in (2, 4, 8)],
        "thought_len": [Cell(f"L={n}", {"rlp.max_thought_len": n}) for n in (6, 12, 20, 32)],
        "kl": [Cell(f"beta={b:g}", {"rlp.kl_coef": b}) for b in (0.0, 1e-4, 1e-3)],
        "cpt": [Cell("RLP", {}), _cpt_cell(base, 1.0, "CPT, equal T_flop", matched_to="RLP")],
    }


def _apply(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def _leaves(tree: dict, prefix: str = "") -> dict:
    """`{"a.b": value}` for every leaf of a nested config dict."""
    out = {}
    for key, value in tree.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


def _finished_elsewhere(root: Path, grid: str, config: ml_collections.ConfigDict, seed: int,
                        all_grids: dict) -> Path | None:
    """A finished run of another grid's cell, same seed, that ran `config`: every setting its
    saved config.json has equals `config`'s (keys added to the config since that run took their
    defaults, as a workdir's identity treats them), if any."""
    want = _leaves(json.loads(config.to_json()))
    for other, cells in all_grids.items():
        for twin in cells:
            run_dir = root / other / _slug(twin.name) / f"s{seed}"
            if other == grid or twin.matched_to is not None or not (run_dir / "eval.json").exists():
                continue
            saved = _leaves(json.loads((run_dir / "config.json").read_text()))
            if all(want.get(key, value) == value for key, value in saved.items()) and saved.keys() <= want.keys():
                return run_dir
    return None


def benchmark_numbers(run_dir: Path, task: str, items: int) -> dict:
    """A finished cell's benchmark numbers on the task's held-out problems, as `rlp-jax evaluate`
    reports them for real suites: the whole answer's pass@1 over 4 samples at temperature 1 (the
    demo's sampling temperature) and its greedy accuracy, for the first `items` problems."""
    from rlp_jax.benchmarks import runner

    settings = runner.Settings(math_samples=4, math_greedy=True, temperature=1.0, top_p=1.0,
                               limit=items, batch_size=64)
    numbers = runner.evaluate_run_dir(run_dir, [f"demo_{task}"], settings)["tasks"][f"demo_{task}"]
    return {"bench_pass@1": numbers["pass@1"], "bench_greedy": numbers["greedy"],
            "bench_items": items}


def run_grid(grid: str, workdir: str | Path, *, task: str = "addition", seeds=(0, 1),
             steps: int | None = None, warmup_steps: int | None = None,
             eval_positions: int | None = None, benchmark_items: int = 256,
             echo: Callable[[str], None] = print) -> dict:
    """Runs every cell × seed of `grid` on demo task `task` not yet finished, then writes the
    table and plot. `benchmark_items` > 0 adds each cell's benchmark numbers
    (`benchmark_numbers`, kept in the cell's `bench.json`) to the table."""
    from rlp_jax import evaluation_run, trainer

    workdir = Path(workdir).absolute()
    workdir = workdir if task == "addition" else workdir / task
    warm_base, base = demo_configs.stages(task)
    default_eval_positions = base.eval.num_positions
    if steps is not None:
        base.train.steps = steps
    base.eval.every_steps = 0
    base.eval.num_positions = 0  # cells are evaluated uniformly below
    base.checkpoint.every_steps = max(base.train.steps // 2, 1)
    base.data.data_dir = str(workdir / "data")
    all_grids = grids(base)
    cells = all_grids.get(grid)
    if cells is None:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(all_grids)}.")
    results: dict[str, list[dict]] = {}
    for seed in seeds:
        warm = _apply(warm_base, {})
        warm.seed = seed
        warm.data.data_dir = base.data.data_dir
        if warmup_steps is not None:
            warm.train.steps = warm.checkpoint.every_steps = warmup_steps
        warm_dir = workdir / f"warmup-s{seed}"
        if not (warm_dir / "checkpoints" / str(warm.train.steps)).exists():
            echo(f"warm-up, seed {seed}")
            trainer.train(warm, warm_dir, echo=echo)
        eval_config = _apply(base, {})
        eval_config.seed = seed
        eval_config.eval.num_positions = eval_positions or default_eval_positions

        def evaluated(run_dir: Path) -> dict:
            eval_file = run_dir / "eval.json"
            if not eval_file.exists():
                result = evaluation_run.evaluate_run(run_dir, config=eval_config, start_from=warm_dir)
                eval_file.write_text(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
            numbers = json.loads(eval_file.read_text())
            bench_file = run_dir / "bench.json"
            if benchmark_items and not (bench_file.exists() and
                                        json.loads(bench_file.read_text())["bench_items"] == benchmark_items):
                bench_file.write_text(json.dumps(benchmark_numbers(run_dir, task, benchmark_items), indent=2))
            return numbers | (json.loads(bench_file.read_text()) if benchmark_items else {})

        # The reference row: the warm-up itself, the point every cell of this seed starts from.
        results.setdefault(START_ROW, []).append(evaluated(warm_dir))
        matched_dirs: dict[str, Path] = {}
        for cell in cells:
            run_dir = workdir / grid / _slug(cell.name) / f"s{seed}"
            config = _apply(base, cell.overrides)
            config.seed = seed
            config.init.kind, config.init.path = "checkpoint", str(warm_dir)
            twin = None if (run_dir / "eval.json").exists() or cell.matched_to else (
                _finished_elsewhere(workdir, grid, config, seed, all_grids))
            if twin is not None:
                echo(f"{grid} / {cell.name} / seed {seed}: the same run as {twin.relative_to(workdir)}")
                run_dir = twin
            if not (run_dir / "eval.json").exists():
                if cell.matched_to is not None:
                    budget = measured_flop_tokens(matched_dirs[cell.matched_to])
                    if budget is not None:
                        config.train.steps = ntp_steps_for_budget(int(budget), _CPT_BATCH,
                                                                  plain_document_tokens(base))
                        echo(f"{cell.name}: {budget:,.0f} processed tokens of {cell.matched_to} → "
                             f"{config.train.steps} NTP steps")
                echo(f"{grid} / {cell.name} / seed {seed}: {config.train.steps} steps")
                trainer.train(config, run_dir, echo=echo)
            matched_dirs[cell.name] = run_dir
            results.setdefault(cell.name, []).append(evaluated(run_dir))
    table = summary_table(grid, results)
    (workdir / grid / "table.md").write_text(table)
    _plot(grid, results, workdir / grid / f"{grid}.png")
    echo(table)
    return results


START_ROW = "start (NTP warm-up)"

METRICS = (("gain_start", "gain vs start (nats)"), ("acc_greedy_think", "acc, greedy thought"),
           ("acc_no_think", "acc, no thought"), ("nll_no_think", "NLL, no thought"),
           ("bench_pass@1", "answer pass@1 (4 samples, T=1)"), ("bench_greedy", "answer, greedy"))


def summary_table(grid: str, results: dict[str, list[dict]]) -> str:
    """Markdown: per cell, the mean over seeds and the spread (min–max) of each metric that every
    run has."""
    shown = [(name, label) for name, label in METRICS
             if all(name in r for runs in results.values() for r in runs)]
    head = "| cell | seeds | " + " | ".join(label for _, label in shown) + " |"
    lines = [f"### grid `{grid}`", "", head, "|---|---|" + "---|" * len(shown)]
    for cell, runs in results.items():
        cells = []
        for name, _ in shown:
            values = np.array([r[name] for r in runs], float)
            cells.append(f"{values.mean():+.3f} [{values.min():+.3f}, {values.max():+.3f}]")
        lines.append(f"| {cell} | {len(runs)} | " + " | ".join(cells) + " |")
    compared = [cell for cell in results if cell != START_ROW]
    if len(compared) >= 2 and len(results[compared[0]]) >= 2:
        first = compared[0]
        lines += ["", f"Paired by seed, `{first}` minus each other cell: mean difference [95% t-interval]", "",
                  "| difference | seeds | " + " | ".join(label for _, label in shown) + " |",
                  "|---|---|" + "---|" * len(shown)]
        for cell in compared[1:]:
            n = min(len(results[first]), len(results[cell]))
            cells = []
            for name, _ in shown:
                mean, low, high = paired_interval([r[name] for r in results[first][:n]],
                                                  [r[name] for r in results[cell][:n]])
                cells.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]")
            lines.append(f"| {first} − {cell} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Two-sided 95% quantiles of Student's t by degrees of freedom (df > 30: the normal's 1.960).
_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
          11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
          20: 2.086, 25: 2.060, 30: 2.042}


def paired_interval(a, b) -> tuple[float, float, float]:
    """The mean of the per-seed differences `a − b` and its 95% t-interval (n − 1 degrees of
    freedom, the sample standard deviation); n ≥ 2."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n < 2:
        raise ValueError("a paired interval needs at least 2 seeds.")
    df = n - 1
    t = _T_975.get(df) or (1.960 if df > 30 else _T_975[max(k for k in _T_975 if k <= df)])
    half = t * d.std(ddof=1) / np.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def _slug(name: str) -> str:
    return re.sub(r"[^\w=.-]+", "_", name).strip("_")


def _plot(grid: str, results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    # Accuracy without a thought is the `cpt` grid's measure for its NTP cell.
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for ax, (metric, label) in zip(axes, METRICS[:3]):
        for i, name in enumerate(names):
            values = [r[metric] for r in results[name]]
            ax.scatter([i] * len(values), values, color="tab:blue", alpha=0.6)
            ax.plot([i - 0.2, i + 0.2], [np.mean(values)] * 2, color="black")
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_title(label)
        if metric.startswith("acc"):
            ax.set_ylim(-0.03, 1.03)  # one scale for both accuracies, so chance looks like chance
    fig.suptitle(f"ablation: {grid} (dots: seeds, bars: mean)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
