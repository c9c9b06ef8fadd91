"""The hardware a run can be compiled for without having it: TPU slices and NVIDIA GPU hosts.

A target names a chip and a layout. TPU targets are JAX topology names (`v5p:4x4x4` is a v5p-128
slice: 64 chips on 16 hosts); NVIDIA targets are `CHIP:HOSTSxGPUS` (`h100:4x8` is 4 hosts of
8 H100s). `devices(target)` returns the target's devices from `jax.experimental.topologies`, so
that `jax.jit(f).lower(...).compile()` runs the real XLA:TPU or XLA:GPU compiler on a CPU machine
(docs/launch.md). An NVIDIA chip is described to XLA by a `GpuTargetConfigProto` written here from
the chip's published specifications.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 2**30
# Of each device's memory, what a run may plan to use: the launch scripts give XLA 90%
# (XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 on GPUs); the rest is the runtime's and fragmentation's.
USABLE_FRACTION = 0.9


class TargetError(ValueError):
    """A target name that names no known hardware."""


@dataclasses.dataclass(frozen=True)
class GpuChip:
    """What XLA's GPU compiler needs to know of an NVIDIA chip (its `gpu_device_info`)."""
    description: str
    sm_count: int
    memory_bytes: int
    bandwidth_bytes_per_s: float
    l2_cache_bytes: int
    clock_ghz: float
    compute_capability: tuple[int, int]
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    registers_per_sm: int = 65_536
    threads_per_sm: int = 2_048

    def target_config(self, cudnn_version: tuple[int, int, int]) -> str:
        """The chip as an `xla.GpuTargetConfigProto` in protobuf text format."""
        major, minor = self.compute_capability
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024", "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152", f"  shared_memory_per_core: {self.shared_memory_per_sm}",
            f"  threads_per_core_limit: {self.threads_per_sm}", f"  core_count: {self.sm_count}",
            "  fpus_per_core: 128",
            "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535", "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {int(self.bandwidth_bytes_per_s)}", f"  l2_cache_size: {self.l2_cache_bytes}",
            f"  clock_rate_ghz: {self.clock_ghz}", f"  device_memory_size: {self.memory_bytes}",
            f"  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            f"  registers_per_core_limit: {self.registers_per_sm}",
            f"  registers_per_block_limit: {self.registers_per_sm}",
            "}",
            'platform_name: "CUDA"',
            "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*cudnn_version),
            f'device_description_str: "{self.description}"',
        ]) + "\n"


# Published specifications (NVIDIA data sheets and the CUDA programming guide's per-capability
# tables); memory sizes are what the CUDA runtime reports for the 80/141/180 GB parts.
GPU_CHIPS = {
    "h100": GpuChip("NVIDIA H100 80GB HBM3", 132, 84_942_979_072, 3.35e12, 50 * 2**20, 1.98, (9, 0),
                    233_472, 232_448),
    "h200": GpuChip("NVIDIA H200", 132, 150_754_820_096, 4.8e12, 50 * 2**20, 1.98, (9, 0), 233_472, 232_448),
    "b200": GpuChip("NVIDIA B200", 148, 191_514_247_168, 8.0e12, 126 * 2**20, 1.965, (10, 0), 233_472, 232_448),
    "a100": GpuChip("NVIDIA A100-SXM4-80GB", 108, 85_089_976_320, 2.039e12, 40 * 2**20, 1.41, (8, 0),
                    167_936, 166_912),
}
# The cuDNN the compiled program is built for: the release jax-cuda12-plugin 0.10 is tested with.
CUDNN_VERSION = (9, 8, 0)

# Per JAX device: TPU v4 and v5p chips are megacore (two TensorCores, one device); HBM per chip.
TPU_HBM_BYTES = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu" or "gpu"
    chip: str  # a key of TPU_HBM_BYTES or GPU_CHIPS
    layout: str  # the topology name (TPU) or "HOSTSxGPUS" (GPU)

    @property
    def hbm_bytes(self) -> int:
        return TPU_HBM_BYTES[self.chip] if self.platform == "tpu" else GPU_CHIPS[self.chip].memory_bytes

    @property
    def usable_bytes(self) -> int:
        return int(USABLE_FRACTION * self.hbm_bytes)

    @property
    def num_devices(self) -> int:
        """JAX devices: GPUs, or TPU chips (the topology's product)."""
        return math.prod(int(x) for x in self.layout.split(":")[-1].split("x"))

    def describe(self) -> str:
        if self.platform == "gpu":
            hosts, gpus = self.layout.split("x")
            return f"{hosts} host(s) x {gpus} {GPU_CHIPS[self.chip].description}"
        return f"TPU {self.chip} slice {self.layout.split(':')[1]}"


def parse(name: str) -> Target:
    """`v5p:4x4x4`, `v5e:2x2`, `v6e:2x4`, `v4:2x2x2` (TPU) or `h100:1x8`, `h200:4x8`, `b200:1x8`,
    `a100:2x8` (NVIDIA hosts x GPUs per host)."""
    chip, _, layout = name.strip().lower().partition(":")
    if chip in TPU_HBM_BYTES and re.fullmatch(r"\d+(x\d+){1,2}", layout):
        return Target(name, "tpu", chip, f"{chip}:{layout}")
    if chip in GPU_CHIPS and re.fullmatch(r"\d+x\d+", layout):
        return Target(name, "gpu", chip, layout)
    raise TargetError(f"unknown target {name!r}; name a TPU slice as CHIP:TOPOLOGY with CHIP one of "
                      f"{', '.join(TPU_HBM_BYTES)} (e.g. v5p:4x4x4) or NVIDIA hosts as CHIP:HOSTSxGPUS with CHIP "
                      f"one of {', '.join(GPU_CHIPS)} (e.g. h100:4x8).")


def devices(target: Target) -> list:
    """The target's devices, from its topology: compile-only, usable as a Mesh's devices."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        topology = topologies.get_topology_desc(topology_name=target.layout, platform="tpu")
    else:
        hosts, gpus = target.layout.split("x")
        topology = topologies.get_topology_desc(
            topology_name="", platform="cuda", topology=f"1x{hosts}x{gpus}",
            target_config=GPU_CHIPS[target.chip].target_config(CUDNN_VERSION))
    return list(topology.devices)
