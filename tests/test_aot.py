"""`rlp-jax compile` on this CPU machine: the train step of both model families compiled by the real
XLA:TPU compiler for a 4-chip v5e slice and by XLA:GPU for a host of 8 H100s, with the fused
attention kernels in the programs, the compiler's memory numbers, and a config that does not fit
refused in one sentence. The compilers come from tests/install.sh (`.compilers/`)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CONFIG = str(Path(__file__).parent / "configs" / "tiny_rlp.py")
# tiny_rlp's 8 prompts over 4 chips; the hybrid's tiny preset; bfloat16 where cuDNN needs it.
TPU = ("v5e:2x2", "--config.mesh.shape=(4, 1, 1)")
GPU = ("h100:1x8", "--config.model.dtype=bfloat16")
HYBRID = "--config.model.preset=nemotron-h-tiny"
SPLASH = ("tpu_custom_call",)
CUDNN = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def compile_cli(tmp_path: Path, target: str, *overrides: str):
    """(exit status, stderr, the JSON report or None, the HLO text of the train step or None)."""
    out, hlo = tmp_path / "report.json", tmp_path / "hlo"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-m", "rlp_jax.cli", "compile", "--config", CONFIG, "--target", target,
                             "--json", str(out), "--hlo-dir", str(hlo), *overrides],
                            capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    report = json.loads(out.read_text()) if out.exists() else None
    texts = sorted(hlo.glob("*.hlo.txt")) if hlo.exists() else []
    return result.returncode, result.stderr, report, texts[0].read_text() if texts else None


def assert_compiled(code, stderr, report, kernels):
    assert code == 0, stderr[-3000:]
    assert report["fits"] and len(report["programs"]) == 1
    step = report["programs"][0]
    memory = step["memory"]
    assert memory["argument_size_in_bytes"] > 0 and memory["temp_size_in_bytes"] > 0
    assert step["peak_bytes"] == (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                                  - memory["alias_size_in_bytes"] + memory["temp_size_in_bytes"]
                                  + memory["generated_code_size_in_bytes"])
    # The state is donated: every output but the metrics reuses an argument's buffer.
    assert memory["alias_size_in_bytes"] >= 0.95 * memory["argument_size_in_bytes"]
    missing = [k for k in kernels if not step["custom_calls"].get(k)]
    assert not missing, f"no {missing} in {step['custom_calls']}"
    return step


def float32_square_tensors(hlo: str, side: int) -> list[str]:
    """float32 arrays whose last two dimensions are both at least `side`: attention score matrices
    of a row that long (no other tensor of the step is that wide twice)."""
    found = []
    for dims in re.findall(r"f32\[([\d,]+)\]", hlo):
        sizes = [int(d) for d in dims.split(",")]
        if len(sizes) >= 3 and min(sizes[-2:]) >= side:
            found.append(dims)
    return found


def test_transformer_step_compiles_for_a_tpu_slice_with_the_splash_kernel(tmp_path):
    """A 600-token context (rows of 605, padded past 512): the splash kernel's blocks must divide
    the padded length, and the update holds no float32 score matrix."""
    code, stderr, report, hlo = compile_cli(tmp_path, *TPU, "--config.data.max_context=600")
    assert_compiled(code, stderr, report, SPLASH)
    assert "splash_mha" in hlo
    assert report["hardware"] == "TPU v5e slice 2x2" and report["usable_bytes"] == int(0.9 * 16 * 2**30)
    assert not float32_square_tensors(hlo, 600)


def test_hybrid_step_compiles_for_a_tpu_slice_and_is_saved_for_the_pod(tmp_path):
    """`--save-executable`: the compiled step (Mosaic kernels included) is written for `rlp-jax train
    --executable` (tests/test_executable.py runs one on CPU); the folder is never reused, and a
    tokenizer that is not here is refused rather than stood in for (its ids are in the program)."""
    saved = tmp_path / "step"
    code, stderr, report, _ = compile_cli(tmp_path, *TPU, HYBRID, "--save-executable", str(saved))
    assert_compiled(code, stderr, report, SPLASH)
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["target"] == "v5e:2x2" and re.fullmatch(r"[0-9a-f]{64}", manifest["program_sha256"])
    assert (saved / "train_step.bin").stat().st_size > 100_000
    for extra, message in [((), "already exists; name a new folder for the saved train step."),
                           (("--config.tokenizer=/nowhere/tokenizer.json",),
                            "saving the train step needs the run's tokenizer on this machine")]:
        folder = saved if not extra else tmp_path / "other"
        code, stderr, _, _ = compile_cli(tmp_path / "again", *TPU, HYBRID, *extra, "--save-executable", str(folder))
        lines = [line for line in stderr.splitlines() if line.startswith("rlp-jax")]
        assert code == 2 and len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert not (tmp_path / "other").exists()


def test_transformer_step_compiles_for_an_h100_host_with_cudnn_attention(tmp_path):
    """tiny_rlp's update rows are 10 + 1 + 4 = 15 tokens: cuDNN under the gradient takes even
    lengths only, so the odd row is padded by one hidden position."""
    code, stderr, report, hlo = compile_cli(tmp_path, *GPU)
    step = assert_compiled(code, stderr, report, CUDNN)
    assert report["hardware"] == "1 host(s) x 8 NVIDIA H100 80GB HBM3"
    assert step["memory"]["generated_code_size_in_bytes"] == 0  # XLA:GPU does not count it here


def test_hybrid_step_compiles_for_an_h100_host_with_cudnn_attention(tmp_path):
    code, stderr, report, _ = compile_cli(tmp_path, *GPU, HYBRID)
    assert_compiled(code, stderr, report, CUDNN)


def test_a_config_that_does_not_fit_is_refused_in_one_sentence_naming_the_knobs(tmp_path):
    """Qwen3-8B's weights, EMA and Adam moments alone are ~128 GB: over 4 v5e chips of 16 GiB."""
    code, stderr, report, _ = compile_cli(tmp_path, *TPU, "--config.model.preset=qwen3-8b",
                                          "--config.model.remat=full")
    assert code == 2
    assert not report["fits"] and report["programs"][0]["peak_bytes"] > report["usable_bytes"]
    lines = [line for line in stderr.splitlines() if line.startswith("rlp-jax compile:")]
    assert len(lines) == 1, stderr[-2000:]
    for knob in ("raise rlp.rollout_microbatches", "rlp.grad_accum_steps", "lower train.batch_size"):
        assert knob in lines[0]
    assert "model.remat" not in lines[0]  # already 'full': not offered again


