"""The training loop: data → step → metrics / evaluation / benchmarks / checkpoints. Side effects
live here.

`train(config, workdir)` runs the same on one CPU, one GPU host, or every host of a slice.
Rerunning it on the same workdir resumes from the newest readable checkpoint (state, data
iterator position, rng), so an interrupted run ends with the same weights as an uninterrupted one.
SIGTERM (preemption) saves a checkpoint and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from rlp_jax import batch as batch_lib
from rlp_jax import build
from rlp_jax import checkpoint as ckpt_lib
from rlp_jax import config as config_lib
from rlp_jax import evaluate as eval_lib
from rlp_jax import executable as executable_lib
from rlp_jax import rpt_positions
from rlp_jax import sharding
from rlp_jax.metrics_io import MetricsWriter

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run had to stop; the message says why and what the last checkpoint is."""


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass
class RunResult:
    workdir: Path
    final_step: int
    stopped_by_signal: bool
    evals: list[dict]
    benchmarks: list[dict] = dataclasses.field(default_factory=list)  # {"step", **scores} (bench.jsonl)


def _print(text: str) -> None:
    print(text, flush=True)  # progress reaches a pipe (a log file, a test) as it happens


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, echo: Callable[[str], None] = _print,
          stop_after: int | None = None, force_new: bool = False, executable: str | Path | None = None) -> RunResult:
    """Trains to `train.steps` (resuming if `workdir` holds checkpoints of this same run).

    A workdir that holds another run (a different config, model, corpus or tokenizer) is refused
    with a ConfigError; `force_new` moves that run to WORKDIR/archive/ first. `stop_after` ends
    the run early after that many steps of THIS invocation (tests use it to simulate an
    interruption); it saves a checkpoint first, like SIGTERM. `executable`: a folder of
    `rlp-jax compile --save-executable`, whose train step runs instead of one compiled here (refused
    with a ConfigError, before the workdir is touched, unless it is this run's very program).
    """
    t_start = time.perf_counter()
    if executable is not None:
        executable_lib.read_manifest(executable)  # a missing folder or another JAX is refused at once
    run = ckpt_lib.RunDir(workdir)
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    if not str(config.data.corpus).strip():  # the paper configs leave it for the user to set
        raise config_lib.ConfigError("data.corpus is empty; pass --corpus PATH (text files, a folder or a glob) or "
                                     "set --config.data.corpus to 'demo' or a built corpus directory.")
    tokenizer = build.tokenizer(config)
    model_config = build.model_config(config, tokenizer)
    step_cfg = build.step_config(config, tokenizer)
    if config.data.kind == "prompts":
        build.position_config(config)
    do_eval = config.rlp.objective != "ntp" and config.data.kind == "prompts" and config.eval.num_positions > 0
    eval_rollout = build.rollout_config(config, tokenizer, config.eval.num_thoughts) if do_eval else None
    learning_rate = build.learning_rate_schedule(config.train, build.updates_per_step(config))
    rules = build.rules(config)

    from rlp_jax import preflight
    from rlp_jax.data.corpus import removed_if_refused
    from rlp_jax.data.tokenizer import tokenizer_fingerprint
    from rlp_jax.models import convert

    model_json = convert.config_to_json(model_config)
    identity = ckpt_lib.run_identity(config.to_dict(), json.loads(model_json), build.corpus_fingerprint(config),
                                     tokenizer_fingerprint(tokenizer))
    preflight.check_tokenizer(config, tokenizer)
    preflight.check_benchmarks(config)
    if rpt_positions.enabled(config):
        rpt_positions.proxy_source(config)  # a proxy path that is no model is refused before the workdir is touched
    do_bench = bool(tuple(config.eval.benchmark_tasks))
    binding = run.bind(identity, force_new)  # refuses another run's workdir before anything is written
    memory_note = preflight.check_memory(config, model_config, mesh_shape, len(step_cfg.rollout.prompt_suffix_ids))
    mesh = sharding.make_mesh(mesh_shape, config.mesh.axes)
    program = build.train_program(config, model_config, tokenizer, mesh)
    saved_step = None if executable is None else executable_lib.load(executable, program.lower(), mesh.devices.flat)
    per_process = config.train.batch_size // jax.process_count()
    if binding == "other":
        echo(f"moved the run that was in {run.path} to {run.archive_run()}")
    with removed_if_refused(run.path):  # a corpus refused here leaves no workdir behind
        corpus = build.corpus(config, run.path)
        preflight.check_corpus(config, corpus, tokenizer)
    echo(_corpus_line(corpus))
    if memory_note:
        log.info(memory_note)
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_identity(identity)  # the inputs are good: the workdir now belongs to this run
    run.model_config.write_text(model_json)
    run.config.write_text(config.to_json(indent=2))
    graphdef, abstract, shardings, make_state = (program.graphdef, program.abstract_state,
                                                 program.state_shardings, program.make_state)
    keep_positions = None
    if rpt_positions.enabled(config):  # RPT's hard positions, scored once by the proxy before any step
        keep_positions = rpt_positions.hard_positions_for_run(config, run.path, corpus, tokenizer,
                                                              lambda: make_state().params, graphdef, echo)
    train_iter = build.batches(config, corpus, tokenizer, "train", per_process, keep_positions=keep_positions)
    checkpointer = ckpt_lib.Checkpointer(run.checkpoints, keep=config.checkpoint.keep)
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(abstract, shardings))
    if restored is not None:
        start_step, state, data_state = restored
        train_iter.set_state(data_state["train"])
        echo(f"resumed from step {start_step} in {checkpointer.directory}")
    else:
        start_step, state = 0, make_state()
    if jax.process_index() == 0:
        _cut_history(run.path, start_step, config.train.steps)

    start_params = _start_params(run, state, shardings, restored is not None) if do_eval else None
    held_out = build.eval_batches(config, corpus, tokenizer) if do_eval else []
    if do_eval and (note := build.eval_note(config, corpus, held_out)):
        echo(f"eval: {note}")
    writer = MetricsWriter(run.path, config.train.steps, echo, purge_step=start_step + 1)
    evaluate = lambda step: _run_eval(graphdef, state, start_params, held_out, eval_rollout, config, tokenizer,
                                      mesh, rules, step, writer, echo)
    bench = None
    if do_bench:  # benchmark accuracy (rlp_jax.benchmarks.training): bench.jsonl, bench_samples.jsonl, bench.png
        from rlp_jax.benchmarks.training import PeriodicBenchmark

        bench = PeriodicBenchmark(config, run.path, mesh, rules, writer, echo)
    benchmark = lambda step: benchmarks.append(bench.run(graphdef, state.params, step))

    step_fn = None
    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True)) \
        if _in_main_thread() else None
    evals: list[dict] = []
    benchmarks: list[dict] = []
    step = start_step
    config_json = config.to_json()
    pending: list[dict] = []
    try:
        if do_eval and start_step == 0:
            evals.append(evaluate(0))
        if do_bench and start_step == 0:
            benchmark(0)
        if step < config.train.steps:
            echo(f"training steps {step + 1}–{config.train.steps} (SIGTERM saves a checkpoint and stops)")
        steps_this_run = 0
        while step < config.train.steps:
            local = batch_lib.step_fields(next(train_iter))
            if step_fn is None:
                step_fn = _checked_step(program, config, saved_step)
            state, metrics = step_fn(state, sharding.global_batch(local, program.batch_shardings))
            step += 1
            steps_this_run += 1
            pending.append(metrics)
            last = step == config.train.steps
            if jax.process_count() > 1:  # every process must stop at the same step (collective save)
                from jax.experimental import multihost_utils

                stop["signal"] = bool(multihost_utils.process_allgather(np.array(stop["signal"])).any())
            interrupted = stop["signal"] or (stop_after is not None and steps_this_run >= stop_after)
            if step % config.train.log_every == 0 or last or interrupted:
                host = [jax.device_get(m) for m in pending]
                pending.clear()
                for offset, m in enumerate(host):
                    done = step - len(host) + offset  # steps finished before this one
                    m = {k: float(v) for k, v in m.items()} | {"data_" + k: v for k, v in train_iter.stats.items()}
                    m["learning_rate"] = float(learning_rate(done * build.updates_per_step(config)))
                    if m.get("nonfinite_skipped", 0) > 0 and config.train.on_nonfinite == "stop":
                        raise TrainingError(f"step {step - len(host) + offset + 1} had a non-finite loss or gradient "
                                            f"(train.on_nonfinite='stop'); the update was not applied and the "
                                            f"last checkpoint is step {max(checkpointer.steps(), default=0)}.")
                    writer.write(step - len(host) + offset + 1, m)
                writer.progress(step, host[-1], _tokens_per_step(host[-1]))
            if do_eval and config.eval.every_steps and step % config.eval.every_steps == 0 and not last:
                evals.append(evaluate(step))
            every = config.eval.benchmark_every_steps
            if do_bench and every and step % every == 0 and not last:
                benchmark(step)
            if step % config.checkpoint.every_steps == 0 or last or interrupted:
                checkpointer.save(step, state, {"train": train_iter.get_state()}, config_json)
            if interrupted:
                checkpointer.wait()
                echo(f"stopped at step {step} ({'SIGTERM' if stop['signal'] else 'stop_after'}); "
                     f"checkpoint saved — rerun the same command to resume")
                return RunResult(run.path, step, True, evals, benchmarks)
        if do_eval:
            evals.append(evaluate(step))
        if do_bench:
            benchmark(step)
        checkpointer.wait()
        totals = _write_summary(run.path, step, evals, benchmarks) if jax.process_index() == 0 else {}
        echo(_summary_line(run, step, time.perf_counter() - t_start, evals, totals, benchmarks))
        return RunResult(run.path, step, False, evals, benchmarks)
    finally:
        checkpointer.close()
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _checked_step(program: build.TrainProgram, config, saved_step=None):
    """The step to run: `saved_step` (a loaded `rlp-jax compile --save-executable`), or on an
    accelerator the step compiled here, before the first step. On an accelerator the compiler's
    count of what it holds on a device is checked against the device's free memory (a step that
    cannot fit ends in one sentence, not an out-of-memory crash minutes later)."""
    from rlp_jax import preflight

    on_accelerator = build.platform_of(program.mesh) != "cpu" and config.train.check_memory
    if saved_step is None and not on_accelerator:
        return program.step
    compiled = program.lower().compile() if saved_step is None else saved_step
    if on_accelerator:
        note = preflight.check_compiled_memory(compiled, config)
        if note:
            log.info(note)

    def step(state, batch):
        with jax.set_mesh(program.mesh), nnx.logical_axis_rules(program.rules):
            return compiled(state, batch)

    return step


