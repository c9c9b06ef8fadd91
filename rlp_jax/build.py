"""From a config (rlp_jax.config) to the objects a run is made of: tokenizer, model shapes,
optimizer, step config, corpus, batch iterators and the initial train state.

The trainer, `rlp-jax plan`, `rlp-jax eval` and the ablations all build through here, so that a
config means the same thing to each of them. Every config error ends in a `ConfigError` (one
sentence: what is wrong and how to fix it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from rlp_jax import checkpoint as ckpt_lib
from rlp_jax import sharding
from rlp_jax import train_step as ts
from rlp_jax.batch import PromptBatch
from rlp_jax.config import ConfigError
from rlp_jax.rollouts import RolloutConfig


def rules(config: ml_collections.ConfigDict) -> sharding.LogicalRules:
    """The logical-axis rules of `mesh.rules` (checked against `mesh.axes` by config.validate)."""
    return sharding.rules_from_config(config.mesh.rules)


def tokenizer(config):
    from rlp_jax import data

    try:
        return data.load_tokenizer(config.tokenizer)
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokenizer {config.tokenizer!r} cannot be loaded ({error}); set --config.tokenizer "
                          "to 'demo', 'bytes' or a tokenizer.json (or the folder holding it).") from None


def model_config(config, tok):
    """The model's shapes (the config of its family, rlp_jax.models.families): from the HF folder
    (of the family that reads its config.json's model_type), params folder or run of `init.path`,
    or the `model.preset` (of the family that has it); dtypes and remat from `model`."""
    from rlp_jax.models import convert, families

    overrides = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype, remat=config.model.remat,
                     attention=config.model.attention)
    try:
        if config.init.kind == "hf":
            hf_json = json.loads((Path(config.init.path) / "config.json").read_text())
            result = families.family_for_hf_model_type(hf_json.get("model_type")).config_from_hf(hf_json, **overrides)
        elif config.init.kind == "params":
            result = convert.config_from_json((Path(config.init.path) / convert.CONFIG_FILE).read_text()
                                              ).replace(**overrides)
        elif config.init.kind == "checkpoint":
            result = convert.config_from_json(ckpt_lib.RunDir(config.init.path).model_config.read_text()
                                              ).replace(**overrides)
        else:
            result = families.family_for_preset(config.model.preset).preset(
                config.model.preset, vocab_size=config.model.vocab_size or tok.vocab_size, **overrides)
    except FileNotFoundError as error:
        raise ConfigError(f"init.path {config.init.path!r} has no {Path(error.filename).name}; point "
                          f"--config.init.path at a {config.init.kind} folder.") from None
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if result.vocab_size < tok.vocab_size:
        raise ConfigError(f"the model's vocabulary ({result.vocab_size}) is smaller than the tokenizer's "
                          f"({tok.vocab_size}); use the model's own tokenizer.")
    return result


SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(t, updates_per_step: int = 1) -> optax.Schedule:
    """The learning rate at each optimizer update: a linear warm-up from 0 over `train.warmup_steps`
    steps, then `train.schedule` — constant at `train.learning_rate`, or a cosine or linear decay
    that reaches `train.final_learning_rate` at the run's last update (`train.steps` steps of
    `updates_per_step` optimizer updates each). The paper's RLP runs use a constant 1e-6; its CPT
    baseline decays 1e-6 → 1e-7 (shape not stated)."""
    if t.schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={t.schedule!r} is not one of {', '.join(SCHEDULES)}.")
    if t.learning_rate < 0 or t.final_learning_rate < 0 or t.warmup_steps < 0:
        raise ConfigError("train.learning_rate, train.final_learning_rate and train.warmup_steps must be >= 0.")
    warm = t.warmup_steps * updates_per_step
    decay = max(t.steps * updates_per_step - warm - 1, 1)  # the last update gets the final value
    peak, final = t.learning_rate, t.final_learning_rate
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay, alpha=final / peak if peak else 0.0)
    elif t.schedule == "linear":
        after = optax.linear_schedule(peak, final, decay)
    else:
        after = optax.constant_schedule(peak)
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def updates_per_step(config) -> int:
    """Optimizer updates in one training step (`rlp.ppo_epochs × rlp.num_minibatches`)."""
    return config.rlp.ppo_epochs * config.rlp.num_minibatches


def optimizer(config) -> optax.GradientTransformation:
    """AdamW on `learning_rate_schedule`, after global-norm clipping (`train.grad_clip`)."""
    t = config.train
    schedule = learning_rate_schedule(t, updates_per_step(config))
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    chain.append(optax.adamw(schedule, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay))
    return optax.chain(*chain)


def rollout_config(config, tok, num_rollouts: int | None = None) -> RolloutConfig:
    """How thoughts are sampled; `num_rollouts` (default `rlp.num_rollouts`) for evaluation."""
    r = config.rlp
    template = tuple(tok.encode(r.prompt_template)) if r.prompt_template else ()
    try:
        return RolloutConfig(
            think_open_id=tok.think_open_id, think_close_id=tok.think_close_id,
            num_rollouts=r.num_rollouts if num_rollouts is None else num_rollouts,
            max_thought_len=r.max_thought_len, min_thought_len=r.min_thought_len, temperature=r.temperature,
            top_k=r.top_k, top_p=r.top_p, prompt_suffix_ids=template, pad_id=tok.pad_id,
            mask_markers_in_scoring=r.mask_markers_in_scoring, cache_block_len=r.cache_block_len,
            prediction_len=r.rpt_prediction_len if r.objective == "rpt" else 0)
    except ValueError as error:
        raise ConfigError(f"rlp: {error}") from None


def _token_bytes(tok):
    from rlp_jax.data.tokenizer import token_byte_table

    table, lengths = token_byte_table(tok)
    return table, lengths


def step_config(config, tok) -> ts.StepConfig:
    r = config.rlp
    if r.rpt_entropy_threshold < 0:
        raise ConfigError(f"rlp.rpt_entropy_threshold is {r.rpt_entropy_threshold}; use 0 (train every position) "
                          "or a positive entropy in nats.")
    try:
        return ts.StepConfig(
            rollout=rollout_config(config, tok), objective=r.objective, eps_low=r.eps_low,
            eps_high=r.eps_high, kl_coef=r.kl_coef, kl_estimator=r.kl_estimator, ema_decay=r.ema_decay,
            ppo_epochs=r.ppo_epochs, num_minibatches=r.num_minibatches, grad_accum_steps=r.grad_accum_steps,
            rollout_microbatches=r.rollout_microbatches, head_chunk_len=r.head_chunk_len,
            update_length_buckets=r.update_length_buckets,
            token_bytes=_token_bytes(tok) if r.objective == "rpt" else None,
            rpt_end_ids=tuple(sorted({tok.eos_id, tok.pad_id})) if r.objective == "rpt" else (),
            advantage=r.advantage)
    except ValueError as error:
        raise ConfigError(f"rlp: {error}") from None


def corpus(config, workdir: Path):
    """The configured corpus; in a multi-host run process 0 builds it while the others wait."""
    if jax.process_count() == 1:
        return _corpus(config, workdir)
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
        built = _corpus(config, workdir)
    multihost_utils.sync_global_devices("rlp_jax corpus built")
    return built if jax.process_index() == 0 else _corpus(config, workdir)


def _corpus(config, workdir: Path):
    from rlp_jax import data

    d = config.data
    try:
        built = _built_corpus_dir(d.corpus)
        if built is not None:
            return data.open_corpus(built)
        if d.corpus == "demo":
            return data.build_demo_corpus(str(_data_dir(config, workdir)), d.demo_variant, seed=config.seed)
        return data.build_local_corpus(_paths(d.corpus), str(_data_dir(config, workdir)), name="corpus",
                                       **_local_corpus_options(config))
    except ConfigError:
        raise
    except (ValueError, OSError) as error:  # unreadable, empty or malformed input: the user's to fix
        raise ConfigError(f"data.corpus {d.corpus!r}: {error}") from None


def corpus_fingerprint(config) -> str:
    """What identifies the configured corpus's contents, computed without building it (a run is
    bound to it: `checkpoint.RunDir.bind`)."""
    from rlp_jax import data

    d = config.data
    try:
        built = _built_corpus_dir(d.corpus)
        if built is not None:
            return "built:" + (data.open_corpus(built).fingerprint or built)
        if d.corpus == "demo":
            return f"demo:{d.demo_variant}:seed{config.seed}"
        return "local:" + data.local_corpus_fingerprint(_paths(d.corpus), **_local_corpus_options(config))
    except ConfigError:
        raise
    except (ValueError, OSError) as error:
        raise ConfigError(f"data.corpus {d.corpus!r}: {error}") from None


def _data_dir(config, workdir: Path) -> Path:
    return Path(config.data.data_dir).absolute() if config.data.data_dir else Path(workdir) / "data"


def _paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def _local_corpus_options(config) -> dict:
    d = config.data
    validation = _paths(d.validation_corpus)
    return dict(validation_paths=validation, validation_fraction=None if validation else d.validation_fraction,
                text_field=d.text_field, txt_documents=d.txt_documents)


def _built_corpus_dir(spec: str) -> str | None:
    """The built dataset `spec` names: a dataset folder, or a TFDS data_dir holding exactly one."""
    from rlp_jax import data

    if spec == "demo" or "," in spec or not Path(spec).is_dir():
        return None
    found = data.find_built_corpora(spec)
    if len(found) > 1:
        raise ConfigError(f"{spec} holds {len(found)} built datasets ({', '.join(found[:3])}, ...); set "
                          "--config.data.corpus to the one to train on.")
    return found[0] if found else None


def batches(config, corpus_, tok, split: str, batch_size: int, *, num_epochs=None, pad_final_batch=False,
            shuffle=True, seed_offset=0, whole_split=False, keep_positions=None):
    """Batches of this process's shard of `split`, or of the whole split (`whole_split`: every
    process reads the same batches, as held-out evaluation needs); prompts only at
    `keep_positions` when given (RPT's hard positions, rlp_jax.rpt_positions)."""
    from rlp_jax import data

    d = config.data
    common = dict(batch_size=batch_size, seed=config.seed + seed_offset, num_epochs=num_epochs,
                  shuffle_documents=shuffle, shuffle_window=d.shuffle_window if shuffle else 0,
                  pad_final_batch=pad_final_batch)
    layout = dict(process_index=0, process_count=1) if whole_split else {}
    try:
        if d.kind == "documents":
            return data.document_batches(corpus_, split, tok, data.DocumentBatchConfig(
                seq_len=d.seq_len, pack=d.pack_documents, **common), **layout)
        return data.prompt_batches(corpus_, split, tok, data.PromptBatchConfig(
            max_context=d.max_context, target_len=d.target_len, positions=position_config(config), **common),
            keep_positions=keep_positions, **layout)
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None


def position_config(config):
    """Where prompts are placed in documents (`data.strategy` and its settings)."""
    from rlp_jax import data

    d = config.data
    try:
        return data.PositionConfig(d.strategy, d.positions_per_document or None, stride=d.stride,
                                   min_context=d.min_context, marked_kinds=tuple(d.marked_kinds) or None)
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None


def eval_batches(config, corpus_, tok) -> list[PromptBatch]:
    """The fixed held-out prompt batches: exactly `eval.num_positions` positions of the validation
    split (fewer only when the split has no more; `eval_note` says so), in order, the same at every
    evaluation and on every process, on the host.

    With the `uniform` strategy the held-out documents give as many positions each as it takes to
    reach the count (a small validation split of long documents still fills it)."""
    import dataclasses
    import math

    if config.data.kind == "documents" or config.eval.num_positions <= 0:
        return []
    wanted = config.eval.num_positions
    config = config.copy_and_resolve_references()
    if config.data.strategy == "uniform" and "validation" in corpus_.splits:
        documents = max(corpus_.num_documents("validation"), 1)
        config.data.positions_per_document = max(config.data.positions_per_document, math.ceil(wanted / documents))
    out, count = [], 0
    for batch in batches(config, corpus_, tok, "validation", config.eval.batch_size, num_epochs=1,
                         pad_final_batch=True, shuffle=False, seed_offset=1, whole_split=True):
        real = np.asarray(batch.example_mask_B)
        keep = real & (np.cumsum(real) <= wanted - count)  # the rows past the count become padding
        out.append(dataclasses.replace(batch, example_mask_B=keep))
        count += int(keep.sum())
        if count >= wanted:
            break
    return out


# A validation split of fewer documents makes an evaluation that measures little more than them (its
# positions are far from independent, and the standard errors it reports too small).
MIN_EVAL_DOCUMENTS = 4


def eval_note(config, corpus_, held_out: list[PromptBatch]) -> str | None:
    """A sentence when the held-out batches hold fewer positions than `eval.num_positions`, or the
    validation split has fewer than `MIN_EVAL_DOCUMENTS` documents."""
    count = sum(int(np.asarray(b.example_mask_B).sum()) for b in held_out)
    notes = []
    if count < config.eval.num_positions:
        notes.append(f"the validation split yields {count} positions, fewer than eval.num_positions="
                     f"{config.eval.num_positions}; evaluating those {count} (raise data.validation_fraction for more)")
    documents = corpus_.num_documents("validation") if "validation" in corpus_.splits else 0
    if held_out and documents < MIN_EVAL_DOCUMENTS:
        notes.append(f"the validation split has only {documents} document{'s' if documents != 1 else ''}, so the "
                     f"held-out evaluation's {count} positions all come from {'it' if documents == 1 else 'them'} and "
                     f"say little about other text; give it {MIN_EVAL_DOCUMENTS} or more documents (more text, a "
                     "higher data.validation_fraction, or data.validation_corpus)")
    return "; ".join(notes) or None


def needs_reference(config) -> bool:
    """A frozen copy of the start weights in the state (`StepConfig.needs_reference`): the KL
    reference."""
    return config.rlp.kl_coef > 0


def initial_state(config, model_config_, optimizer_, mesh):
    """(graphdef, abstract state, shardings, make_state) for `init.kind`: `make_state()` builds
    the state (random, or from the weights at `init.path`) directly in its shardings."""
    with_reference = needs_reference(config)
    logical_rules = rules(config)
    graphdef, abstract, shardings, init = ts.abstract_state_from_scratch(
        model_config_, optimizer_, config.seed, mesh, logical_rules, with_reference=with_reference)
    kind, path = config.init.kind, config.init.path
    load = lambda kind_, path_: _load_params(kind_, path_, abstract.params, shardings.params, model_config_, mesh,
                                             logical_rules)

    def from_params():
        init_fn = lambda p: ts.init_state(p, optimizer_, jax.random.key(config.seed), with_reference)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(logical_rules):
            return jax.jit(init_fn, out_shardings=shardings)(load(kind, path))

    return graphdef, abstract, shardings, init if kind == "scratch" else from_params


def _load_params(kind: str, path: str, abstract_params, params_sharding, model_config_, mesh,
                 logical_rules):
    """The params of an HF folder (`hf`), an rlp-jax params folder (`params`) or a run's newest
    checkpoint (`checkpoint`), placed in `params_sharding` (the model's shapes must agree)."""
    if kind == "hf":
        from rlp_jax.models import convert  # of the family that reads config.json's model_type

        try:
            model = convert.load_hf(path, mesh=mesh, rules=logical_rules, dtype=model_config_.dtype,
                                    param_dtype=model_config_.param_dtype, remat=model_config_.remat,
                                    attention=model_config_.attention)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{path}: {error}") from None
        return nnx.state(model, nnx.Param)
    if kind == "params":
        from rlp_jax.models import convert

        pure = nnx.to_pure_dict(nnx.state(convert.load_params(path), nnx.Param))
    else:
        pure = ckpt_lib.RunDir(path).latest_params()
    params = jax.tree.map(lambda x: x, abstract_params)  # a State to fill
    try:
        nnx.replace_by_pure_dict(params, jax.tree.map(np.asarray, pure))
    except (KeyError, ValueError) as error:
        raise ConfigError(f"the weights in {path} do not fit this model ({error}); use a model of the same shapes.") from None
    if any(np.shape(x) != a.shape for x, a in zip(jax.tree.leaves(params), jax.tree.leaves(abstract_params))):
        raise ConfigError(f"the weights in {path} have other shapes than this model; use a model of the same shapes.")
    host = jax.tree.map(lambda x, a: np.asarray(x).astype(a.dtype), params, abstract_params)
    return jax.device_put(host, params_sharding)


def model_from_run(workdir: str | Path):
    """The model (of the family the run's model_config.json records) with the params of the newest
    checkpoint of a run (host, unsharded)."""
    from rlp_jax.models import convert
    from rlp_jax.models.families import family_of

    run = ckpt_lib.RunDir(workdir).require_run()
    config = convert.config_from_json(run.model_config.read_text())
    try:
        pure = run.latest_params()
    except FileNotFoundError as error:
        raise ConfigError(str(error)) from None
    model = family_of(config).abstract_model(config)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, pure))
    nnx.update(model, state)
    from rlp_jax.models import kernels

    return kernels.on_local_platform(model)


