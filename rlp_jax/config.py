"""Configs: the base ConfigDict, loading a config file with `--config.a.b=value` overrides, and
the cross-field checks that end bad input with one sentence (exit status 2) before anything
compiles. Each single setting is checked by the dataclass it configures (`rlp_jax.build` turns
their errors into `ConfigError`s)."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A config the run cannot use; the message says what is wrong and how to fix it."""


def base_config() -> ml_collections.ConfigDict:
    """Every key rlp-jax reads, with its default (docs/training.md)."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.preset = "demo"  # rlp_jax.models.PRESETS; the HF folder's config when init.kind='hf'
    c.model.vocab_size = 0  # 0: the tokenizer's vocabulary size
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # none | full | dots_saveable
    c.model.attention = "auto"  # auto (fused kernel by platform) | xla | cudnn | splash

    c.init = ml_collections.ConfigDict()
    c.init.kind = "scratch"  # scratch | hf (HF folder) | params (rlp-jax convert output) | checkpoint (another run's workdir)
    c.init.path = ""

    c.tokenizer = "demo"  # demo | bytes | path to an HF tokenizer.json

    c.data = ml_collections.ConfigDict()
    c.data.corpus = "demo"  # demo | a built corpus directory | files/globs of .txt/.jsonl(.gz), comma-separated
    c.data.demo_variant = "plain"
    c.data.data_dir = ""  # where corpora are built; "" → WORKDIR/data
    c.data.text_field = "text"  # the jsonl field that holds a document
    c.data.txt_documents = "paragraphs"  # a .txt file is: paragraphs (blank-line separated) | lines | file
    c.data.validation_fraction = 0.01  # of the documents (by a hash of their text) held out; 0: none
    c.data.validation_corpus = ""  # files/globs for the validation split instead (comma-separated)
    c.data.kind = "prompts"  # prompts (RLP, rpt, ntp on prompts) | documents (NTP on whole documents)
    c.data.max_context = 2048
    c.data.target_len = 1
    c.data.seq_len = 2048  # documents only
    c.data.pack_documents = False  # documents only: concatenate them into full rows of seq_len (CPT)
    c.data.strategy = "uniform"  # uniform | all | stride | marked
    c.data.positions_per_document = 4
    c.data.stride = 64
    c.data.min_context = 1
    c.data.marked_kinds = ()  # for strategy 'marked', e.g. ('answer_start',)
    c.data.shuffle_window = 1024

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200
    c.train.batch_size = 512  # prompts (or documents) per step, global
    c.train.batch_tokens = 0  # > 0 (documents only): batch_size = batch_tokens // data.seq_len
    c.train.learning_rate = 1e-6  # the peak (after warm-up)
    c.train.warmup_steps = 0  # steps of linear warm-up from 0
    c.train.schedule = "constant"  # constant | cosine | linear (decay to final_learning_rate at the last step)
    c.train.final_learning_rate = 0.0  # cosine / linear only
    c.train.b1 = 0.9
    c.train.b2 = 0.95
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0  # global-norm clip; 0 turns it off
    c.train.log_every = 10
    c.train.on_nonfinite = "skip"  # skip (count it) | stop
    c.train.check_memory = True  # refuse to start when the plan's memory estimate exceeds the devices'

    c.rlp = ml_collections.ConfigDict()
    c.rlp.objective = "rlp"  # rlp | rpt | ntp
    c.rlp.rpt_prediction_len = 1  # rpt: tokens of the prediction sampled (and trained) after the thought
    c.rlp.rpt_entropy_threshold = 0.5  # rpt: train positions whose proxy top-16 entropy (nats) is at least this
    c.rlp.rpt_proxy = ""  # rpt: the proxy model ("" the start weights; a run workdir, params or HF folder)
    c.rlp.rpt_proxy_batch = 16  # rpt: windows per device in each forward of the proxy's scoring pass
    c.rlp.advantage = "auto"  # group advantage: rlp (the RLP paper's eq. 7) | grpo (std-normalised) | auto: grpo for rpt, rlp otherwise
    c.rlp.num_rollouts = 16  # G
    c.rlp.max_thought_len = 2048  # L
    c.rlp.min_thought_len = 1
    c.rlp.temperature = 0.7
    c.rlp.top_k = 0
    c.rlp.top_p = 1.0
    c.rlp.eps_low = 0.2
    c.rlp.eps_high = 0.2
    c.rlp.kl_coef = 0.0
    c.rlp.kl_estimator = "k3"
    c.rlp.ema_decay = 0.999
    c.rlp.ppo_epochs = 1
    c.rlp.num_minibatches = 1
    c.rlp.grad_accum_steps = 1
    c.rlp.rollout_microbatches = 1
    c.rlp.head_chunk_len = 0  # > 0: the update's LM head + softmax over this many thought positions at a time
    c.rlp.update_length_buckets = 1  # > 1: update rows sorted by length and cut to the shortest of this many lengths
    c.rlp.cache_block_len = 256  # rollout-cache slots per block: what a decode step reads, to a block
    c.rlp.prompt_template = ""  # text inserted between the context and <think>
    c.rlp.mask_markers_in_scoring = False

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 3

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: only at the start and the end
    c.eval.num_positions = 512  # held-out prompts
    c.eval.num_thoughts = 2  # sampled thoughts per held-out prompt
    c.eval.batch_size = 64
    c.eval.show_thoughts = 4
    # Benchmark accuracy during training (rlp_jax.benchmarks, docs/evaluation.md); off while empty.
    c.eval.benchmark_tasks = ()  # task / suite names or .jsonl paths, e.g. ('demo_addition',), ('math_offline',)
    c.eval.benchmark_every_steps = 0  # 0: only at the start and the end
    c.eval.benchmark_limit = 64  # the first N items of each task
    c.eval.benchmark_samples = 4  # sampled responses per item (pass@1 is their mean); 0: greedy only
    c.eval.benchmark_greedy = True  # also one greedy response per item
    c.eval.benchmark_temperature = 0.6
    c.eval.benchmark_top_p = 0.95
    c.eval.benchmark_max_new_tokens = 512  # the toy tasks cap it at their own answer length
    c.eval.benchmark_batch_size = 64  # prompts per generation batch
    c.eval.benchmark_prompt_format = "think"  # think | plain (the toy tasks prompt with the bare problem)
    c.eval.benchmark_choice_mode = "loglik"  # multiple choice: loglik (option likelihood) | generate
    c.eval.benchmark_data_dir = ""  # folder of <task>.jsonl for the sets no package ships

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # -1: all remaining devices
    c.mesh.axes = ("data", "fsdp", "tensor")
    # Logical axis → mesh axis (or axes, or None: replicated); rlp_jax.sharding.DEFAULT_RULES.
    from rlp_jax.sharding import DEFAULT_RULES

    c.mesh.rules = DEFAULT_RULES
    return c


def bundled_configs() -> Path:
    """The folder of the configs that ship with rlp-jax (`configs/`, installed as rlp_jax.configs)."""
    return Path(importlib.util.find_spec("rlp_jax.configs").submodule_search_locations[0])


def config_path(name_or_path: str) -> Path:
    """A config file: a path, or the name of a bundled config (`demo`, `rlp_paper`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    folder = bundled_configs()
    if "/" not in name_or_path and (folder / f"{name_or_path}.py").is_file():
        return folder / f"{name_or_path}.py"
    names = ", ".join(sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")))
    raise ConfigError(f"config {name_or_path} is neither a file nor a bundled config; pass a path to a "
                      f"config .py or one of: {names}.")


def load_config(path: str, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """The config of `path` (a .py file with `get_config()`, or a bundled config's name) with
    `a.b=value` overrides applied. Keys are locked: an unknown key is an error."""
    file = config_path(path)
    spec = importlib.util.spec_from_file_location(f"rlp_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(); define one that returns a ConfigDict.")
    config = module.get_config()
    config.lock()
    for item in overrides:
        apply_override(config, item)
    return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    """Sets `a.b=value` in place; the value is parsed as a Python literal of the field's type."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} has no '='; write it as --config.a.b=value.")
    key, raw = item.split("=", 1)
    key = key.removeprefix("--").removeprefix("config.")
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ConfigError(f"unknown config key {key!r}; see docs/training.md for the keys.")
        node = node[part]
    leaf = parts[-1]
    if leaf not in node:
        known = ", ".join(sorted(node.keys()))
        raise ConfigError(f"unknown config key {key!r}; keys here are: {known}.")
    current = node[leaf]
    try:
        value = raw if isinstance(current, str) else ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"config value {raw!r} for {key} is not a Python literal; e.g. "
                          f"--config.{key}={current!r}.") from None
    if isinstance(current, bool) != isinstance(value, bool) or (
            isinstance(current, (int, float)) and not isinstance(value, (int, float))):
        raise ConfigError(f"config {key} is a {type(current).__name__} but got {raw!r}.")
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, str):  # "('demo_addition')": a one-name tuple
        value = (value,)
    with node.unlocked():
        node[leaf] = value


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
    """`mesh.shape` with its one allowed -1 replaced by the remaining device count."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh.shape {shape} has more than one -1; at most one axis may take the rest.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"mesh.shape {shape} cannot cover {num_devices} devices; make the fixed "
                              f"axes multiply to a divisor of {num_devices}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh.shape {shape} needs {math.prod(shape)} devices but {num_devices} are "
                          f"available; set --config.mesh.shape so its product is {num_devices}.")
    return shape


def validate_shapes(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> tuple[int, ...]:
    """`validate` without the check that `init.path` exists: for the commands that need a run's
    shapes, not its weights (`plan`, `compile`, on a machine without the cluster's files)."""
    kind, config.init.kind = config.init.kind, "scratch"
    try:
        return validate(config, num_devices, num_processes)
    finally:
        config.init.kind = kind


def resolve_batch_tokens(config: ml_collections.ConfigDict) -> None:
    """Token-sized batches (`train.batch_tokens`, next-token training on documents): sets
    `train.batch_size` to the rows of `data.seq_len` tokens they hold, in place."""
    t = config.train
    if not t.batch_tokens:
        return
    if config.data.kind != "documents":
        raise ConfigError("train.batch_tokens sizes next-token batches of documents; set data.kind='documents' "
                          "or size RLP batches in prompts with train.batch_size.")
    rows = t.batch_tokens // config.data.seq_len
    if rows < 1:
        raise ConfigError(f"train.batch_tokens={t.batch_tokens} is less than one row of data.seq_len="
                          f"{config.data.seq_len} tokens; raise it.")
    with config.unlocked():
        t.batch_size = rows


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> tuple[int, ...]:
    """The checks across settings (and of the keys no dataclass owns); returns the resolved mesh
    shape."""
    c = config
    resolve_batch_tokens(c)
    shape = resolve_mesh_shape(c.mesh.shape, num_devices)
    if len(shape) != len(c.mesh.axes):
        raise ConfigError(f"mesh.shape {shape} and mesh.axes {tuple(c.mesh.axes)} differ in length.")
    validate_rules(c.mesh.rules, c.mesh.axes)
    choices = {"init.kind": ("scratch", "hf", "params", "checkpoint"), "data.kind": ("prompts", "documents"),
               "train.on_nonfinite": ("skip", "stop")}
    for key, allowed in choices.items():
        section, leaf = key.split(".")
        if c[section][leaf] not in allowed:
            raise ConfigError(f"{key}={c[section][leaf]!r} is not one of {', '.join(allowed)}.")
    if c.init.kind != "scratch" and (not c.init.path or not Path(c.init.path).exists()):
        hint = "pass --init-from-hf DIR or point" if c.init.kind == "hf" else "point"
        raise ConfigError(f"init.path {c.init.path!r} does not exist; {hint} --config.init.path at the "
                          f"{c.init.kind} folder to start from.")
    if c.rlp.objective == "rpt" and c.data.target_len < c.rlp.rpt_prediction_len:
        raise ConfigError(f"rlp.rpt_prediction_len={c.rlp.rpt_prediction_len} tokens are scored against "
                          f"data.target_len={c.data.target_len}; a correct prediction could not be verified. Set "
                          "data.target_len >= rlp.rpt_prediction_len.")
    if c.data.kind == "documents" and c.rlp.objective != "ntp":
        raise ConfigError("data.kind='documents' trains next-token prediction only; set "
                          "--config.rlp.objective=ntp or use data.kind='prompts'.")
    batch_axes = {a: s for a, s in zip(c.mesh.axes, shape)}
    data_ways = batch_axes.get("data", 1) * batch_axes.get("fsdp", 1)
    B = c.train.batch_size
    for name, parts in (("the data×fsdp mesh axes", data_ways), ("the processes", num_processes),
                        ("rlp.rollout_microbatches", c.rlp.rollout_microbatches),
                        ("rlp.num_minibatches × rlp.grad_accum_steps",
                         c.rlp.num_minibatches * c.rlp.grad_accum_steps)):
        if parts < 1 or B % parts:
            raise ConfigError(f"train.batch_size={B} does not divide over {name} ({parts}); choose a "
                              f"multiple of {parts}.")
    if c.train.steps < 1 or c.checkpoint.every_steps < 1 or c.train.log_every < 1:
        raise ConfigError("train.steps, train.log_every and checkpoint.every_steps must be >= 1.")
    if c.eval.benchmark_tasks and (c.eval.benchmark_every_steps < 0 or c.eval.benchmark_limit < 1):
        raise ConfigError(f"eval.benchmark_every_steps={c.eval.benchmark_every_steps} and eval.benchmark_limit="
                          f"{c.eval.benchmark_limit}; use every_steps >= 0 (0: start and end only) and limit >= 1.")
    if c.eval.num_positions > 0 and c.eval.num_thoughts < 2:
        raise ConfigError(f"eval.num_thoughts={c.eval.num_thoughts}; held-out evaluation samples at least 2 "
                          "thoughts per position (or set eval.num_positions=0).")
    return shape


def validate_rules(rules, mesh_axes) -> None:
    """Every logical axis the model and step use has a rule, and every rule names mesh axes of
    `mesh.axes`, each at most once."""
    from rlp_jax.sharding import LOGICAL_AXES, rules_from_config

    try:
        table = dict(rules_from_config(rules))
    except (TypeError, ValueError):
        raise ConfigError(f"mesh.rules {rules!r} is not a list of (logical axis, mesh axes) pairs; see "
                          "rlp_jax.sharding.DEFAULT_RULES.") from None
    missing = [a for a in LOGICAL_AXES if a not in table]
    if missing:
        raise ConfigError(f"mesh.rules has no rule for {', '.join(missing)}; add one (None replicates).")
    for logical, target in table.items():
        names = () if target is None else (target if isinstance(target, tuple) else (target,))
        unknown = [n for n in names if n not in tuple(mesh_axes)]
        if unknown:
            raise ConfigError(f"mesh.rules maps {logical!r} to {unknown[0]!r}, which is not one of mesh.axes "
                              f"{tuple(mesh_axes)}; rename it or add that axis to the mesh.")
        if len(set(names)) != len(names):
            raise ConfigError(f"mesh.rules maps {logical!r} to {target!r}, naming a mesh axis twice.")
