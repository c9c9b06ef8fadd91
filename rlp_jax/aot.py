"""`rlp-jax compile`: a run's programs compiled ahead of time for its TPU slice or GPU hosts, on any
CPU machine, with the compiler's own memory numbers (docs/launch.md, "Before a launch").

No accelerator, weights or data are needed: the programs are lowered over abstract inputs
(`jax.ShapeDtypeStruct`s carrying the run's shardings) on a mesh of the target's devices
(`rlp_jax.targets`), built by the same functions `rlp-jax train` uses, with the attention kernels
the target runs. This module imports no JAX at import time: the CLI calls `prepare_environment()`
before JAX starts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from rlp_jax import targets as targets_lib

# The custom calls of the fused attention kernels in a compiled program's HLO.
FUSED_ATTENTION_CALLS = {"tpu": ("tpu_custom_call",), "gpu": ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")}
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


class CompileError(ValueError):
    """A config or target that cannot be compiled as asked; one sentence for the user."""


def prepare_environment(compilers: str | None = None) -> None:
    """Before JAX starts: CPU as the only runtime platform (the targets are compile-only), libtpu
    told it is not on a TPU VM (else it warns about the missing metadata), no persistent compilation
    cache (it cannot store a compile-only executable), and the compilers' folder on the path when
    they were installed apart from the environment (`pip install --target DIR`, docs/launch.md)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    folder = compilers or os.environ.get("RLP_JAX_COMPILERS")
    if folder and Path(folder).is_dir() and folder not in sys.path:
        sys.path.insert(0, str(Path(folder).resolve()))


@contextlib.contextmanager
def cudnn_probes_for(chip: targets_lib.GpuChip):
    """JAX asks the local cuDNN library and GPU for their version and compute capability while it
    traces `jax.nn.dot_product_attention(implementation="cudnn")`; on a machine without either, the
    target's answers stand in (private JAX functions: jax is pinned to a minor version)."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    major, minor, patch = targets_lib.CUDNN_VERSION
    version = major * 10_000 + minor * 100 + patch
    capability = lambda s: tuple(int(x) for x in s.split("."))
    saved = fa.check_cudnn_version, fa.check_compute_capability, fa.is_cuda_compute_capability_equal
    fa.check_cudnn_version = lambda: version
    fa.check_compute_capability = lambda s: chip.compute_capability >= capability(s)
    fa.is_cuda_compute_capability_equal = lambda s: chip.compute_capability == capability(s)
    try:
        yield
    finally:
        fa.check_cudnn_version, fa.check_compute_capability, fa.is_cuda_compute_capability_equal = saved


def target_devices(target: targets_lib.Target) -> list:
    try:
        return targets_lib.devices(target)
    except Exception as error:  # the compiler of that platform is not installed
        extra = "tpu-aot" if target.platform == "tpu" else "gpu-aot"
        raise CompileError(f"cannot load the {target.platform.upper()} compiler ({str(error).splitlines()[0]}); "
                           f"install it with `pip install 'rlp-jax[{extra}]'` or into a folder named by "
                           "--compilers (docs/launch.md).") from None


@dataclasses.dataclass
class Program:
    """One compiled program: per-device memory by the compiler, its estimate of cost, its kernels;
    or, when the compiler itself ran out of device memory, what it said (`out_of_memory`)."""
    name: str
    lower_s: float
    compile_s: float
    memory: dict[str, int]
    cost: dict[str, float] | None
    custom_calls: dict[str, int]
    hlo: str = dataclasses.field(repr=False, default="")
    out_of_memory: str | None = None
    required_bytes: int | None = None  # what the compiler said it needed, when it ran out
    # What stays on the device while this program runs but is not among its arguments: for the
    # evaluation programs, the rest of the train state (EMA, optimizer moments).
    resident_bytes: int = 0
    lowered: Any = dataclasses.field(repr=False, default=None)
    compiled: Any = dataclasses.field(repr=False, default=None)

    @property
    def peak_bytes(self) -> int:
        """What the program holds at once on a device: its inputs, the outputs that do not reuse an
        input's buffer, its temporaries and its code."""
        if self.out_of_memory:
            return self.required_bytes or 0
        m = self.memory
        return (m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
                + m["temp_size_in_bytes"] + m["generated_code_size_in_bytes"] + self.resident_bytes)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lower_s": self.lower_s, "compile_s": self.compile_s, "memory": self.memory,
                "peak_bytes": self.peak_bytes, "resident_bytes": self.resident_bytes, "compiler_estimate": self.cost,
                "custom_calls": self.custom_calls, "out_of_memory": self.out_of_memory}


