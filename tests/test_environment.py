import jax


def test_eight_simulated_devices():
    assert jax.device_count() == 8
    assert jax.default_backend() == "cpu"


def test_losses_import_pulls_no_flax():
    import subprocess
    import sys

    code = ("import sys, rlp_jax.losses; "
            "bad = [m for m in ('flax', 'optax', 'orbax', 'tensorflow', 'ml_collections') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
