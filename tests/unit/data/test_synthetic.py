"""Synthetic generator: determinism across runs and processes, gold CoTs score 1, config checks."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from carft_nemo.config.base import ConfigError
from carft_nemo.data.prompts import build_target
from carft_nemo.data.synthetic import SyntheticConfig, generate
from carft_nemo.rewards.correctness import ncot_reward, score_batch

ROOT = Path(__file__).resolve().parents[3]
ALL_OPS = SyntheticConfig(seed=7, n_train=120, n_test=30, operations=("add", "sub", "mul", "div"))


def _digest(cfg_kwargs: dict) -> str:
    cfg = SyntheticConfig(**cfg_kwargs)
    rows = [
        [e.id, e.question, e.cot, e.answer, e.cot_style]
        for split in ("train", "test")
        for style in ("ncot", "pcot")
        for e in generate(cfg, split, style)
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def test_same_seed_same_data_across_runs_and_processes():
    kwargs = {"seed": 3, "n_train": 300, "n_test": 50}
    here = _digest(kwargs)
    assert here == _digest(kwargs)
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.unit.data.test_synthetic import _digest; "
        f"print(_digest({kwargs!r}))"
    )
    for hash_seed in ("0", "12345"):  # different str hashing / set order in the child
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"},
            cwd=ROOT,
        )
        assert out.stdout.strip() == here
    assert _digest({**kwargs, "seed": 4}) != here


def test_splits_are_disjoint_and_sized():
    cfg = SyntheticConfig(seed=1, n_train=500, n_test=100)
    train, test = generate(cfg, "train"), generate(cfg, "test")
    assert len(train) == 500 and len(test) == 100
    assert not {e.question for e in train} & {e.question for e in test}
    assert [e.question for e in generate(cfg, "train", "pcot")] == [e.question for e in train]


def test_values_stay_small_and_steps_in_range():
    cfg = SyntheticConfig(seed=2, n_train=400, max_value=40, max_number=9, min_steps=2, max_steps=3)
    for ex in generate(cfg, "train"):
        assert 0 <= ex.answer <= 40 and ex.answer == int(ex.answer)
        assert 2 <= ex.cot.count("=") <= 3
        assert all(len(w) <= 2 for w in ex.question.split() if w.isdigit())


def test_ncot_gold_scores_one():
    for split in ("train", "test"):
        for ex in generate(ALL_OPS, split, "ncot"):
            assert ncot_reward(build_target(ex), ex.answer).reward == 1.0, ex


def test_pcot_gold_scores_one_in_sandbox():
    examples = generate(ALL_OPS, "train", "pcot") + generate(ALL_OPS, "test", "pcot")
    results = score_batch([build_target(e) for e in examples], examples)
    assert [e.id for e, r in zip(examples, results) if r.reward != 1.0] == []


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"min_steps": 0}, "min_steps"),
        ({"max_steps": 0}, "min_steps"),
        ({"operations": ("pow",)}, "operations"),
        ({"multiplier_range": (1, 3)}, "multiplier_range"),
        ({"distractor_prob": 1.5}, "distractor_prob"),
        ({"max_value": 2}, "max_value"),
    ],
)
def test_config_validation_names_the_key(bad, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        SyntheticConfig(**bad)