def _cut_history(workdir: Path, start_step: int, total_steps: int) -> None:
    """Drops what a killed run logged after its last checkpoint, so that a resumed run's history
    has every step once. Evaluations at `start_step` are kept, except the ones it will redo: the
    first (step 0) and the final one."""
    from rlp_jax import metrics_io

    metrics_io.keep_steps(workdir / "metrics.jsonl", lambda s: s <= start_step)
    redo = start_step in (0, total_steps)
    for name in ("eval.jsonl", "eval_samples.jsonl", "bench.jsonl", "bench_samples.jsonl"):
        metrics_io.keep_steps(workdir / name, lambda s: s < start_step or (s == start_step and not redo))


def _corpus_line(corpus) -> str:
    sizes = ", ".join(f"{corpus.num_documents(split):,} {split}" for split in corpus.splits)
    stats = corpus.build_stats
    dropped = {k.removeprefix("dropped_"): v for k, v in stats.items() if k.startswith("dropped_") and v}
    return (f"corpus {corpus.name}: {sizes} documents"
            + (f" (dropped: {', '.join(f'{v} {k}' for k, v in dropped.items())})" if dropped else ""))


# Per-step counts that a run summary adds up (train_step.processed_tokens; `tokens` for NTP).
TOTALED = ("flop_tokens", "context_tokens", "thought_tokens", "target_tokens", "tokens", "num_prompts")


