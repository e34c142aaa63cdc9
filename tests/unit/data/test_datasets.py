"""Loaders on the real files, malformed-row errors / skipping, and the data YAMLs."""

import json
from pathlib import Path

import pytest

from carft_nemo.config.base import ConfigError, load_config
from carft_nemo.data.datasets import DataError, DatasetConfig, load_examples, load_examples_with_report

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "name,sub,split,style,rows",
    [
        ("gsm8k", "gsm8k", "train", "ncot", 7473),
        ("gsm8k", "gsm8k", "test", "ncot", 1319),
        ("svamp", "svamp", "test", "ncot", 1000),
        ("svamp_reft", "reft", "train", "ncot", 3076),
        ("svamp_reft", "reft", "train", "pcot", 3043),
        ("svamp_reft", "reft", "test", "ncot", 1000),
    ],
)
def test_real_files_load_completely(shared_data, name, sub, split, style, rows):
    examples, report = load_examples_with_report(
        DatasetConfig(name=name, path=str(shared_data / sub), split=split, cot_style=style)
    )
    assert len(examples) == rows and report.skipped == []
    assert len({e.id for e in examples}) == rows
    assert all(e.cot_style == style and e.question for e in examples)


def test_gsm8k_fields(shared_data):
    first = load_examples(DatasetConfig(name="gsm8k", path=str(shared_data / "gsm8k"), limit=1))[0]
    assert first.answer == 72.0 and "<<" not in first.cot and "####" not in first.cot
    assert first.cot.startswith("Natalia sold 48/2 = 24 clips")
    raw = load_examples(
        DatasetConfig(
            name="gsm8k", path=str(shared_data / "gsm8k" / "train.jsonl"), strip_calculator_annotations=False, limit=1
        )
    )[0]
    assert "<<48/2=24>>" in raw.cot


def test_reft_ncot_closing_sentence_removed(shared_data):
    first = load_examples(DatasetConfig(name="svamp_reft", path=str(shared_data / "reft"), limit=1))[0]
    assert first.id == "svamp_0" and first.answer == 203.0
    assert "<203>" not in first.cot and first.cot.endswith("bird sanctuary.")


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"question": "q?", "answer": "1 + 1 = 2\n#### 2"}


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"answer": "#### 2"}, "question"),
        ({"question": "q", "answer": "no final line"}, "answer"),
        ({"question": "q", "answer": "x\n#### two"}, "answer"),
        ({"question": 5, "answer": "#### 2"}, "question"),
    ],
)
def test_malformed_row_error_names_file_row_field(tmp_path, bad, field):
    path = _write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_examples(DatasetConfig(name="gsm8k", path=str(path)))
    assert f"{path}:3: field '{field}'" in str(err.value)


def test_skip_malformed_counts_and_keeps_the_rest(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [GOOD, "{not json", {"answer": "#### 1"}, GOOD])
    examples, report = load_examples_with_report(DatasetConfig(name="gsm8k", path=str(path), skip_malformed=True))
    assert len(examples) == 2 and report.rows == 4 and report.kept == 2
    assert len(report.skipped) == 2 and f"{path}:2: not valid JSON" in report.skipped[0]
    with pytest.raises(DataError, match=":2: not valid JSON"):
        load_examples(DatasetConfig(name="gsm8k", path=str(path)))


def test_reft_json_errors(tmp_path):
    path = tmp_path / "svamp_nl.json"
    path.write_text(json.dumps([{"item_id": "a", "question": "q", "answer_cot": "c", "answer_value": "x"}]))
    with pytest.raises(DataError, match=r"svamp_nl.json:1: field 'answer_value': not a number"):
        load_examples(DatasetConfig(name="svamp_reft", path=str(path)))
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_examples(DatasetConfig(name="svamp_reft", path=str(path)))
    path.write_text(json.dumps([{"item_id": "a", "question": "q", "answer_cot": "", "answer_value": "1"}]))
    with pytest.raises(DataError, match="field 'answer_cot'"):
        load_examples(DatasetConfig(name="svamp_reft", path=str(path), require_cot=True))
    with pytest.raises(DataError, match="file not found"):
        load_examples(DatasetConfig(name="svamp_reft", path=str(tmp_path / "missing.json")))


@pytest.mark.parametrize(
    "kwargs,key",
    [
        ({"name": "mawps", "path": "x"}, "^name: "),
        ({"name": "gsm8k"}, "^path: "),
        ({"name": "gsm8k", "path": "x", "hub_name": "y"}, "^path: "),
        ({"name": "gsm8k", "path": "x", "cot_style": "pcot"}, "^cot_style: "),
        ({"split": "dev"}, "^split: "),
    ],
)
def test_config_validation(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DatasetConfig(**kwargs)


def test_every_data_yaml_loads_against_the_schema():
    files = sorted((ROOT / "configs" / "data").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        cfg = load_config(DatasetConfig, path)
        assert cfg.name in ("gsm8k", "svamp_reft", "synthetic")
    pcot = load_config(DatasetConfig, ROOT / "configs" / "data" / "synthetic-pcot.yaml", ["synthetic.n_train=5"])
    assert len(load_examples(pcot)) == 5 and pcot.cot_style == "pcot"
