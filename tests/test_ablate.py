"""`rlp-jax ablate` and `rlp-jax eval`: FLOP accounting and tables by hand, a tiny grid end to end,
and a partly finished grid resumed without rerunning finished cells."""

import json
import subprocess
import sys

import numpy as np
import pytest

from rlp_jax import ablate
from rlp_jax.configs.demo import get_config as demo_rlp_config


def test_t_flop_and_compute_matched_ntp_steps_by_hand():
    assert ablate.t_flop(n_rollouts=16, l_seq=4096, batch_size=512, iters=200, t_inp=10) == 16 * 4096 * 512 * 200 + 10
    c = demo_rlp_config()  # G=8, C=10, L=20, K=1, B=32, 300 steps
    l_seq = 10 + 1 + 20 + 1 + 1  # context, <think>, L, the forced </think>, K
    want = 8 * l_seq * 32 * 300 + 32 * (10 + 1) * 300
    assert ablate.rlp_token_budget(c) == want
    assert ablate.ntp_steps_for_budget(want, batch_size=64, tokens_per_document=13) == -(-want // (64 * 13))
    cpt = {cell.name: cell for cell in ablate.grids(c)["cpt"]}["CPT, equal T_flop"]
    assert cpt.overrides["train.steps"] * 64 * 13 >= want > (cpt.overrides["train.steps"] - 1) * 64 * 13


def test_cpt_is_matched_to_what_the_rlp_run_processed(tmp_path):
    """The CPT cell takes its steps from the RLP run's summed per-step `flop_tokens` (the lengths
    actually processed), not from maximum lengths; a run without the counts gives None."""
    cpt = {cell.name: cell for cell in ablate.grids(demo_rlp_config())["cpt"]}["CPT, equal T_flop"]
    assert cpt.matched_to == "RLP"
    rows = [{"step": 1, "flop_tokens": 5000.0}, {"step": 2, "flop_tokens": 4321.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ablate.measured_flop_tokens(tmp_path) == 9321.0
    assert ablate.ntp_steps_for_budget(9321, batch_size=64, tokens_per_document=13) == 12  # 12·832 ≥ 9321 > 11·832
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert ablate.measured_flop_tokens(tmp_path) is None


def test_rollouts_grid_keeps_thoughts_per_step_fixed():
    c = demo_rlp_config()
    for cell in ablate.grids(c)["rollouts"]:
        assert cell.overrides["rlp.num_rollouts"] * cell.overrides["train.batch_size"] == 8 * 32


def test_summary_table_mean_and_spread():
    runs = {"a": [{"gain_start": 1.0, "acc_greedy_think": 0.5, "acc_no_think": 0.1, "nll_no_think": 2.0},
                  {"gain_start": 3.0, "acc_greedy_think": 0.7, "acc_no_think": 0.3, "nll_no_think": 1.0}]}
    table = ablate.summary_table("g", runs)
    assert "| a | 2 | +2.000 [+1.000, +3.000] | +0.600 [+0.500, +0.700] | +0.200 [+0.100, +0.300] | +1.500 [+1.000, +2.000] |" in table


def test_paired_differences_by_seed_with_95_percent_t_intervals_by_hand():
    # differences 1, 2, 3, 6: mean 3, sample sd sqrt(14/3), t(0.975, 3) = 3.182
    mean, low, high = ablate.paired_interval([2.0, 4.0, 6.0, 10.0], [1.0, 2.0, 3.0, 4.0])
    half = 3.182 * np.sqrt(14 / 3) / 2
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-12)
    runs = {ablate.START_ROW: [{"gain_start": 0.0}] * 2, "a": [{"gain_start": 1.0}, {"gain_start": 3.0}],
            "b": [{"gain_start": 0.5}, {"gain_start": 0.5}]}
    # differences 0.5 and 2.5: mean 1.5, sd sqrt(2), t(0.975, 1) = 12.706
    half = 12.706 * np.sqrt(2) / np.sqrt(2)
    assert f"| a − b | 2 | {1.5:+.3f} [{1.5 - half:+.3f}, {1.5 + half:+.3f}] |" in ablate.summary_table("g", runs)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        ablate.paired_interval([1.0], [0.0])


TINY_REWARD_GRID = dict(seeds=(0,), steps=2, warmup_steps=3, eval_positions=32, benchmark_items=0)


@pytest.fixture(scope="module")
def reward_grid(tmp_path_factory):
    """The reward grid run once at its tiniest: (workdir, results, echoed lines)."""
    root = tmp_path_factory.mktemp("ablate")
    lines = []
    return root, ablate.run_grid("reward", root, echo=lines.append, **TINY_REWARD_GRID), lines


def test_tiny_grid_runs_and_resumes_only_unfinished_cells(reward_grid):
    root, results, _ = reward_grid
    assert list(results) == [ablate.START_ROW, "dense (RLP)", "sparse (RPT)"]
    for runs in results.values():
        assert len(runs) == 1 and runs[0]["num_positions"] >= 32 and np.isfinite(runs[0]["gain_start"])
    # The reference row is the warm-up measured against itself.
    start = results[ablate.START_ROW][0]
    assert start["gain_start"] == pytest.approx(start["gain_self"], abs=1e-6)
    assert f"| {ablate.START_ROW} | 1 |" in (root / "reward" / "table.md").read_text()
    assert (root / "reward" / "reward.png").read_bytes()[:4] == b"\x89PNG"
    # Forget one cell's result: a rerun redoes that cell only (and resumes its finished training).
    forgotten = root / "reward" / ablate._slug("sparse (RPT)") / "s0" / "eval.json"
    before = forgotten.read_text()
    forgotten.unlink()
    lines = []
    again = ablate.run_grid("reward", root, echo=lines.append, **TINY_REWARD_GRID)
    started = [line for line in lines if line.startswith("reward / ")]
    assert started == ["reward / sparse (RPT) / seed 0: 2 steps"]
    assert not any(line.startswith("warm-up") for line in lines)
    assert again["dense (RLP)"] == results["dense (RLP)"]
    assert json.loads(forgotten.read_text()) == json.loads(before)


def test_eval_cli_writes_json_and_markdown(reward_grid, tmp_path):
    root, _, _ = reward_grid
    run = root / "reward" / ablate._slug("dense (RLP)") / "s0"
    result = subprocess.run([sys.executable, "-m", "rlp_jax.cli", "eval", "--workdir", str(run),
                             "--start-from", str(root / "warmup-s0"), "--positions", "16",
                             "--out", str(tmp_path / "final")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "final.json").read_text())
    for name in ("gain_self", "gain_start", "nll_think", "nll_no_think", "acc_think", "acc_no_think",
                 "thought_len_mean", "samples"):
        assert name in data
    assert data["num_positions"] >= 16
    assert "exact match, greedy thought" in (tmp_path / "final.md").read_text()


def test_unknown_grid_is_one_sentence():
    result = subprocess.run([sys.executable, "-m", "rlp_jax.cli", "ablate", "--grid", "nope", "--workdir", "/tmp/x"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "invalid choice: 'nope'" \
        in result.stderr


def test_cups_task_grid_lives_under_its_own_root_and_cpt_reuses_the_dense_run(tmp_path):
    """`--task cups` runs under WORKDIR/cups with the cups corpus and 12-token thoughts; the cpt
    grid's RLP cell is the reward grid's dense run (same settings), read, not rerun; the CPT cell
    trains on 14-token plain documents for the dense run's processed tokens."""
    kwargs = dict(task="cups", seeds=(0,), steps=1, warmup_steps=2, eval_positions=8, benchmark_items=4)
    ablate.run_grid("reward", tmp_path, echo=lambda *_: None, **kwargs)
    root = tmp_path / "cups"
    dense = root / "reward" / ablate._slug("dense (RLP)") / "s0"
    config = json.loads((dense / "config.json").read_text())
    assert config["data"]["demo_variant"] == "cups_plain" and config["rlp"]["max_thought_len"] == 12
    assert json.loads((root / "warmup-s0" / "config.json").read_text())["data"]["demo_variant"] == "cups_worked"
    lines = []
    results = ablate.run_grid("cpt", tmp_path, echo=lines.append, **kwargs)
    assert "cpt / RLP / seed 0: the same run as reward/dense_RLP/s0" in lines
    assert not (root / "cpt" / "RLP").exists()
    assert results["RLP"][0] == json.loads((dense / "eval.json").read_text()) | json.loads(
        (dense / "bench.json").read_text())
    processed = ablate.measured_flop_tokens(dense)
    cpt = json.loads((root / "cpt" / ablate._slug("CPT, equal T_flop") / "s0" / "config.json").read_text())
    assert cpt["data"]["seq_len"] == 16 and cpt["train"]["steps"] == -(-int(processed) // (64 * 14))
    assert ablate.plain_document_tokens(ablate.demo_configs.stages("carry")[1]) == 22
    assert ablate.plain_document_tokens(ablate.demo_configs.stages("cups")[1]) == 14
    # The benchmark columns: the cell's bench.json is what rlp-jax evaluate's runner gives for it.
    assert json.loads((dense / "bench.json").read_text()) == ablate.benchmark_numbers(dense, "cups", 4)
    assert results["RLP"][0]["bench_items"] == 4 and 0 <= results["RLP"][0]["bench_pass@1"] <= 1
    assert "answer pass@1 (4 samples, T=1)" in (root / "cpt" / "table.md").read_text()
