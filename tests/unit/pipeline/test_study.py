"""The study: its arms, the pick of the start checkpoint, the analysis from run folders, the verdicts."""

import json
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.pipeline.study import ARMS, PAPER_ARMS, StudyConfig, pick_start
from carft_nemo.pipeline.study_results import (
    check_claims,
    collect_results,
    diagnostic_means,
    largest_drop,
    write_results,
)

ROOT = Path(__file__).resolve().parents[3]


def test_a_fall_the_guard_rolled_back_still_counts(tmp_path):
    from carft_nemo.pipeline.study_results import eval_curve, eval_points

    rows = [(5, 0.81), (10, 0.36), (10, 0.66), (10, 0.74), (15, 0.71)]  # rolled back twice at step 10
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "eval_accuracy": {a}}}\n' for s, a in rows))
    assert largest_drop(eval_points(tmp_path)) == pytest.approx(0.45)
    assert largest_drop(eval_curve(tmp_path)) == pytest.approx(0.10)  # the last value per step hides the fall


def test_largest_drop_is_measured_from_the_running_best():
    assert largest_drop([(0, 0.30), (10, 0.40), (20, 0.25), (30, 0.38)]) == pytest.approx(0.15)
    assert largest_drop([(0, 0.30), (10, 0.31), (20, 0.35)]) == 0.0
    assert largest_drop([(0, 0.50), (10, 0.20), (20, 0.45), (30, 0.10)]) == pytest.approx(0.40)
    assert largest_drop([]) == 0.0


def test_the_start_is_the_evaluated_checkpoint_nearest_the_target(tmp_path: Path):
    sft = tmp_path / "sft"
    for step, acc in ((50, 0.60), (100, 0.74), (150, 0.80), (200, 0.91)):
        (sft / "checkpoints" / f"step_{step}").mkdir(parents=True)
        (sft / "eval").mkdir(exist_ok=True)
        (sft / "eval" / f"step_{step}_summary.json").write_text(json.dumps({"accuracy": acc}))
    (sft / "summary.json").write_text(json.dumps({"steps": 200}))
    (sft / "eval" / "step_200_summary.json").unlink()
    (sft / "eval" / "final_summary.json").write_text(json.dumps({"accuracy": 0.91}))
    start = pick_start(sft, 0.77)  # 0.74 and 0.80 are 0.03 away: the earlier wins
    assert (start["step"], start["sft_eval_accuracy"]) == (100, 0.74)
    assert start["checkpoint"].endswith("step_100")
    assert pick_start(sft, 0.95)["step"] == 200  # the final evaluation counts as the last step's
    with pytest.raises(ConfigError, match="no evaluated checkpoint"):
        pick_start(tmp_path / "empty", 0.77)


def _predictions(path: Path, correct: list[bool]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"q{i}", "correct": c}) + "\n" for i, c in enumerate(correct)))