def _required_bytes(message: str) -> int | None:
    """XLA:TPU's "… HLO temporaries (142.70G) exceeds available HBM (15.75G)" as bytes."""
    found = re.search(r"\(([\d.]+)([KMGT])\)", message)
    if not found:
        return None
    return int(float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024)


def compile_lowered(name: str, lower, keep: bool = False) -> Program:
    """Lowers (`lower()` returns a `jax.stages.Lowered`) and compiles, timing both; `keep`: the
    Program keeps the lowered and the compiled program (to save it)."""
    import jax

    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # XLA:TPU refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        message = str(error).splitlines()[0].removeprefix("RESOURCE_EXHAUSTED: ")
        return Program(name, round(t1 - t0, 2), round(time.perf_counter() - t1, 2), {}, None, {},
                       out_of_memory=message, required_bytes=_required_bytes(message))
    t2 = time.perf_counter()
    analysis = compiled.memory_analysis()
    memory = {f: int(getattr(analysis, f)) for f in MEMORY_FIELDS}
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    cost = None if not cost else {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
                                  if k in cost}
    hlo = compiled.as_text()
    calls: dict[str, int] = {}
    for call in re.findall(r'custom_call_target="([^"]+)"', hlo):
        calls[call] = calls.get(call, 0) + 1
    return Program(name, round(t1 - t0, 2), round(t2 - t1, 2), memory, cost, calls, hlo,
                   lowered=lowered if keep else None, compiled=compiled if keep else None)


