"""The study's analysis: stability measure, claim verdicts, aggregation from run folders."""

import json
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.pipeline.study import METHODS, StudyConfig, check_claims, collect_results, largest_drop, write_results

ROOT = Path(__file__).resolve().parents[3]


def test_largest_drop_is_measured_from_the_running_best():
    assert largest_drop([(0, 0.30), (10, 0.40), (20, 0.25), (30, 0.38)]) == pytest.approx(0.15)
    assert largest_drop([(0, 0.30), (10, 0.31), (20, 0.35)]) == 0.0
    assert largest_drop([(0, 0.50), (10, 0.20), (20, 0.45), (30, 0.10)]) == pytest.approx(0.40)
    assert largest_drop([]) == 0.0


def test_claim_verdicts_use_the_standard_error_of_the_difference():
    agg = {
        "reft": {"accuracy": {"mean": 0.40, "std": 0.02, "n": 3}},
        "sft": {"accuracy": {"mean": 0.35, "std": 0.02, "n": 3}},
        "carft_both_partial_reward": {
            "accuracy": {"mean": 0.41, "std": 0.05, "n": 3},
            "largest_drop": {"mean": 0.05, "std": 0.01, "n": 3},
        },
        "carft_both": {"accuracy": {"mean": 0.38, "std": 0.01, "n": 3}},
    }
    agg["reft"]["largest_drop"] = {"mean": 0.02, "std": 0.01, "n": 3}
    verdicts = {c["claim"]: c for c in check_claims(agg)}
    # 0.05 > sqrt(0.02^2/3 * 2) = 0.0163
    assert verdicts["RL (ReFT) improves on SFT"]["verdict"] == "holds"
    # 0.01 < sqrt(0.05^2/3 + 0.02^2/3) = 0.031
    assert verdicts["CARFT (both signals + partial reward) beats ReFT"]["verdict"] == "points the same way"
    assert verdicts["CARFT (both signals) beats ReFT"]["verdict"] == "does not hold"
    # a larger drop is worse: 0.05 vs 0.02 -> does not hold
    assert verdicts["CARFT is more stable than ReFT (smaller largest drop)"]["verdict"] == "does not hold"
    assert "CARFT beats Dr.GRPO" not in verdicts  # grpo was not run


def _fake_run(root: Path, seed: int, method: str, accs: list[float], final: float) -> None:
    run = root / f"seed_{seed}" / method
    run.mkdir(parents=True)
    rows = [{"stage": method, "step": 10 * i, "eval_accuracy": a} for i, a in enumerate(accs)]
    rows += [{"stage": method, "step": 1, "reward": 0.5}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "summary.json").write_text(
        json.dumps({"accuracy_after": final, "reward_last_steps": 0.5, "wall_time_s": 60.0, "stopped_early": False})
    )


def test_collect_and_write_results_from_run_folders(tmp_path):
    for seed, sft_acc in ((1, 0.30), (2, 0.34)):
        (tmp_path / f"seed_{seed}" / "sft").mkdir(parents=True)
        (tmp_path / f"seed_{seed}" / "sft" / "summary.json").write_text(json.dumps({"accuracy_after": sft_acc}))
        _fake_run(tmp_path, seed, "reft", [sft_acc, sft_acc + 0.1, sft_acc + 0.02], sft_acc + 0.02)
    results = collect_results(tmp_path, [1, 2], ["reft"])
    assert results["aggregate"]["sft"]["accuracy"]["mean"] == pytest.approx(0.32)
    assert results["aggregate"]["reft"]["largest_drop"]["mean"] == pytest.approx(0.08)
    assert results["aggregate"]["reft"]["accuracy"]["std"] == pytest.approx(0.0282843, rel=1e-5)
    results["wall_time_s_this_invocation"] = 1.0
    md = write_results(tmp_path, results).read_text()
    assert "| reft | 2 | 34.0 ± 2.8 | 32.0 – 36.0 | 8.0 (max 8.0) | 0.500 |" in md
    assert "RL (ReFT) improves on SFT" in md
    assert json.loads((tmp_path / "results.json").read_text())["seeds"] == [1, 2]


def test_study_configs_cover_every_method_with_equal_samples_per_step():
    full = load_config(StudyConfig, ROOT / "configs" / "study-synthetic.yaml")
    assert full.seeds == [1, 2, 3] and set(full.methods) == set(METHODS)
    sizes = {m: METHODS[m](full.rl).rl.rollout_size for m in full.methods}
    assert len(set(sizes.values())) == 1, sizes
    assert METHODS["grpo"](full.rl).method == "grpo"
    assert METHODS["carft_negative"](full.rl).contrastive.mode == "negative"
    assert METHODS["carft_both_partial_reward"](full.rl).contrastive.partial_reward
    with pytest.raises(ConfigError, match="methods"):
        load_config(StudyConfig, ROOT / "configs" / "study-quick.yaml", ["methods=[ppo2]"])