def _write_summary(workdir: Path, step: int, evals: list[dict], benchmarks: list[dict] = ()) -> dict:
    """WORKDIR/summary.json: the steps done, every counted quantity summed over metrics.jsonl
    (each step once: a resumed run's history is cut at its checkpoint), the last evaluation and
    the last benchmark scores."""
    from rlp_jax import metrics_io

    totals = metrics_io.summed(workdir / "metrics.jsonl", TOTALED)
    summary = {"steps": step, "totals": totals,
               "last_eval": {k: v for k, v in evals[-1].items() if k != "samples"} if evals else None}
    if benchmarks:
        summary["last_bench"] = benchmarks[-1]
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return totals


def _summary_line(run: ckpt_lib.RunDir, step: int, seconds: float, evals: list[dict], totals: dict,
                  benchmarks: list[dict] = ()) -> str:
    counted = f", {totals['flop_tokens']:,.0f} tokens of compute (T_flop)" if "flop_tokens" in totals else ""
    parts = [f"done: step {step} in {seconds:.0f} s{counted}; in {run.path}: checkpoints/, metrics.jsonl, summary.json"]
    if evals:
        last = evals[-1]
        parts.append("eval.jsonl" + (f" (held-out gain vs start {last['gain_start']:+.3f} nats)"
                                     if "gain_start" in last else ""))
    if benchmarks:
        parts.append("bench.jsonl, bench_samples.jsonl, bench.png")
    return ", ".join(parts) + f"; export with: rlp-jax export --workdir {run.path} --out {run.path / 'hf'}"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _tokens_per_step(metrics: dict) -> float:
    return float(metrics.get("tokens", metrics.get("thought_tokens", 0.0)))