@pytest.mark.parametrize("target, message", [
    ("v9x:2x2", "unknown target 'v9x:2x2'"),
    ("h100:8", "unknown target 'h100:8'"),
])
def test_an_unknown_target_is_refused_in_one_sentence(tmp_path, target, message):
    code, stderr, _, _ = compile_cli(tmp_path, target)
    assert code == 2 and message in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("family", ["transformer", "hybrid"])
@pytest.mark.parametrize("target", ["v5e:2x2", "h100:1x8"])
def test_the_decode_loop_compiled_for_an_accelerator_copies_no_layer_cache_or_weights(tmp_path, target, family):
    """The decode loops compiled by XLA:TPU (v5e) and XLA:GPU (H100), both model families: inside
    each decode while loop, no copy, slice or transpose as large as a layer's cache block, prompt
    prefix, weight matrix or (the hybrid) SSM state (tests/decode_loop.py; tests/test_decode.py
    checks XLA:CPU's program). On XLA:TPU a per-row scatter of the new keys and values made every
    step copy each layer's block into the attention dot's layout (`decode.write_slots`)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import decode_loop

    out = tmp_path / "sampler.hlo.txt"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run([sys.executable, str(Path(__file__).parent / "aot_decode_worker.py"), target, family,
                             str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    config = {"transformer": decode_loop.small_config, "hybrid": decode_loop.hybrid_config}[family]
    loops, offenders = decode_loop.loop_copies(out.read_text(), config(dtype="bfloat16"))
    assert loops >= 2
    assert not offenders, "\n".join(offenders)


def test_train_refuses_a_compiled_step_larger_than_the_free_device_memory(monkeypatch):
    """`rlp-jax train` on an accelerator: the compiled step's own memory count (beyond the state it
    is given) against the device's free memory, before the first step. A CPU device reports no
    memory limit, so the accelerator's `memory_stats()` is stood in for; the program is real."""
    import jax
    import jax.numpy as jnp

    from rlp_jax import config as config_lib
    from rlp_jax import preflight

    config = config_lib.load_config(CONFIG)
    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T)).lower(jax.ShapeDtypeStruct((512, 256), jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    needed = analysis.output_size_in_bytes - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes \
        + analysis.generated_code_size_in_bytes
    assert needed >= 512 * 512 * 4  # the 512 x 512 output

    class Device:
        device_kind = "TPU v5 lite"

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit, "bytes_in_use": 1000}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device(needed + 1000 + 1)])
    assert "per device beyond its arguments" in preflight.check_compiled_memory(compiled, config)
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(needed + 1000 - 1)])
    with pytest.raises(config_lib.ConfigError, match="rlp.rollout_microbatches.*train.batch_size"):
        preflight.check_compiled_memory(compiled, config)


def test_a_shipped_config_compiles_without_its_weights_or_tokenizer(tmp_path):
    """A paper config names weights and a tokenizer that live on the cluster (`init.path` unset
    here): `compile` takes the shapes from `model.preset`, as `plan` does, instead of refusing, and
    counts benchmark prompts one token per byte.
    The model and lengths are shrunk to keep the test short; the checks are the config's own."""
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    result = subprocess.run([sys.executable, "-m", "rlp_jax.cli", "compile", "--config",
                             "configs/rlp_qwen3_0p6b_h100x1.py", "--json", str(out), "--config.model.preset=tiny",
                             "--config.rlp.max_thought_len=16", "--config.data.max_context=32",
                             "--config.eval.num_positions=16", "--config.eval.batch_size=8",
                             "--config.eval.benchmark_tasks=('demo_addition', 'sciq')", "--config.eval.benchmark_limit=8",
                             "--config.eval.benchmark_batch_size=8", "--config.eval.benchmark_max_new_tokens=16"],
                            capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["target"] == "h100:1x1" and report["fits"]
    assert any("init.path is not set" in note for note in report["notes"]), report["notes"]
    assert any("one token per byte" in note for note in report["notes"]), report["notes"]
    # With held-out evaluation and benchmarks on, their programs are compiled too, and counted with
    # the train state that stays on the device while they run (the EMA and the optimizer's moments).
    step, *evaluation = report["programs"]
    assert [p["name"] for p in evaluation] == ["held-out evaluation: sampled thoughts",
                                               "held-out evaluation: greedy thoughts",
                                               "held-out evaluation: no-think scores",
                                               "benchmark: demo_addition greedy", "benchmark: demo_addition sampled",
                                               "benchmark: sciq option log-likelihoods"]
    for p in evaluation:
        arguments = p["memory"]["argument_size_in_bytes"]
        assert p["resident_bytes"] == step["memory"]["argument_size_in_bytes"] - arguments > 0
        assert p["peak_bytes"] >= arguments + p["resident_bytes"]
