"""The sampler's decode loops as compiled programs: what each while-loop body copies or slices.

Shared by tests/test_decode.py (XLA:CPU) and tests/aot_decode_worker.py (XLA:TPU and XLA:GPU,
compiled for hardware this machine does not have)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rlp_jax import sampling
from rlp_jax.models import ModelConfig, decode, init_model

B, G = 3, 2  # prompts, samples per prompt
LENGTHS = np.array([5, 2, 7])
PROMPT_WIDTH, BLOCK_LEN, NEW_TOKENS = 16, 8, 16


def small_config(**overrides) -> ModelConfig:
    return ModelConfig("qwen3", 64, 32, 2, 4, 2, 8, 64, False, 10_000.0, 1e-6, 64).replace(**overrides)


def sampler(c: ModelConfig):
    """(run(params, prompts_BxP, lengths_B, key), params): G samples of NEW_TOKENS per prompt,
    over cache blocks of BLOCK_LEN (so several decode loops)."""
    graphdef, params = nnx.split(init_model(c, seed=0))
    cfg = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, block_len=BLOCK_LEN)

    def run(p, prompts_BxP, lengths_B, key):
        return sampling.sample(decode.decode_weights(nnx.merge(graphdef, p)), prompts_BxP, lengths_B, key, cfg,
                               num_samples=G)

    return run, params


def prompts(vocab: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    tokens = np.where(np.arange(PROMPT_WIDTH) < LENGTHS[:, None], rng.randint(1, vocab, (B, PROMPT_WIDTH)), 0)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(LENGTHS, jnp.int32)


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?(%[\w.\-]+) .*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif current is not None:
            current.append(line)
    return comps


def _called(comps: dict[str, list[str]], root: str) -> set[str]:
    """`root` and every computation it calls (fusions, reductions, nested loops)."""
    seen, todo = set(), [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            todo += re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?(%[\w.\-]+)", line)
    return seen


def _elements(shape: str) -> int:
    dims = re.match(r"\w+\[([\d,]*)\]", shape).group(1)
    return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def loop_copies(hlo: str, c: ModelConfig) -> tuple[int, list[str]]:
    """(the number of while loops, the copies / slices / transposes inside their bodies as large as
    one layer's cache block, prompt prefix or smallest weight matrix). Every activation of this
    model is smaller than that, so any such op copies a layer's cache or weights each step."""
    comps = _computations(hlo)
    bodies = set(re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo))
    block = B * G * c.num_kv_heads * BLOCK_LEN * c.head_dim
    prefix = B * c.num_kv_heads * PROMPT_WIDTH * c.head_dim
    weight = min(c.hidden_size * c.num_kv_heads * c.head_dim, c.hidden_size * c.intermediate_size)
    threshold = min(block, prefix, weight)
    assert threshold > B * G * max(c.vocab_size, c.intermediate_size, c.num_heads * c.head_dim)
    offenders = []
    for body in bodies:
        for name in _called(comps, body):
            for line in comps[name]:
                op = re.search(r"=\s+(\w+\[[\d,]*\])\S*\s+(copy|dynamic-slice|slice|transpose)\(", line)
                if op and _elements(op.group(1)) >= threshold:
                    offenders.append(line.strip()[:160])
    return len(bodies), offenders
