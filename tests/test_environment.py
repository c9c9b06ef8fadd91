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


def test_ci_runs_the_readme_test_command_exactly():
    """CI runs what a new user is told to run, in a virtualenv it makes fresh (.ci/run)."""
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_command = next(c for c in commands if "pytest" in c)
    ci = (root / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
    assert "python3 -m venv" in ci and "rm -rf .venv-ci" in ci
