"""`rlp-jax evaluate` multi-host: 2 CPU processes × 4 devices, joined by jax.distributed (gloo)
from the RLP_JAX_* variables, give the scores and per-item responses of 1 process × 8 devices on
a tiny random Qwen3 (an HF folder: a generation task and a log-likelihood multiple-choice task; a
run's checkpoint: a log-likelihood task); only process 0 writes the output files."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import torch
import transformers

from rlp_jax import cli

TIMEOUT_S = 240  # the processes of a failed run would wait for each other forever: stop them by pid
TIMINGS = ("seconds", "tokens_per_second")  # wall-clock numbers, not results


def _tiny_hf(folder):
    """A random tiny Qwen3 over the byte tokenizer's 260 ids (as tests/test_benchmarks.py builds it)."""
    cfg = transformers.Qwen3Config(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.2,
                                   rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).float().eval().save_pretrained(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _outputs(prefix):
    result = json.loads((prefix.parent / f"{prefix.name}.json").read_text())
    records = [json.loads(line) for line in (prefix.parent / f"{prefix.name}.samples.jsonl").read_text().splitlines()]
    return result, records


def _without_timings(numbers: dict) -> dict:
    return {k: v for k, v in numbers.items() if k not in TIMINGS}


def _one_and_two_processes(args: list[str], tmp_path) -> tuple:
    """`rlp-jax ARGS` as 2 processes × 4 devices (in the background; process 1 is given its own
    --out, where it must write nothing) and as 1 process × 8 devices (here, meanwhile): the outputs
    (result, records) of the one process and of process 0 of the two."""
    port, logs, procs = _free_port(), [], []
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLP_JAX_")}
    env |= {"JAX_PLATFORMS": "cpu", "RLP_JAX_COORDINATOR": f"localhost:{port}", "RLP_JAX_NUM_PROCESSES": "2",
            "XLA_FLAGS": " ".join([f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                  + ["--xla_force_host_platform_device_count=4"])}
    try:
        for i in range(2):
            logs.append(open(tmp_path / f"process_{i}.log", "w"))
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "rlp_jax.cli", *args, "--out", str(tmp_path / f"two{i}" / "bench")],
                stdout=logs[i], stderr=subprocess.STDOUT, env=env | {"RLP_JAX_PROCESS_ID": str(i)}))
        assert cli.main([*args, "--out", str(tmp_path / "one" / "bench")]) == 0
        deadline = time.time() + TIMEOUT_S
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # by pid: a process blocked in a collective ignores SIGTERM
                p.wait(timeout=30)
        for f in logs:
            f.close()
    output = "\n".join(f"--- process {i}\n" + (tmp_path / f"process_{i}.log").read_text()[-3000:] for i in range(2))
    assert [p.returncode for p in procs] == [0, 0], output
    assert (tmp_path / "two0" / "bench.md").exists()
    assert not (tmp_path / "two1").exists(), "process 1 wrote output files"
    return _outputs(tmp_path / "one" / "bench"), _outputs(tmp_path / "two0" / "bench")


def _assert_loglik_equal(one: dict, two: dict, one_records: list, two_records: list, task: str, items: int):
    """The options' log-probabilities (to 1e-6), the task's numbers and the grades of `task`."""
    a, b = _without_timings(one["tasks"][task]), _without_timings(two["tasks"][task])
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], float):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-6, err_msg=key)
        else:
            assert b[key] == a[key], key
    scored = lambda records: [r for r in records if r["task"] == task]
    assert len(scored(one_records)) == len(scored(two_records)) == items
    for x, y in zip(scored(one_records), scored(two_records)):
        assert {k: v for k, v in x.items() if k != "option_logprobs"} == \
               {k: v for k, v in y.items() if k != "option_logprobs"}
        np.testing.assert_allclose(y["option_logprobs"], x["option_logprobs"], rtol=1e-6, atol=1e-6)


def test_two_processes_match_one_process(tmp_path):
    _tiny_hf(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "aime25.jsonl").write_text("".join(
        json.dumps({"id": str(i), "question": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(9)))
    # 9 items: two generation batches of 8 prompts (the second one padded), 36 option rows in 5 batches.
    args = ["evaluate", "--hf", str(tmp_path / "model"), "--tokenizer", "bytes", "--tasks", "aime25", "sciq",
            "--data-dir", str(tmp_path / "data"), "--limit", "9", "--prompt", "plain", "--samples", "2",
            "--math-greedy", "--choice-mode", "loglik", "--max-new-tokens", "8", "--batch-size", "8"]
    (one, one_records), (two, two_records) = _one_and_two_processes(args, tmp_path)
    assert one["settings"] == two["settings"] and one["model"] == two["model"]
    assert list(one["tasks"]) == list(two["tasks"]) == ["aime25", "sciq"]
    # Generation: the same responses, grades and numbers, exactly.
    assert _without_timings(two["tasks"]["aime25"]) == _without_timings(one["tasks"]["aime25"])
    assert one["tasks"]["aime25"]["generated_tokens"] > 0
    generated = lambda records: [r for r in records if r["task"] == "aime25"]
    assert len(generated(one_records)) == 9
    assert generated(two_records) == generated(one_records)
    assert all(len(r["sampled"]) == 2 and len(r["greedy"]) == 1 for r in generated(one_records))
    assert all(r["greedy"][0]["response"] for r in generated(one_records))  # real text to compare
    # Log-likelihood: the same options' log-probabilities (to 1e-6) and the same grades.
    _assert_loglik_equal(one, two, one_records, two_records, "sciq", 9)
    assert two["suites"].keys() == one["suites"].keys()
    for name in one["suites"]:
        assert two["suites"][name]["tasks"] == one["suites"][name]["tasks"]
        np.testing.assert_allclose(two["suites"][name]["score"], one["suites"][name]["score"], rtol=1e-6, atol=1e-6)


def test_two_processes_evaluate_a_runs_checkpoint(tmp_path):
    """--workdir: every process restores the run's params (saved by 1 process × 8 devices) onto the
    2-process mesh."""
    import jax
    from flax import nnx

    from rlp_jax import checkpoint as ckpt_lib
    from rlp_jax import sharding
    from rlp_jax.models import convert, hf

    _tiny_hf(tmp_path / "model")
    model = hf.load_hf(tmp_path / "model", mesh=sharding.make_mesh((8, 1, 1)))  # as a 1-process run holds it
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text(convert.config_to_json(model.config))
    (run / "config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    checkpointer = ckpt_lib.Checkpointer(run / "checkpoints", async_save=False)
    params = nnx.state(model, nnx.Param)
    opt = jax.tree.map(lambda x: x * 0, params)  # a training state holds more than the params
    checkpointer.save(3, {"params": params, "opt_state": opt}, None, "{}")
    checkpointer.close()
    args = ["evaluate", "--workdir", str(run), "--tasks", "sciq", "--limit", "3", "--choice-mode", "loglik",
            "--loglik-style", "cloze", "--batch-size", "8"]
    (one, one_records), (two, two_records) = _one_and_two_processes(args, tmp_path)
    assert one["model"] == two["model"] and one["model"].endswith("@step3")
    _assert_loglik_equal(one, two, one_records, two_records, "sciq", 3)
    assert all(max(r["option_logprobs"]) < 0 for r in one_records)
