"""The training loop: data → step → metrics / evaluation / checkpoints. Side effects live here.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from rlp_jax import checkpoint as ckpt_lib
from rlp_jax import config as config_lib
from rlp_jax import evaluate as eval_lib
from rlp_jax import rollouts, sharding
from rlp_jax import train_step as ts
from rlp_jax.metrics_io import MetricsWriter
from rlp_jax.models.config import ModelConfig, preset
from rlp_jax.rollouts import RolloutConfig

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "model_config.json"


class TrainingError(RuntimeError):
    """The run had to stop; the message says why and what the last checkpoint is."""


# ---------------------------------------------------------------- config → objects

def build_tokenizer(config):
    from rlp_jax import data

    return data.load_tokenizer(config.tokenizer)


def build_model_config(config, tokenizer) -> ModelConfig:
    overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat)
    if config.init.kind == "hf":
        from rlp_jax.models import hf

        hf_json = json.loads((Path(config.init.path) / "config.json").read_text())
        model_config = hf.config_from_hf(hf_json, **overrides)
    elif config.init.kind == "params":
        from rlp_jax.models import convert

        text = (Path(config.init.path) / convert.CONFIG_FILE).read_text()
        model_config = convert.config_from_json(text).replace(**overrides)
    elif config.init.kind == "checkpoint":
        text = (Path(config.init.path) / MODEL_CONFIG_FILE).read_text()
        from rlp_jax.models import convert

        model_config = convert.config_from_json(text).replace(**overrides)
    else:
        vocab = config.model.vocab_size or tokenizer.vocab_size
        model_config = preset(config.model.preset, vocab_size=vocab, **overrides)
    if model_config.vocab_size < tokenizer.vocab_size:
        raise config_lib.ConfigError(f"the model's vocabulary ({model_config.vocab_size}) is smaller than the "
                                     f"tokenizer's ({tokenizer.vocab_size}); use the model's own tokenizer.")
    return model_config


def build_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    schedule = (optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps) if t.warmup_steps
                else optax.constant_schedule(t.learning_rate))
    if t.warmup_steps:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(t.learning_rate)], [t.warmup_steps])
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    chain.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
    return optax.chain(*chain)


def build_rollout_config(config, tokenizer) -> RolloutConfig:
    r = config.rlp
    template = tuple(tokenizer.encode(r.prompt_template)) if r.prompt_template else ()
    return RolloutConfig(
        think_open_id=tokenizer.think_open_id, think_close_id=tokenizer.think_close_id,
        num_rollouts=max(r.num_rollouts, 2), max_thought_len=r.max_thought_len,
        min_thought_len=r.min_thought_len, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
        prompt_suffix_ids=template, pad_id=tokenizer.pad_id,
        mask_markers_in_scoring=r.mask_markers_in_scoring)


def build_step_config(config, tokenizer) -> ts.StepConfig:
    r = config.rlp
    return ts.StepConfig(
        rollout=build_rollout_config(config, tokenizer), objective=r.objective, eps_low=r.eps_low,
        eps_high=r.eps_high, kl_coef=r.kl_coef, kl_estimator=r.kl_estimator, ema_decay=r.ema_decay,
        ppo_epochs=r.ppo_epochs, num_minibatches=r.num_minibatches, grad_accum_steps=r.grad_accum_steps,
        rollout_microbatches=r.rollout_microbatches, head_chunk_len=r.head_chunk_len, skip_nonfinite=True)


def build_corpus(config, workdir: Path):
    """The configured corpus; in a multi-host run process 0 builds it while the others wait."""
    if jax.process_count() == 1:
        return _build_corpus(config, workdir)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        corpus = _build_corpus(config, workdir)
    multihost_utils.sync_global_devices("rlp_jax corpus built")
    return corpus if jax.process_index() == 0 else _build_corpus(config, workdir)


def _build_corpus(config, workdir: Path):
    from rlp_jax import data

    d = config.data
    data_dir = Path(d.data_dir) if d.data_dir else workdir / "data"
    if d.corpus == "demo":
        return data.build_demo_corpus(str(data_dir), d.demo_variant, seed=config.seed)
    if Path(d.corpus).is_dir() and (Path(d.corpus) / "dataset_info.json").exists():
        return data.open_corpus(d.corpus)
    paths = [p.strip() for p in d.corpus.split(",") if p.strip()]
    return data.build_local_corpus(paths, str(data_dir), name="corpus", text_field=d.text_field)


def build_batches(config, corpus, tokenizer, split: str, batch_size: int, *, num_epochs=None,
                  pad_final_batch=False, shuffle=True, seed_offset=0, whole_split=False):
    """Batches of this process's shard of `split`, or of the whole split (`whole_split`: every
    process reads the same batches, as held-out evaluation needs)."""
    from rlp_jax import data

    d = config.data
    common = dict(batch_size=batch_size, seed=config.seed + seed_offset, num_epochs=num_epochs,
                  shuffle_documents=shuffle, shuffle_window=d.shuffle_window if shuffle else 0,
                  pad_final_batch=pad_final_batch)
    layout = dict(process_index=0, process_count=1) if whole_split else {}
    if d.kind == "documents":
        return data.document_batches(corpus, split, tokenizer,
                                     data.DocumentBatchConfig(seq_len=d.seq_len, **common), **layout)
    positions = data.PositionConfig(
        d.strategy, d.positions_per_document or None, stride=d.stride, min_context=d.min_context,
        marked_kinds=tuple(d.marked_kinds) or None)
    return data.prompt_batches(corpus, split, tokenizer, data.PromptBatchConfig(
        max_context=d.max_context, target_len=d.target_len, positions=positions, **common), **layout)


def eval_batches(config, corpus, tokenizer) -> list[dict]:
    """The fixed held-out prompt batches (validation split, in order, same at every evaluation
    and on every process), on the host."""
    if config.data.kind == "documents":
        return []
    iterator = build_batches(config, corpus, tokenizer, "validation", config.eval.batch_size,
                             num_epochs=1, pad_final_batch=True, shuffle=False, seed_offset=1,
                             whole_split=True)
    out, count = [], 0
    for batch in iterator:
        out.append({k: np.asarray(v) for k, v in rollouts.from_prompt_batch(batch).items()})
        count += int(batch["example_mask_B"].sum())
        if count >= config.eval.num_positions:
            break
    return out


# ---------------------------------------------------------------- state

def _params_from_workdir(workdir: Path) -> dict:
    """The newest checkpoint's params of another run, as a pure dict (host arrays)."""
    steps = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=1000).steps()
    if not steps:
        raise config_lib.ConfigError(f"{workdir} has no checkpoint to start from; point init.path at a "
                                     "finished run's workdir.")
    path = workdir / "checkpoints" / str(steps[-1]) / "state"
    tree = ocp.StandardCheckpointer().restore(path)
    return _unwrap_values(tree["params"])