class _StandInTokenizer:
    """The ids a step's shapes need when the run's tokenizer is only on the cluster: markers and pad
    at the top of the vocabulary, the prompt template one token per byte (an upper bound)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.think_open_id, self.think_close_id, self.pad_id = vocab_size - 3, vocab_size - 2, vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def compile_run(config, target: targets_lib.Target, notes: list[str], for_saving: bool = False) -> list[Program]:
    """Every program of a run of `config` on `target`, compiled: the train step, the held-out
    evaluation's programs when the config evaluates during training (`eval.num_positions` > 0),
    and the periodic benchmarks' when it names benchmark tasks (`eval.benchmark_tasks`).
    `for_saving`: the train step's Program keeps its executable, and a tokenizer that is not here is
    refused rather than stood in for (its ids are compiled into the step)."""
    from rlp_jax import build, config as config_lib, plan, sharding

    devices = target_devices(target)
    processes = len({d.process_index for d in devices})
    try:
        mesh_shape = config_lib.validate_shapes(config, len(devices), processes)
    except config_lib.ConfigError as error:
        raise CompileError(f"{error} ({target.describe()} has {len(devices)} devices on {processes} hosts)") from None
    model_config, tok = plan.model_config_for(config, notes)
    if tok is None and for_saving:
        raise CompileError(f"saving the train step needs the run's tokenizer on this machine (its ids are compiled "
                           f"into the step), and {config.tokenizer!r} is not here; pass --config.tokenizer=PATH.")
    if tok is None:
        tok = _StandInTokenizer(model_config.vocab_size)
        notes.append("marker and pad ids stand in for the tokenizer's; the prompt template counted one token per byte")
    mesh = sharding.make_mesh(mesh_shape, config.mesh.axes, devices=devices)
    program = build.train_program(config, model_config, tok, mesh)
    probes = cudnn_probes_for(targets_lib.GPU_CHIPS[target.chip]) if target.platform == "gpu" \
        else contextlib.nullcontext()
    lowered = [(f"train step ({config.rlp.objective})", program.lower)]
    if config.rlp.objective != "ntp" and config.data.kind == "prompts" and config.eval.num_positions > 0:
        from rlp_jax import evaluate

        lowered += evaluate.lowered_programs(
            program.graphdef, program.abstract_state.params, program.abstract_state.ema_params,
            config.eval.batch_size, config.data.max_context, config.data.target_len,
            build.rollout_config(config, tok, config.eval.num_thoughts), mesh, program.rules)
    if tuple(config.eval.benchmark_tasks):
        from rlp_jax.benchmarks import training as benchmarks_training
        from rlp_jax.benchmarks.tasks import BenchmarkError

        try:
            lowered += benchmarks_training.lowered_programs(
                config, program.graphdef, program.abstract_state.params, model_config.max_position_embeddings, mesh,
                program.rules, notes)
        except BenchmarkError as error:
            raise CompileError(str(error)) from None
    with probes:
        programs = [compile_lowered(name, lower, keep=for_saving and i == 0) for i, (name, lower) in enumerate(lowered)]
    step = programs[0]
    for evaluation in programs[1:]:  # the train state stays resident while the evaluation runs
        if step.memory and evaluation.memory:
            evaluation.resident_bytes = max(step.memory["argument_size_in_bytes"]
                                            - evaluation.memory["argument_size_in_bytes"], 0)
    return programs


# ---------------------------------------------------------------- the command

def knobs(config) -> str:
    """What makes a step hold less at once, in the config's own terms."""
    r = config.rlp
    remat = "" if config.model.remat == "full" else f", set model.remat='full' (now {config.model.remat!r})"
    return (f"raise rlp.rollout_microbatches (now {r.rollout_microbatches}) or rlp.grad_accum_steps (now "
            f"{r.grad_accum_steps}){remat}, or lower train.batch_size (now {config.train.batch_size})")


def report(config_path: str, target: targets_lib.Target, programs: list[Program], notes: list[str],
           seconds: float) -> dict[str, Any]:
    usable = target.usable_bytes
    return {"config": config_path, "target": target.name, "hardware": target.describe(),
            "hbm_bytes": target.hbm_bytes, "usable_bytes": usable, "seconds": round(seconds, 1),
            "fits": all(p.out_of_memory is None and p.peak_bytes <= usable for p in programs), "notes": notes,
            "programs": [p.as_dict() for p in programs]}


