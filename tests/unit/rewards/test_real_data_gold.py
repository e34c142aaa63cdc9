"""Acceptance on the real data: gold CoTs score 1 against their own answers.

* GSM8K train+test and ReFT SVAMP N-CoT: the built target (CoT + canonical answer line)
  scores 1 for every row; the raw annotated text (GSM8K "#### 72", ReFT "<203>") also
  does, except a pinned list of rows whose CoT states a different number than the row's
  ``answer_value`` (annotation errors in the source data).
* ReFT SVAMP P-CoT: every program run in the sandbox returns its gold answer, except the
  pinned list. The full 3,043-program run is ``slow``; every 10th program runs by default.
"""

import json

import pytest

from carft_nemo.data.datasets import DatasetConfig, load_examples
from carft_nemo.data.prompts import build_target
from carft_nemo.rewards.correctness import ncot_reward, score_batch
from carft_nemo.rewards.sandbox import SandboxConfig

# ReFT svamp_nl rows whose CoT's own final number disagrees with answer_value.
RAW_NCOT_MISMATCHES = {"svamp_929", "svamp_2000"}
# ReFT svamp_python_sdp programs that do not return their gold answer: none (measured on
# the full set; see benchmarks/results/sandbox.json).
PCOT_FAILURES: dict[str, str] = {}


@pytest.mark.parametrize(
    "name,sub,split", [("gsm8k", "gsm8k", "train"), ("gsm8k", "gsm8k", "test"), ("svamp_reft", "reft", "train")]
)
def test_every_ncot_gold_target_scores_one(shared_data, name, sub, split):
    examples = load_examples(DatasetConfig(name=name, path=str(shared_data / sub), split=split, require_cot=True))
    assert len(examples) > 1000
    failing = [e.id for e in examples if ncot_reward(build_target(e), e.answer).reward != 1.0]
    assert failing == []


def test_raw_annotations_score_one_except_pinned(shared_data):
    gsm = [json.loads(line) for line in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()]
    gsm_gold = [float(r["answer"].rsplit("####", 1)[1].replace(",", "")) for r in gsm]
    assert all(ncot_reward(r["answer"], g).reward == 1.0 for r, g in zip(gsm, gsm_gold))
    rows = json.loads((shared_data / "reft" / "svamp_nl.json").read_text())
    failing = {r["item_id"] for r in rows if ncot_reward(r["answer_cot"], float(r["answer_value"])).reward != 1.0}
    assert failing == RAW_NCOT_MISMATCHES


def _pcot_failures(examples):
    results = score_batch([build_target(e) for e in examples], examples, sandbox=SandboxConfig(timeout_s=10.0))
    failed = [e for e, r in zip(examples, results) if r.reward != 1.0]
    # Wall-clock deadlines depend on machine load (2 shared cores); a program is pinned as
    # failing only if it also fails alone with a generous deadline (CPU limit unchanged).
    again = score_batch([build_target(e) for e in failed], failed, sandbox=SandboxConfig(timeout_s=60.0, max_workers=1))
    return {e.id: (r.failure or f"wrong value {r.value}") for e, r in zip(failed, again) if r.reward != 1.0}


def _pcot(shared_data):
    return load_examples(DatasetConfig(name="svamp_reft", path=str(shared_data / "reft"), cot_style="pcot"))


def test_pcot_gold_programs_subset(shared_data):
    examples = _pcot(shared_data)[::10]
    assert len(examples) == 305
    expected = {k: v for k, v in PCOT_FAILURES.items() if k in {e.id for e in examples}}
    assert _pcot_failures(examples) == expected


@pytest.mark.slow
@pytest.mark.full  # ~2.5 min of sandboxed programs; CI checks every 10th program in the default suite
def test_pcot_gold_programs_all(shared_data):
    examples = _pcot(shared_data)
    assert len(examples) == 3043
    assert _pcot_failures(examples) == PCOT_FAILURES
