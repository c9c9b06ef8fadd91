"""The suite's XLA:CPU flags (set by conftest.py) for a subprocess with a device count of its own."""

import os


def xla_flags(devices: int) -> str:
    """XLA_FLAGS as the suite sets them, with `devices` simulated CPU devices instead of 8."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])