# ---------------------------------------------------------------- the train step as a program

def platform_of(mesh: jax.sharding.Mesh) -> str:
    """"cpu", "gpu" or "tpu": what the mesh's devices are (compile-only devices included)."""
    from rlp_jax.models import kernels

    return kernels.platform_name(mesh.devices.flat[0].platform)


def kernels_for(model_config_, platform: str):
    """The model config with the attention kernels of `platform` chosen (rlp_jax.models.kernels)."""
    from rlp_jax.models import kernels

    try:
        return kernels.resolve_kernels(model_config_, platform)
    except ValueError as error:
        raise ConfigError(f"model.attention: {error}") from None


def abstract_batch(config, mesh, logical_rules):
    """(the global batch of one step as ShapeDtypeStructs carrying their shardings, the shardings)."""
    from rlp_jax.batch import DocumentBatch
    from rlp_jax.data import batching

    size = config.train.batch_size
    if config.data.kind == "prompts":
        spec = batching.prompt_batch_spec(size, config.data.max_context, config.data.target_len)
        kind = PromptBatch
    else:
        spec, kind = batching.document_batch_spec(size, config.data.seq_len), DocumentBatch
    required = {f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING}
    batch = kind(**{n: jax.ShapeDtypeStruct(shape, np.dtype(dtype)) for n, (shape, dtype) in spec.items()
                    if n in required})
    shardings = ts.batch_shardings(batch, mesh, logical_rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), batch, shardings), shardings


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """A run's train step as `rlp-jax train` runs it and `rlp-jax compile` compiles it: one builder
    for both, so what is compiled ahead of time is exactly what runs."""
    model_config: Any  # with the platform's kernels chosen
    graphdef: nnx.GraphDef
    abstract_state: ts.TrainState
    state_shardings: ts.TrainState
    make_state: Callable[[], ts.TrainState]
    abstract_batch: Any
    batch_shardings: Any
    step: Callable  # (state, global batch) -> (state, metrics); the state is donated
    mesh: jax.sharding.Mesh
    rules: sharding.LogicalRules

    def lower(self) -> jax.stages.Lowered:
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self.step.jitted.lower(self.abstract_state, self.abstract_batch)


def train_program(config, model_config_, tok, mesh) -> TrainProgram:
    """The train step of `config` on `mesh`, with the attention kernels of the mesh's platform."""
    model_config_ = kernels_for(model_config_, platform_of(mesh))
    optimizer_, logical_rules = optimizer(config), rules(config)
    graphdef, abstract, shardings, make_state = initial_state(config, model_config_, optimizer_, mesh)
    batch, batch_shardings = abstract_batch(config, mesh, logical_rules)
    step = ts.compile_train_step(graphdef, optimizer_, step_config(config, tok), mesh, shardings, batch_shardings,
                                 logical_rules)
    return TrainProgram(model_config_, graphdef, abstract, shardings, make_state, batch, batch_shardings, step,
                        mesh, logical_rules)