def _unwrap_values(tree):
    """A restored nnx.State comes back as nested dicts with each Param as {'value': array}."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree


def initial_state(config, model_config: ModelConfig, optimizer, mesh):
    """(graphdef, abstract state, shardings, make_state) for init.kind."""
    with_reference = config.rlp.kl_coef > 0
    graphdef, abstract, shardings, init = ts.abstract_state_from_scratch(
        model_config, optimizer, config.seed, mesh, with_reference=with_reference)
    kind, path = config.init.kind, config.init.path
    if kind == "scratch":
        return graphdef, abstract, shardings, init

    def from_params():
        if kind == "hf":
            from rlp_jax.models import hf

            params = nnx.state(hf.load_hf(path, mesh=mesh, dtype=model_config.dtype,
                                          param_dtype=model_config.param_dtype, remat=model_config.remat), nnx.Param)
        else:
            if kind == "params":
                from rlp_jax.models import convert

                pure = nnx.to_pure_dict(nnx.state(convert.load_params(path), nnx.Param))
            else:
                pure = _params_from_workdir(Path(path))
            params = jax.tree.map(lambda x: x, abstract.params)  # a State to fill
            nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, pure))
            host = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype), params, abstract.params)
            params = jax.device_put(host, shardings.params)
        init_fn = lambda p: ts.init_state(p, optimizer, jax.random.key(config.seed), with_reference)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(sharding.DEFAULT_RULES):
            return jax.jit(init_fn, out_shardings=shardings)(params)

    return graphdef, abstract, shardings, from_params


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass
class RunResult:
    workdir: Path
    final_step: int
    stopped_by_signal: bool
    evals: list[dict]


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, echo: Callable[[str], None] = print,
          stop_after: int | None = None) -> RunResult:
    """Trains to `train.steps` (resuming if `workdir` holds checkpoints).

    `stop_after` ends the run early after that many steps of THIS invocation (tests use it to
    simulate an interruption); it saves a checkpoint first, like SIGTERM.
    """
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    if not str(config.data.corpus).strip():  # paper configs leave it for the user to set
        raise config_lib.ConfigError("data.corpus is empty; set --config.data.corpus to 'demo', a built "
                                     "corpus directory, or files of text.")
    tokenizer = build_tokenizer(config)
    model_config = build_model_config(config, tokenizer)
    step_cfg = build_step_config(config, tokenizer)
    optimizer = build_optimizer(config)
    mesh = sharding.make_mesh(mesh_shape, config.mesh.axes)
    per_process = config.train.batch_size // jax.process_count()

    from rlp_jax.models import convert

    (workdir / MODEL_CONFIG_FILE).write_text(convert.config_to_json(model_config))
    (workdir / "config.json").write_text(config.to_json(indent=2))
    corpus = build_corpus(config, workdir)
    train_iter = build_batches(config, corpus, tokenizer, "train", per_process)

    graphdef, abstract, shardings, make_state = initial_state(config, model_config, optimizer, mesh)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(abstract, shardings))
    if restored is not None:
        start_step, state, data_state = restored
        train_iter.set_state(data_state["train"])
        echo(f"resumed from step {start_step} in {checkpointer.directory}")
    else:
        start_step, state = 0, make_state()

    do_eval = config.rlp.objective != "ntp" and config.data.kind == "prompts" and config.eval.num_positions > 0
    start_params = _start_params(workdir, state, shardings, restored is not None) if do_eval else None
    held_out = eval_batches(config, corpus, tokenizer) if do_eval else []

    batch_sharding = None
    step_fn = None
    writer = MetricsWriter(workdir, config.train.steps, echo)
    stop = {"signal": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True)) \
        if _in_main_thread() else None
    evals: list[dict] = []
    step = start_step
    config_json = config.to_json()
    pending: list[dict] = []
    tokens_per_step = 0.0
    try:
        if do_eval and start_step == 0:
            evals.append(_run_eval(graphdef, state, start_params, held_out, step_cfg, config, tokenizer, mesh, 0, writer, echo))
        steps_this_run = 0
        while step < config.train.steps:
            local = _step_batch(next(train_iter))
            if step_fn is None:
                batch_sharding = ts.batch_shardings(local, mesh)
                step_fn = ts.compile_train_step(graphdef, optimizer, step_cfg, mesh, shardings, batch_sharding)
            state, metrics = step_fn(state, sharding.global_batch(local, batch_sharding))
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
                    m = {k: float(v) for k, v in m.items()} | {"data_" + k: v for k, v in train_iter.stats.items()}
                    if m.get("nonfinite_skipped", 0) > 0 and config.train.on_nonfinite == "stop":
                        raise TrainingError(f"step {step - len(host) + offset + 1} had a non-finite loss or gradient "
                                            f"(train.on_nonfinite='stop'); the update was not applied and the "
                                            f"last checkpoint is step {max(checkpointer.steps(), default=0)}.")
                    writer.write(step - len(host) + offset + 1, m)
                tokens_per_step = _tokens_per_step(host[-1], config)
                writer.progress(step, host[-1], tokens_per_step)
            if do_eval and config.eval.every_steps and step % config.eval.every_steps == 0 and not last:
                evals.append(_run_eval(graphdef, state, start_params, held_out, step_cfg, config, tokenizer, mesh, step, writer, echo))
            if step % config.checkpoint.every_steps == 0 or last or interrupted:
                checkpointer.save(step, state, {"train": train_iter.get_state()}, config_json)
            if interrupted:
                checkpointer.wait()
                echo(f"stopped at step {step} ({'SIGTERM' if stop['signal'] else 'stop_after'}); "
                     f"checkpoint saved — rerun the same command to resume")
                return RunResult(workdir, step, True, evals)
        if do_eval:
            evals.append(_run_eval(graphdef, state, start_params, held_out, step_cfg, config, tokenizer, mesh, step, writer, echo))
        checkpointer.wait()
        return RunResult(workdir, step, False, evals)
    finally:
        checkpointer.close()
        writer.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _step_batch(local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = rollouts.from_prompt_batch(local)
    keep = ("context_BxT", "context_len_B", "target_BxK", "target_mask_BxK", "example_mask_B",
            "tokens_BxT", "token_mask_BxT")
    return {k: np.asarray(v) for k, v in batch.items() if k in keep}


def _tokens_per_step(metrics: dict, config) -> float:
    if "tokens" in metrics:
        return float(metrics["tokens"])
    return float(metrics.get("thought_len_mean", 0.0)) * config.train.batch_size * config.rlp.num_rollouts


def _start_params(workdir: Path, state, shardings, resumed: bool):
    """θ_0, kept (and saved once in WORKDIR/start_params) for the gain against the start."""
    path = workdir / "start_params"
    checkpointer = ocp.StandardCheckpointer()
    if resumed and path.exists():
        abstract = ckpt_lib.abstract_like(state.params, shardings.params)
        return checkpointer.restore(path, abstract)
    params = jax.tree.map(jnp.copy, state.params)
    if not path.exists():
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()
    return params


def _run_eval(graphdef, state, start_params, held_out, step_cfg, config, tokenizer, mesh, step, writer, echo):
    rcfg = dataclasses.replace(step_cfg.rollout, num_rollouts=max(config.eval.num_thoughts, 2))
    t0 = time.perf_counter()
    result = eval_lib.evaluate(graphdef, state.params, {"ema": state.ema_params, "start": start_params},
                               held_out, rcfg, jax.random.key(config.seed + 12345),
                               decode=tokenizer.decode, show_thoughts=config.eval.show_thoughts, mesh=mesh)
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


# ---------------------------------------------------------------- export

def load_final_model(workdir: str | Path):
    """The Transformer with the params of the newest checkpoint of a run (host, unsharded)."""
    from rlp_jax.models import convert
    from rlp_jax.models.transformer import Transformer

    workdir = Path(workdir)
    if not (workdir / MODEL_CONFIG_FILE).exists():
        raise config_lib.ConfigError(f"{workdir} is not an rlp-jax run directory (no {MODEL_CONFIG_FILE}); "
                                     "pass the --workdir of a training run.")
    model_config = convert.config_from_json((workdir / MODEL_CONFIG_FILE).read_text())
    pure = _params_from_workdir(workdir)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(model_config, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)
    return model
