"""Batched generation for benchmarks through the project's sampler (rlp_jax.sampling: jitted
prefill + decode over the rollout KV cache): greedy or temperature / top-p / top-k sampling with
a seed, stop tokens, stop strings, a maximum of new tokens, progress with ETA and tokens/s.

Prompts are right-padded to a few bucketed lengths (`loglik.bucket`) and every batch has the same
number of rows (short batches are filled with one-token dummies), so a run compiles once per
prompt bucket. Each
prompt's keys and values are prefilled once for its `num_samples` samples. The key of batch i is
`fold_in(key(seed), i)`: a run is reproducible for the same batch size.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlp_jax import sampling, sharding
from rlp_jax.benchmarks.loglik import bucket, to_host


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 2048
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 16  # prompts per batch (rows: batch_size × num_samples)
    prompt_multiple: int = 64  # prompt lengths are padded to the grid `prompt_multiple · {1, 1.5} · 2^k`
    max_prompt_len: int | None = None  # longer prompts keep their last tokens (default: no limit)
    block_len: int = 256  # the sampler's cache block (slots a decode step reads, at this granularity)


@dataclasses.dataclass
class Generations:
    tokens: list[list[list[int]]]  # [prompt][sample] -> generated token ids (through a stop token)
    finished: np.ndarray  # [prompt, sample]: a stop token was produced
    num_tokens: int  # generated tokens in all
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def generate(model, prompts: list[list[int]], cfg: GenerationConfig, *, stop_ids: tuple[int, ...] = (),
             pad_id: int = 0, mesh: jax.sharding.Mesh | None = None, rules=sharding.DEFAULT_RULES,
             label: str = "", progress: Callable[[str], None] | None = None) -> Generations:
    """`cfg.num_samples` continuations of each prompt (token ids), with the sampler of
    rlp_jax.sampling. With `mesh` (the model's params on it), each batch is split over the mesh's
    batch axes. `progress` receives one line per batch (prompts done, tokens/s, ETA)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token.")
    scfg = _sampling_config(cfg, stop_ids, pad_id)
    prompts = _cut(prompts, cfg)
    G, B = cfg.num_samples, cfg.batch_size
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[list[int]]] = [[] for _ in prompts]
    finished = np.zeros((len(prompts), G), bool)
    key = jax.random.key(cfg.seed)
    start_time, generated = time.perf_counter(), 0
    num_batches = -(-len(prompts) // B)
    for i in range(num_batches):
        chosen = order[i * B:(i + 1) * B]
        P = widest_prompt([prompts[j] for j in chosen], cfg)
        tokens = np.full((B, P), pad_id, np.int32)
        lengths = np.ones(B, np.int32)
        for b, j in enumerate(chosen):
            tokens[b, :len(prompts[j])] = prompts[j]
            lengths[b] = len(prompts[j])
        batch_key = jax.random.fold_in(key, i)
        if mesh is None:
            result = sampling.generate(model, tokens, lengths, batch_key, scfg, num_samples=G)
        else:
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                result = sampling.generate(model, sharding.place_batch(tokens, mesh, rules),
                                           sharding.place_batch(lengths, mesh, rules), batch_key, scfg, num_samples=G)
        tokens_NxL, lengths_N, finished_N = to_host((result.tokens_NxL, result.lengths_N, result.finished_N))
        for b, j in enumerate(chosen):
            for g in range(G):
                n = b * G + g
                out[j].append([int(t) for t in tokens_NxL[n, :lengths_N[n]]])
                finished[j, g] = bool(finished_N[n])
                generated += int(lengths_N[n])
        if progress is not None:
            elapsed = time.perf_counter() - start_time
            done = min((i + 1) * B, len(prompts))
            eta = elapsed / done * (len(prompts) - done)
            progress(f"{label + ': ' if label else ''}{done}/{len(prompts)} prompts × {G} samples, "
                     f"{generated / elapsed:,.0f} tokens/s, elapsed {_duration(elapsed)}, ETA {_duration(eta)}")
    return Generations(out, finished, generated, time.perf_counter() - start_time)


def _sampling_config(cfg: GenerationConfig, stop_ids, pad_id: int) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                   top_p=cfg.top_p, stop_tokens=tuple(int(i) for i in stop_ids), pad_id=pad_id,
                                   block_len=cfg.block_len)


def _cut(prompts, cfg: GenerationConfig):
    return [list(p)[-cfg.max_prompt_len:] for p in prompts] if cfg.max_prompt_len else prompts


def widest_prompt(prompts: list[list[int]], cfg: GenerationConfig) -> int:
    """The padded prompt width of `generate`'s widest batch of `prompts`."""
    return bucket(max(len(p) for p in _cut(prompts, cfg)), cfg.prompt_multiple)


def lower_widest(graphdef, abstract_params, prompts: list[list[int]], cfg: GenerationConfig, *,
                 stop_ids: tuple[int, ...], pad_id: int, mesh: jax.sharding.Mesh, rules) -> jax.stages.Lowered:
    """The sampler `generate` runs, lowered over abstract inputs for its widest batch of `prompts`
    on `mesh` (its largest program: the other batches are narrower)."""
    shapes = [((cfg.batch_size, widest_prompt(prompts, cfg)), jnp.int32), ((cfg.batch_size,), jnp.int32)]
    tokens, lengths = (jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(s, mesh, rules))
                       for s, d in shapes)
    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return sampling.generate_program.lower(graphdef, abstract_params, tokens, lengths, key,
                                               _sampling_config(cfg, stop_ids, pad_id), cfg.num_samples, 0)


def cut_at_stop(text: str, stop_strings: tuple[str, ...]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop_strings if s) if i >= 0), default=len(text))
    return text[:cut]


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
