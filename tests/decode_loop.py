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
from rlp_jax.models import ModelConfig, init_model
from rlp_jax.models import nemotron_h as nh

B, G = 3, 2  # prompts, samples per prompt
LENGTHS = np.array([5, 2, 7])
PROMPT_WIDTH, BLOCK_LEN, NEW_TOKENS = 16, 8, 16


def small_config(**overrides) -> ModelConfig:
    return ModelConfig("qwen3", 64, 32, 2, 4, 2, 8, 64, False, 10_000.0, 1e-6, 64).replace(**overrides)


def hybrid_config(**overrides) -> nh.NemotronHConfig:
    """A Nemotron-H hybrid with two layers of each block type, sized as `small_config`."""
    return nh.NemotronHConfig(vocab_size=64, hidden_size=32, pattern="M*-M*-", num_heads=4, num_kv_heads=2, head_dim=8,
                              intermediate_size=64, mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2,
                              chunk_size=8).replace(**overrides)


def sampler(c):
    """(run(params, prompts_BxP, lengths_B, key), params): G samples of NEW_TOKENS per prompt,
    over cache blocks of BLOCK_LEN (so several decode loops), for a model of either family."""
    model = init_model(c, seed=0) if isinstance(c, ModelConfig) else nh.init_model(c, seed=0)
    graphdef, params = nnx.split(model)
    cfg = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, block_len=BLOCK_LEN)

    def run(p, prompts_BxP, lengths_B, key):
        return sampling.sample(sampling.weights_of(nnx.merge(graphdef, p)), prompts_BxP, lengths_B, key, cfg,
                               num_samples=G)

    return run, params


def decode_program(c, abstract: bool = False):
    """(run(params, start, key), (params, start, key)): the decode loops alone, from a `start`
    that `sampling.prefill` made (the program to inspect: a prefill has loops of its own, e.g.
    the hybrid's chunked SSD scan). `abstract`: `start` as shapes only (a config resolved for
    another platform cannot run its prefill here)."""
    model = init_model(c, seed=0) if isinstance(c, ModelConfig) else nh.init_model(c, seed=0)
    graphdef, params = nnx.split(model)
    cfg = sampling.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, block_len=BLOCK_LEN)
    prefill = lambda p, t, n: sampling.prefill(sampling.weights_of(nnx.merge(graphdef, p)), t, n, cfg,  # noqa: E731
                                               num_samples=G)
    inputs = (params, *prompts(c.vocab_size))
    start = jax.eval_shape(prefill, *inputs) if abstract else jax.jit(prefill)(*inputs)

    def run(p, start, key):
        return sampling.decode_loop(sampling.weights_of(nnx.merge(graphdef, p)), start, key, cfg)

    return run, (params, start, jax.random.key(0))


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


def _dims(shape: str) -> tuple[int, ...]:
    dims = re.match(r"\w+\[([\d,]*)\]", shape).group(1)
    return tuple(int(d) for d in dims.split(",") if d)


def _elements(shape: str) -> int:
    dims = re.match(r"\w+\[([\d,]*)\]", shape).group(1)
    return int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1


def _threshold(c) -> int:
    """The smallest of one layer's cache block, prompt prefix, weight matrix and (the hybrid) Mamba
    state, checked to exceed every activation of a decode step."""
    block = B * G * c.num_kv_heads * BLOCK_LEN * c.head_dim
    prefix = B * c.num_kv_heads * PROMPT_WIDTH * c.head_dim
    weight = min(c.hidden_size * c.num_kv_heads * c.head_dim, c.hidden_size * c.intermediate_size)
    activations = [c.vocab_size, c.intermediate_size, c.num_heads * c.head_dim]
    sizes = [block, prefix, weight]
    if isinstance(c, nh.NemotronHConfig):
        inner, groups = c.mamba_inner, c.n_groups * c.ssm_state_size
        sizes += [B * G * inner * c.ssm_state_size,  # one layer's SSM state
                  B * G * (c.conv_kernel - 1) * inner,  # one layer's conv history of x
                  c.hidden_size * groups, c.hidden_size * inner, inner * c.hidden_size]  # in_B / in_C, in_x / in_z, out
        activations += [inner + 2 * groups]
    threshold = min(sizes)
    assert threshold > B * G * max(activations)
    return threshold


def _conv_history_shapes(c) -> set[tuple[int, ...]]:
    """The hybrid's Mamba conv histories `[rows, K−1, ...]`: a shift register of the last K−1
    inputs that every decode step rewrites whole by definition (its slice of the new input is the
    update itself; its traffic is ~1 % of the SSM state's at the published shapes)."""
    if not isinstance(c, nh.NemotronHConfig):
        return set()
    K1 = c.conv_kernel - 1
    return {(B * G, K1, c.mamba_num_heads, c.mamba_head_dim), (B * G, K1, c.n_groups, c.ssm_state_size)}


def ssm_state_copies(offenders: list[str], c) -> list[str]:
    """The offenders that copy a whole SSM state `[rows, Hm, P, N]` (one layer's) and nothing else."""
    shape = (B * G, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size)
    return [line for line in offenders
            if re.search(r"=\s+\w+\[([\d,]*)\]\S*\s+copy\(%get-tuple-element", line)
            and _dims(re.search(r"=\s+(\w+\[[\d,]*\])", line).group(1)) == shape]


def loop_copies(hlo: str, c) -> tuple[int, list[str]]:
    """(the number of while loops, the copies / slices / transposes inside their bodies as large as
    one layer's cache block, prompt prefix, smallest weight matrix or (the hybrid) SSM state; the
    hybrid's conv histories excepted, `_conv_history_shapes`).
    Every activation of these models is smaller than that, so any such op copies a layer's cache,
    state or weights each step."""
    comps = _computations(hlo)
    bodies = set(re.findall(r"while\(.*?body=(%[\w.\-]+)", hlo))
    threshold, shift_register = _threshold(c), _conv_history_shapes(c)
    offenders = []
    for body in bodies:
        for name in _called(comps, body):
            for line in comps[name]:
                op = re.search(r"=\s+(\w+\[[\d,]*\])\S*\s+(copy|dynamic-slice|slice|transpose)\(", line)
                if op and _elements(op.group(1)) >= threshold and _dims(op.group(1)) not in shift_register:
                    offenders.append(line.strip()[:160])
    return len(bodies), offenders
