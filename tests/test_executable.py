"""A train step saved ahead of time (`rlp-jax compile --save-executable`) and run by `rlp-jax train
--executable`: on CPU, the saved step trains bitwise as the step the run compiles itself, it is the
saved program that runs, and a folder that is not this run's very program (or not a saved step, or
from another JAX) is refused in one sentence before the workdir is written. The TPU side (the
command saving a step compiled for a v5e slice) is in tests/test_aot.py."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlp_jax import build, cli, executable, sharding, trainer
from rlp_jax import checkpoint as ckpt_lib
from rlp_jax import config as config_lib

CONFIG = str(Path(__file__).parent / "configs" / "tiny_rlp.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny(data_dir, *overrides):
    return config_lib.load_config(CONFIG, [f"data.data_dir={data_dir}", "train.steps=2",
                                           "checkpoint.every_steps=2", *overrides])


def lowered_step(config):
    """This run's train step, lowered as `rlp-jax train` builds it (8 CPU devices)."""
    tok = build.tokenizer(config)
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = sharding.make_mesh(mesh_shape, config.mesh.axes)
    return build.train_program(config, build.model_config(config, tok), tok, mesh).lower()


def save_step(config, folder):
    """What `rlp-jax compile --save-executable` writes, for the CPU devices here (the command itself
    compiles for TPU and NVIDIA targets)."""
    lowered = lowered_step(config)
    return executable.save(folder, lowered, lowered.compile(), "cpu:8")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_dir):
    folder = tmp_path_factory.mktemp("saved") / "step"
    assert save_step(tiny(data_dir), folder) > 0
    return folder


def trained(config, workdir, **kwargs):
    trainer.train(config, workdir, echo=lambda *_: None, **kwargs)
    metrics = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and "per_s" not in k}
               for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return metrics, jax.tree.leaves(ckpt_lib.RunDir(workdir).latest_params())


def test_the_saved_step_trains_bitwise_as_the_step_compiled_in_the_run(tmp_path, data_dir, saved):
    manifest = json.loads((saved / executable.MANIFEST).read_text())
    assert manifest["target"] == "cpu:8" and manifest["jax"] == jax.__version__
    assert manifest["program_sha256"] == executable.program_hash(lowered_step(tiny(data_dir)))
    metrics, params = trained(tiny(data_dir), tmp_path / "compiled")
    loaded_metrics, loaded_params = trained(tiny(data_dir), tmp_path / "loaded", executable=saved)
    assert [m["step"] for m in loaded_metrics] == [1, 2] and loaded_metrics == metrics
    for a, b in zip(params, loaded_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_it_is_the_saved_program_that_runs(tmp_path, data_dir):
    """A step compiled with 100× the learning rate, its manifest made to claim this run's program:
    the run trains with it (so the loaded executable, not a fresh compile, is what runs)."""
    forged = tmp_path / "forged"
    save_step(tiny(data_dir, "train.learning_rate=1.0"), forged)
    manifest = json.loads((forged / executable.MANIFEST).read_text())
    manifest["program_sha256"] = executable.program_hash(lowered_step(tiny(data_dir)))
    (forged / executable.MANIFEST).write_text(json.dumps(manifest))
    _, honest = trained(tiny(data_dir), tmp_path / "honest")
    _, with_forged = trained(tiny(data_dir), tmp_path / "with_forged", executable=forged)
    moved = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))  # noqa: E731
    assert max(moved(a, b) for a, b in zip(honest, with_forged, strict=True)) > 1e-3


def _train_cli(capsys, workdir, data_dir, folder, *overrides):
    code = cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), f"--config.data.data_dir={data_dir}",
                     "--config.train.steps=2", "--config.checkpoint.every_steps=2", *overrides,
                     "--executable", str(folder)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rlp-jax")]
    return code, lines


def test_a_folder_that_is_not_this_runs_step_is_refused_before_the_workdir_is_written(
        tmp_path, data_dir, saved, capsys):
    capsys.readouterr()
    # Another program: the run's clipping range differs from the saved step's.
    code, lines = _train_cli(capsys, tmp_path / "w1", data_dir, saved, "--config.rlp.eps_low=0.1")
    assert code == 2 and len(lines) == 1 and "holds another program than this run's train step" in lines[0]
    # Not a saved step.
    code, lines = _train_cli(capsys, tmp_path / "w2", data_dir, tmp_path / "nowhere")
    assert code == 2 and len(lines) == 1 and "holds no saved train step" in lines[0]
    # Another JAX.
    other = tmp_path / "other_jax"
    other.mkdir()
    for name in (executable.MANIFEST, executable.PAYLOAD):
        (other / name).write_bytes((saved / name).read_bytes())
    manifest = json.loads((other / executable.MANIFEST).read_text())
    (other / executable.MANIFEST).write_text(json.dumps({**manifest, "jaxlib": "0.0.1"}))
    code, lines = _train_cli(capsys, tmp_path / "w3", data_dir, other)
    assert code == 2 and len(lines) == 1 and "was compiled with jaxlib 0.0.1" in lines[0]
    # A damaged payload under a good manifest.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / executable.MANIFEST).write_bytes((saved / executable.MANIFEST).read_bytes())
    (damaged / executable.PAYLOAD).write_bytes((saved / executable.PAYLOAD).read_bytes()[:1000])
    code, lines = _train_cli(capsys, tmp_path / "w4", data_dir, damaged)
    assert code == 2 and len(lines) == 1 and "train_step.bin could not be loaded" in lines[0]
    assert not any((tmp_path / w).exists() for w in ("w1", "w2", "w3", "w4"))


def test_a_saved_step_is_never_overwritten(tmp_path, data_dir, saved):
    before = (saved / executable.PAYLOAD).read_bytes()
    with pytest.raises(executable.ExecutableError, match="already exists; name a new folder"):
        save_step(tiny(data_dir), saved)
    assert (saved / executable.PAYLOAD).read_bytes() == before
    assert not saved.with_name(saved.name + ".partial").exists()
