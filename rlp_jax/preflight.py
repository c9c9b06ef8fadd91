"""Checks a run passes before its first step, so that a config that cannot work ends in one
sentence (a `ConfigError`) instead of a traceback minutes in: the corpus suits the position
strategy and the evaluation, the benchmark tasks have their data, and the plan's memory estimate
fits the devices.
"""

from __future__ import annotations

import os

import jax

from rlp_jax.config import ConfigError


def check_corpus(config, corpus, tokenizer, sample: int = 256) -> None:
    """The corpus has what the config asks of it: text the tokenizer can encode (its first
    `sample` documents of each split are tried), marked positions of the named kinds for the
    `marked` strategy, and a validation split when held-out evaluation is on."""
    d = config.data
    for split in corpus.splits:
        source = corpus.source(split)
        for index in range(min(len(source), sample)):
            record = source[index]
            text = record["text"].decode("utf-8") if isinstance(record["text"], bytes) else record["text"]
            try:
                tokenizer.encode(text)
            except ValueError as error:
                origin = record.get("origin", b"")
                origin = origin.decode() if isinstance(origin, bytes) else origin
                raise ConfigError(f"tokenizer {config.tokenizer!r} cannot encode the corpus ({origin or split}: "
                                  f"{str(error).rstrip('.')}); use --config.tokenizer=bytes, or the tokenizer of the model you start "
                                  "from.") from None
    if d.kind == "prompts" and d.strategy == "marked":
        kinds = tuple(d.marked_kinds) or corpus.position_kind_names[1:]
        missing = [k for k in kinds if k not in corpus.position_kind_names[1:]]
        if missing:
            raise ConfigError(
                f"data.strategy='marked' asks for positions of kind {missing[0]!r}, which corpus {corpus.name} "
                f"does not mark (it marks: {', '.join(corpus.position_kind_names[1:]) or 'nothing'}); for "
                "ordinary text use --config text or --config.data.strategy=uniform --config.data.marked_kinds=().")
    evaluates = config.rlp.objective != "ntp" and d.kind == "prompts" and config.eval.num_positions > 0
    if evaluates and "validation" not in corpus.splits:
        raise ConfigError(f"corpus {corpus.name} has no validation split for the held-out evaluation; set "
                          "--config.data.validation_fraction (e.g. 0.05) or --config.data.validation_corpus, or "
                          "--config.eval.num_positions=0 to train without it.")


def check_benchmarks(config) -> None:
    """Every task of `eval.benchmark_tasks` exists, has its data (a local file where no package
    ships the set) and has prompts the run's tokenizer encodes; its settings are valid."""
    if not tuple(config.eval.benchmark_tasks):
        return
    from rlp_jax.benchmarks import training
    from rlp_jax.benchmarks.tasks import BenchmarkError

    try:
        training.check(config)
    except BenchmarkError as error:
        message = str(error)
        if "--data-dir" in message:  # the loaders speak to `rlp-jax evaluate`; a run sets the key
            message = message.replace("pass that folder as --data-dir", "set --config.eval.benchmark_data_dir to "
                                      "that folder").replace("or pass another --data-dir",
                                                             "or set another --config.eval.benchmark_data_dir")
        raise ConfigError(f"eval.benchmark_tasks: {message}") from None


def check_tokenizer(config, tokenizer) -> None:
    """A run started from weights uses the tokenizer those weights were trained with: an HF or
    params folder's own tokenizer.json, or the tokenizer recorded by the run it starts from."""
    import json
    from pathlib import Path

    from rlp_jax.data import load_tokenizer
    from rlp_jax.data.tokenizer import tokenizer_fingerprint

    kind, path = config.init.kind, Path(config.init.path) if config.init.path else None
    if kind in ("hf", "params") and path is not None and (path / "tokenizer.json").is_file():
        try:
            same = tokenizer_fingerprint(load_tokenizer(str(path))) == tokenizer_fingerprint(tokenizer)
        except (OSError, ValueError):  # a tokenizer.json without think markers: the config's own is used
            return
        if not same:
            raise ConfigError(f"the model in {path} comes with its own tokenizer.json but tokenizer is "
                              f"{config.tokenizer!r}; use the model's (--config.tokenizer={path}, as --init-from-hf "
                              "sets it).")
    elif kind == "checkpoint" and path is not None and (path / "identity.json").is_file():
        recorded = json.loads((path / "identity.json").read_text()).get("tokenizer")
        if recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
            raise ConfigError(f"the run in {path} was trained with another tokenizer than {config.tokenizer!r}; "
                              "set --config.tokenizer to that run's tokenizer.")


def device_memory_bytes() -> tuple[float, str] | None:
    """(bytes one device may use, what that is) — `bytes_limit` of the runtime, or for CPU devices
    this machine's RAM shared by the local devices; None when the runtime does not say."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        count = jax.local_device_count()
        return ram / count, f"this machine's {ram / 2**30:.1f} GiB of RAM shared by {count} CPU device{'s' if count > 1 else ''}"
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"]), f"{stats['bytes_limit'] / 2**30:.1f} GiB per {device.device_kind}"
    return None


def check_memory(config, model_config, mesh_shape, suffix_len: int) -> str | None:
    """Refuses (ConfigError) a config whose `rlp-jax plan` peak exceeds the usable device memory;
    returns a one-line note of the estimate, or None when the device memory is unknown (or the
    model's family has no planner)."""
    from rlp_jax import plan

    memory = device_memory_bytes()
    if memory is None or not config.train.check_memory:
        return None
    available, what = memory
    backend = jax.default_backend()
    usable = available * plan.USABLE_FRACTION
    planner = plan.planner_for(model_config)  # the model family's (the hybrid's bounds it from below only)
    if planner is None:
        return None
    return planner.check_memory(config, model_config, mesh_shape, suffix_len, usable, what, backend)


def check_compiled_memory(compiled, config) -> str | None:
    """Refuses (ConfigError) a compiled step whose per-device memory, by the compiler's own count,
    exceeds what the device has free; returns a one-line note of it, or None when the runtime does
    not say how much memory a device has."""
    from rlp_jax import aot

    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    analysis = compiled.memory_analysis()
    memory = {f: int(getattr(analysis, f)) for f in aot.MEMORY_FIELDS}
    needed = aot.Program("train step", 0.0, 0.0, memory, None, {}).peak_bytes - memory["argument_size_in_bytes"]
    gib = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    if needed > free:
        raise ConfigError(
            f"the compiled train step needs {gib(needed)} per {device.device_kind} beyond the train state it is "
            f"given, but {gib(free)} is free; {aot.knobs(config)}, or pass --config.train.check_memory=False "
            "to start anyway.")
    return f"memory: the compiled step needs {gib(needed)} per device beyond its arguments, of {gib(free)} free"