def _size(num_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{int(num_bytes)} B"


def format_report(r: dict[str, Any]) -> str:
    gib = _size
    lines = [f"{r['config']} compiled for {r['target']} ({r['hardware']}) in {r['seconds']:.0f} s",
             f"per device: {gib(r['usable_bytes'])} usable of {gib(r['hbm_bytes'])}"]
    for p in r["programs"]:
        m = p["memory"]
        if p["out_of_memory"]:
            lines.append(f"  {p['name']}: the compiler ran out of device memory: {p['out_of_memory']}")
            continue
        lines.append(f"  {p['name']}: {gib(p['peak_bytes'])} = arguments {gib(m['argument_size_in_bytes'])} + "
                     f"outputs {gib(m['output_size_in_bytes'])} - aliased {gib(m['alias_size_in_bytes'])} + "
                     f"temporaries {gib(m['temp_size_in_bytes'])} + code {gib(m['generated_code_size_in_bytes'])}"
                     + (f" + the rest of the train state {gib(p['resident_bytes'])}" if p.get("resident_bytes") else "")
                     + f"; lowered in {p['lower_s']:.1f} s, compiled in {p['compile_s']:.1f} s")
        if p["compiler_estimate"]:
            e = p["compiler_estimate"]
            lines.append("    compiler's estimate (a while loop's body counted once): "
                         + ", ".join(f"{k} {v:.3g}" for k, v in e.items()))
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append("fits" if r["fits"] else "DOES NOT FIT")
    return "\n".join(lines)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compile", help="compile a run's programs for its TPU slice or GPU hosts on this machine; memory by the "
                        "compiler (no accelerator, weights or data)",
        description="rlp-jax compile --config configs/X.py [--target NAME] [--json OUT] [--config.a.b=value ...]\n\n"
                    "Targets: TPU slices CHIP:TOPOLOGY (v4, v5e, v5p, v6e; e.g. v5p:4x4x4) and NVIDIA hosts "
                    "CHIP:HOSTSxGPUS (h100, h200, b200, a100; e.g. h100:4x8). Default: the config file's TARGET.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config .py with get_config()")
    parser.add_argument("--target", default=None, help="hardware to compile for (default: the config's TARGET)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument("--hlo-dir", default=None, help="write each compiled program's HLO text into this folder")
    parser.add_argument("--save-executable", default=None, metavar="DIR",
                        help="save the compiled train step into the new folder DIR, for `rlp-jax train --executable "
                             "DIR` on the target (needs the run's tokenizer here)")
    parser.add_argument("--compilers", default=None, metavar="DIR",
                        help="folder of the TPU/NVIDIA compiler packages installed with `pip install --target` "
                             "(default: $RLP_JAX_COMPILERS, else the environment's own)")
    parser.set_defaults(run=run)
    return parser


def config_target(config_path: str) -> str | None:
    """The optional module-level `TARGET` of a config file."""
    import importlib.util

    if not Path(config_path).is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"rlp_compile_{Path(config_path).stem}", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "TARGET", None)


def run(args: argparse.Namespace) -> int:
    from rlp_jax import config as config_lib
    from rlp_jax import executable

    t0 = time.perf_counter()
    save_to = getattr(args, "save_executable", None)
    try:
        if save_to:
            executable.check_new_folder(save_to)
        name = args.target or config_target(args.config)
        if not name:
            raise CompileError(f"{args.config} names no TARGET; pass --target (e.g. v5p:4x4x4 or h100:1x8).")
        target = targets_lib.parse(name)
        config = config_lib.load_config(args.config, getattr(args, "overrides", []) or [])
        notes: list[str] = []
        programs = compile_run(config, target, notes, for_saving=bool(save_to))
    except (CompileError, targets_lib.TargetError, config_lib.ConfigError, FileNotFoundError) as error:
        print(f"rlp-jax compile: {error}", file=sys.stderr)
        return 2
    result = report(args.config, target, programs, notes, time.perf_counter() - t0)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.hlo_dir:
        folder = Path(args.hlo_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(programs):
            (folder / f"{i}_{re.sub(r'[^a-z0-9]+', '_', p.name.lower()).strip('_')}.hlo.txt").write_text(p.hlo)
    if not result["fits"]:
        worst = max(programs, key=lambda p: (p.out_of_memory is not None, p.peak_bytes))
        needs = f"{worst.peak_bytes / targets_lib.GiB:.1f} GiB"
        if worst.out_of_memory:  # XLA:TPU counts the temporaries it could not place, not the rest
            needs = f"more than {needs} (its temporaries alone, by the compiler)" if worst.peak_bytes else "more"
        print(f"rlp-jax compile: {worst.name} needs {needs} per device but {target.name} has "
              f"{target.usable_bytes / targets_lib.GiB:.1f} GiB usable; {knobs(config)}.", file=sys.stderr)
        return 2
    if save_to:
        step = programs[0]
        size = executable.save(save_to, step.lowered, step.compiled, target.name)
        print(f"saved the train step ({_size(size)}) to {save_to}: on {target.name} run `rlp-jax train --config "
              f"{args.config} --executable {save_to}` with the same overrides")
    return 0
