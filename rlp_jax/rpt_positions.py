"""RPT's data-side position filter for a run: loads the proxy, scores the train split once
(resumably, into WORKDIR/rpt_entropy/), and gives the prompt pipeline the hard positions.

The proxy (`rlp.rpt_proxy`) is any model that shares the run's tokenizer — a smaller checkpoint
of other shapes included, as RPT scores with a 1.5B proxy for a 14B model: a run workdir, an
rlp-jax params folder or an HF folder; "" is the run's start weights (`init`). Each process
scores its own shard of the documents on its local devices, the proxy replicated on each of
them. See rlp_jax.data.hard_positions for what is scored and how.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlp_jax import build, losses
from rlp_jax import checkpoint as ckpt_lib
from rlp_jax.config import ConfigError
from rlp_jax.data import hard_positions, pipeline
from rlp_jax.data.tokenizer import tokenizer_fingerprint

__all__ = ["enabled", "hard_positions_for_run", "load_proxy", "proxy_entropies", "proxy_source"]

_HEAD_CHUNK = 256  # positions per LM-head slice: the [rows, W, V] logits are never whole


def enabled(config) -> bool:
    r = config.rlp
    return config.data.kind == "prompts" and r.objective == "rpt" and r.rpt_entropy_threshold > 0


def proxy_source(config) -> tuple[str, str]:
    """(kind, path) of the proxy: `rlp.rpt_proxy` (a run, a params folder or an HF folder), or the
    start weights (`init.kind`, `init.path`)."""
    path = str(config.rlp.rpt_proxy)
    if not path:
        return config.init.kind, config.init.path
    folder = Path(path)
    if (folder / "params").exists() and (folder / "model_config.json").exists():
        return "params", path
    if ckpt_lib.RunDir(folder).is_run():
        return "checkpoint", path
    if (folder / "config.json").exists():
        return "hf", path
    raise ConfigError(f"rlp.rpt_proxy {path} is not a run workdir, an rlp-jax params folder or an HF folder; "
                      "point it at one of them (or set it to '' to use the start weights).")


def load_proxy(config, start_params: Callable[[], object], graphdef) -> nnx.Module:
    """The proxy model on the host. `start_params()` gives the run's start params when the proxy
    is a from-scratch start (`init.kind = scratch`)."""
    from rlp_jax.models import convert, kernels

    kind, path = proxy_source(config)
    try:
        if kind == "scratch":
            params = start_params()
            if jax.process_count() == 1:
                host = jax.device_get(params)
            else:
                from jax.experimental import multihost_utils

                host = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
            return nnx.merge(graphdef, host)
        if kind == "checkpoint":
            return build.model_from_run(path)
        model = convert.load_params(path) if kind == "params" else convert.load_hf(path)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(f"the RPT proxy {path}: {error}") from None
    return kernels.on_local_platform(model)


def proxy_entropies(model: nnx.Module, marker_ids: tuple[int, ...], devices=None
                    ) -> Callable[[np.ndarray], np.ndarray]:
    """`tokens_BxW -> entropy_BxW` on this process's devices: entry `[b, i]` is the top-16 entropy
    of the next text token after `tokens_BxW[b, :i + 1]` (`losses.text_token_entropy`). Rows are
    split over the devices; the proxy is replicated on each."""
    devices = list(devices or jax.local_devices())
    mesh = jax.sharding.Mesh(np.asarray(devices), ("rows",))
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    rows = NamedSharding(mesh, P("rows"))

    @jax.jit
    def entropies(params_, tokens_BxW):
        model_ = nnx.merge(graphdef, params_)
        B, W = tokens_BxW.shape
        hidden_BxWxD = model_.hidden_states(tokens_BxW, jnp.broadcast_to(jnp.arange(W), (B, W)))
        chunk = min(_HEAD_CHUNK, W)
        pad = -W % chunk
        hidden_BxWxD = jnp.pad(hidden_BxWxD, ((0, 0), (0, pad), (0, 0)))
        pieces_CxBxcxD = hidden_BxWxD.reshape(B, -1, chunk, hidden_BxWxD.shape[-1]).swapaxes(0, 1)
        entropy_CxBxc = jax.lax.map(lambda h: losses.text_token_entropy(model_.logits(h), marker_ids), pieces_CxBxcxD)
        return entropy_CxBxc.swapaxes(0, 1).reshape(B, -1)[:, :W]

    def run(tokens_BxW: np.ndarray) -> np.ndarray:
        return np.asarray(entropies(params, jax.device_put(tokens_BxW, rows)))

    return run


def hard_positions_for_run(config, workdir: Path, corpus, tokenizer, start_params, graphdef,
                           echo: Callable[[str], None]) -> hard_positions.HardPositions:
    """The train split's hard positions for this process: scored into WORKDIR/rpt_entropy/ on the
    first call (an interrupted pass resumes), read from there afterwards."""
    r, d = config.rlp, config.data
    process_index, process_count = jax.process_index(), jax.process_count()
    directory = Path(workdir) / "rpt_entropy" / f"train-process-{process_index}-of-{process_count}"
    try:
        scoring = hard_positions.ScoringConfig(
            window=d.max_context, add_bos=tokenizer.bos_id is not None, add_eos=True,
            batch_rows=r.rpt_proxy_batch * len(jax.local_devices()))
    except ValueError as error:
        raise ConfigError(f"rlp.rpt_proxy_batch / data.max_context: {error}") from None
    kind, path = proxy_source(config)
    marker_ids = (tokenizer.think_open_id, tokenizer.think_close_id)
    identity = {"corpus": build.corpus_fingerprint(config), "split": "train", "documents": corpus.num_documents("train"),
                "tokenizer": tokenizer_fingerprint(tokenizer), "proxy": [kind, str(Path(path).absolute()) if path else ""],
                "seed": config.seed if kind == "scratch" else None, "window": scoring.window,
                "add_bos": scoring.add_bos, "add_eos": scoring.add_eos, "markers": marker_ids, "top_k": 16,
                "process": [process_index, process_count]}
    try:
        table = hard_positions.open_scored(directory, identity)
        if table is None:
            table = _score(config, corpus, tokenizer, start_params, graphdef, scoring, directory, identity, echo)
    except hard_positions.ScoringError as error:
        raise ConfigError(str(error)) from None
    kept = table.fraction_at_least(r.rpt_entropy_threshold)
    echo(f"rpt: {kept:.1%} of the train split's {table.meta['positions']:,} positions have a proxy entropy of at least "
         f"{r.rpt_entropy_threshold} nats; prompts are placed only there")
    return table.at_least(r.rpt_entropy_threshold)


def _score(config, corpus, tokenizer, start_params, graphdef, scoring, directory, identity, echo):
    kind, path = proxy_source(config)
    model = load_proxy(config, start_params, graphdef)
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        raise ConfigError(f"the RPT proxy ({kind} {path or 'start weights'}) has {vocab} token ids but the "
                          f"tokenizer has {tokenizer.vocab_size}; use a proxy that shares the run's tokenizer.")
    echo(f"rpt: scoring the train split's positions with the proxy ({kind} {path or '(start weights)'}, "
         f"{sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))):,} parameters) into {directory}")
    source = corpus.source("train")
    shard = pipeline.shard_indices(len(source), jax.process_index(), jax.process_count(), even_shards=True)
    markers = (tokenizer.think_open_id, tokenizer.think_close_id)
    return hard_positions.score_split(source, shard, tokenizer, scoring, directory, identity,
                                      proxy_entropies(model, markers), echo)