def _start_params(run: ckpt_lib.RunDir, state, shardings, resumed: bool):
    """θ_0, kept (and saved once in WORKDIR/start_params) for the gain against the start."""
    if resumed and run.start_params.exists():
        return run.restore_start_params(ckpt_lib.abstract_like(state.params, shardings.params))
    params = jax.tree.map(jnp.copy, state.params)
    if not run.start_params.exists():
        run.save_start_params(params)
    return params


def _run_eval(graphdef, state, start_params, held_out, rcfg, config, tokenizer, mesh, rules, step, writer, echo):
    t0 = time.perf_counter()
    result = eval_lib.evaluate(graphdef, state.params, {"ema": state.ema_params, "start": start_params},
                               held_out, rcfg, jax.random.key(config.seed + 12345),
                               decode=tokenizer.decode, show_thoughts=config.eval.show_thoughts, mesh=mesh,
                               rules=rules)
    result["step"] = step
    writer.write(step, {k: v for k, v in result.items() if k != "samples"}, file="eval.jsonl")
    if writer.enabled:
        with open(writer.workdir / "eval_samples.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "samples": result.get("samples", [])}) + "\n")
    echo(f"eval @ {step}: gain vs EMA {result['gain_ema']:+.3f} ± {result['gain_ema_se']:.3f}, vs start "
         f"{result['gain_start']:+.3f} ± {result['gain_start_se']:.3f} nats; acc think "
         f"{result['acc_greedy_think']:.1%} / no think {result['acc_no_think']:.1%}; "
         f"thought len {result['thought_len_mean']:.1f} ({result['num_positions']} positions, "
         f"{time.perf_counter() - t0:.0f}s)")
    return result