def _fake_run(root: Path, seed: int, arm: str, correct: list[bool], curve: list[float], diag: float = 0.0) -> None:
    run = root / f"seed_{seed}" / arm
    _predictions(run / "eval" / "final_predictions.jsonl", correct)
    rows = [{"stage": arm, "step": 10 * (i + 1), "eval_accuracy": a} for i, a in enumerate(curve)]
    rows += [{"stage": arm, "step": s, "reward": 0.5, "contrastive/grad_ratio": diag * s} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    accuracy = sum(correct) / len(correct)
    (run / "summary.json").write_text(
        json.dumps({"accuracy_after": accuracy, "reward_last_steps": 0.5, "wall_time_s": 60.0, "stopped_early": False})
    )


def _study_tree(tmp_path: Path) -> None:
    start = [True] * 6 + [False] * 4  # 60%
    _predictions(tmp_path / "start" / "start_predictions.jsonl", start)
    (tmp_path / "start" / "start_summary.json").write_text(json.dumps({"accuracy": 0.6, "num_examples": 10}))
    (tmp_path / "start.json").write_text(json.dumps({"step": 100, "sft_eval_accuracy": 0.62, "checkpoint": "ck"}))
    for seed in (1, 2):
        # ReFT fixes q6, q7 and breaks q0 (70%); CARFT fixes q6..q9 and breaks nothing (100%)
        _fake_run(tmp_path, seed, "reft", [False] + [True] * 7 + [False] * 2, [0.65, 0.7])
        _fake_run(tmp_path, seed, "carft_v4", [True] * 10, [0.5, 1.0], diag=0.1)


def test_collect_results_pairs_every_run_with_the_start_and_reft(tmp_path: Path):
    _study_tree(tmp_path)
    results = collect_results(tmp_path, [1, 2], ["reft", "carft_v4"])
    reft, carft = results["aggregate"]["reft"], results["aggregate"]["carft_v4"]
    assert reft["accuracy"]["mean"] == pytest.approx(0.7) and carft["accuracy"]["mean"] == 1.0
    assert (reft["vs_start"]["fixed"], reft["vs_start"]["broken"]) == (4, 2)  # pooled over 2 seeds
    assert (carft["vs_reft"]["fixed"], carft["vs_reft"]["broken"]) == (6, 0)
    assert "vs_reft" not in reft
    run = results["per_run"]["carft_v4"][1]
    assert run["curve"] == [(0, 0.6), (10, 0.5), (20, 1.0)] and run["largest_drop"] == pytest.approx(0.1)
    assert carft["diagnostics"]["contrastive/grad_ratio"] == pytest.approx(0.15)  # mean of 0.1, 0.2
    verdicts = {c["claim"]: c["verdict"] for c in results["claims"]}
    assert verdicts["RL (ReFT) improves on SFT"] == "points the same way"  # 4 / 2: p = 0.69
    assert verdicts["CARFT v4 (c_cl 0.1) beats ReFT"] == "holds"  # 6 / 0: p = 0.031
    assert "CARFT v9 (positive + negative) beats ReFT" not in verdicts  # not run
    results["wall_time_s_this_invocation"] = 1.0
    md = write_results(tmp_path, results).read_text()
    assert "| carft_v4 | 2 | 100.00 ± 0.00 | 100.00 – 100.00 | 8 / 0 (p 0.0078) | 6 / 0 (p 0.031) |" in md
    assert "## What the contrastive term did" in md and (tmp_path / "accuracy_curves.png").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["start"]["questions"] == 10


def _arm(drop_mean: float, drop_std: float, runs: int = 3, collapsed: int = 0) -> dict:
    acc = {"mean": 0.5, "std": 0.0, "n": runs}
    drop = {"mean": drop_mean, "std": drop_std, "n": runs}
    return {"accuracy": acc, "largest_drop": drop, "collapsed_runs": collapsed}


def test_stability_verdict_compares_the_largest_drops_and_counts_collapses():
    claim = "carft_v4 is more stable than ReFT (smaller largest drop)"
    claims = {
        c["claim"]: c
        for c in check_claims({"reft": _arm(0.10, 0.01, collapsed=2), "carft_v4": _arm(0.02, 0.01)}, 0.5, 3)
    }
    assert claims[claim]["verdict"] == "holds"
    assert claims[claim]["collapsed_runs"] == {"carft_v4": 0, "reft": 2}
    claims = {c["claim"]: c for c in check_claims({"reft": _arm(0.02, 0.01), "carft_v4": _arm(0.05, 0.01)}, 0.5, 3)}
    assert claims[claim]["verdict"] == "does not hold"
    claims = {c["claim"]: c for c in check_claims({"reft": _arm(0.2, 0.01), "carft_v11": _arm(0.0, 0.0)}, 0.5, 3)}
    assert claims["carft_v11 is more stable than ReFT (smaller largest drop)"]["verdict"] == "holds"  # every arm


def test_a_claim_gets_no_verdict_before_every_seed_finished():
    partial = {"reft": _arm(0.10, 0.01), "carft_v4": _arm(0.0, 0.0, runs=2)}
    verdicts = {c["claim"]: c["verdict"] for c in check_claims(partial, 0.5, 3)}
    assert verdicts["carft_v4 is more stable than ReFT (smaller largest drop)"] == "incomplete (2 of 3 seeds)"


def test_diagnostic_means_skip_steps_without_the_metric(tmp_path: Path):
    rows = [
        {"step": 1, "contrastive/cos_mean": 0.9},
        {"step": 2, "eval_accuracy": 0.5},
        {"step": 3, "contrastive/cos_mean": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert diagnostic_means(tmp_path) == {"contrastive/cos_mean": pytest.approx(0.8)}


def test_study_configs_cover_every_arm_with_equal_samples_per_step():
    full = load_config(StudyConfig, ROOT / "configs" / "study-synthetic.yaml")
    assert full.seeds == [1, 2, 3] and full.arms == PAPER_ARMS
    sizes = {a: ARMS[a](full.rl).rl.rollout_size for a in full.arms}
    assert len(set(sizes.values())) == 1, sizes
    variants = {
        a: (c.contrastive.variant, c.contrastive.coef, c.contrastive.gather_with_grad)
        for a in full.arms
        if (c := ARMS[a](full.rl)).contrastive.enabled
    }
    assert variants == {
        "carft_v4": ("v4", 0.1, False),
        "carft_v4_c0.01": ("v4", 0.01, False),
        "carft_v4_c0.001": ("v4", 0.001, False),
        "carft_v9": ("v9", 0.1, False),
        "carft_v11": ("v11", 0.1, False),
        "carft_v4_gather_grad": ("v4", 0.1, True),
    }
    assert ARMS["grpo"](full.rl).method == "grpo" and ARMS["reft"](full.rl).method == "reft"
    with pytest.raises(ConfigError, match="arms"):
        load_config(StudyConfig, ROOT / "configs" / "study-quick.yaml", ["arms=[ppo2]"])
    with pytest.raises(ConfigError, match="sft.train.save_every: must equal"):
        load_config(StudyConfig, ROOT / "configs" / "study-quick.yaml", ["sft.train.save_every=10"])


def test_a_follow_up_study_reuses_the_start_and_links_the_runs_it_shares(tmp_path: Path):
    from carft_nemo.pipeline.study import _sft_stage

    source, out = tmp_path / "study", tmp_path / "followup"
    _study_tree(source)
    cfg = load_config(
        StudyConfig,
        ROOT / "configs" / "study-followup.yaml",
        [f"reuse_start_from={source}", f"output_dir={out}", "seeds=[1,2,3]"],
    )
    start = _sft_stage(cfg, out)
    assert start["checkpoint"] == "ck" and json.loads((out / "start.json").read_text())["reused_from"] == str(source)
    assert (out / "start" / "start_predictions.jsonl").read_text() == (
        source / "start" / "start_predictions.jsonl"
    ).read_text()
    assert (out / "seed_1" / "reft").resolve() == (source / "seed_1" / "reft").resolve()  # finished there: linked
    assert not (out / "seed_3" / "reft").exists()  # never ran there: this study runs it
    assert not (out / "seed_1" / "carft_v4_unclamped").exists()
    with pytest.raises(ConfigError, match="reuse_start_from: .* holds no finished study start"):
        _sft_stage(
            load_config(StudyConfig, ROOT / "configs" / "study-followup.yaml", [f"output_dir={out}/x"]), out / "x"
        )
