"""Loaders: GSM8K, SVAMP, ReFT's SVAMP (N-CoT / P-CoT) and synthetic data -> :class:`Example`.

Local files (``.jsonl`` or a ``.json`` list) are parsed here, row by row, so a malformed
row produces a :class:`DataError` naming the file, the 1-based row number and the field
(or is skipped and counted with ``skip_malformed``). Hub names go through Hugging Face
``datasets.load_dataset`` and the same row converters. Nothing here knows where the
project's test copies live: every source is a path or a hub name from the config.

Source formats:

* ``gsm8k`` (openai/grade-school-math): ``question``, ``answer`` = CoT with calculator
  annotations ``<<48/2=24>>`` and a final ``#### 72``. N-CoT only.
* ``svamp`` (arkilpatel/SVAMP): ``ID``, ``Body``, ``Question``, ``Answer``; no CoT
  (``cot`` is empty: evaluation only).
* ``svamp_reft`` (ReFT's files): ``item_id``, ``question``, ``answer_value`` and, for
  training, ``answer_cot`` (N-CoT ending "Therefore, the answer is <203>.", or a P-CoT
  program). The closing answer sentence is removed from N-CoT since
  :func:`~carft_nemo.data.prompts.build_target` appends the canonical one.
* ``synthetic``: :mod:`carft_nemo.data.synthetic`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from carft_nemo.config.base import require
from carft_nemo.data.numbers import parse_number
from carft_nemo.data.records import Example
from carft_nemo.data.synthetic import SyntheticConfig, generate

logger = logging.getLogger(__name__)

DATASET_NAMES = ("gsm8k", "svamp", "svamp_reft", "synthetic")
# File names looked up when ``path`` is a folder, per (name, split, cot_style).
DEFAULT_FILES: dict[tuple[str, str, str], str] = {
    ("gsm8k", "train", "ncot"): "train.jsonl",
    ("gsm8k", "test", "ncot"): "test.jsonl",
    ("svamp", "test", "ncot"): "SVAMP.json",
    ("svamp_reft", "train", "ncot"): "svamp_nl.json",
    ("svamp_reft", "train", "pcot"): "svamp_python_sdp.json",
    ("svamp_reft", "test", "ncot"): "svamp_test_set.json",
    ("svamp_reft", "test", "pcot"): "svamp_test_set.json",
}


class DataError(ValueError):
    """A data row is malformed; the message names the file, row and field."""


@dataclasses.dataclass
class DatasetConfig:
    """Which data to load.

    Attributes:
        name: one of ``DATASET_NAMES``.
        path: a local file, or a folder holding the file named in ``DEFAULT_FILES``.
        hub_name: a Hugging Face hub data set (e.g. ``"openai/gsm8k"``); exclusive with ``path``.
        hub_config: the hub data set's configuration (``"main"`` for openai/gsm8k).
        split: ``"train"`` or ``"test"``.
        cot_style: ``"ncot"`` or ``"pcot"`` (P-CoT: svamp_reft and synthetic only).
        strip_calculator_annotations: drop GSM8K's ``<<48/2=24>>`` from the CoT.
        skip_malformed: skip (and count) malformed rows instead of raising :class:`DataError`.
        require_cot: treat a missing/empty CoT as malformed (training data needs one).
        limit: keep at most this many examples (``None``: all).
        synthetic: generator settings for ``name == "synthetic"``.
    """

    name: str = "synthetic"
    path: str | None = None
    hub_name: str | None = None
    hub_config: str | None = None
    split: str = "train"
    cot_style: str = "ncot"
    strip_calculator_annotations: bool = True
    skip_malformed: bool = False
    require_cot: bool = False
    limit: int | None = None
    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        require(self.name in DATASET_NAMES, "name", f"must be one of {DATASET_NAMES}, got {self.name!r}")
        require(self.split in ("train", "test"), "split", f"must be 'train' or 'test', got {self.split!r}")
        require(self.cot_style in ("ncot", "pcot"), "cot_style", f"must be 'ncot' or 'pcot', got {self.cot_style!r}")
        require(
            self.cot_style == "ncot" or self.name in ("svamp_reft", "synthetic"),
            "cot_style",
            f"{self.name} has no P-CoT annotation",
        )
        if self.name != "synthetic":
            require(
                (self.path is None) != (self.hub_name is None),
                "path",
                "set exactly one of path and hub_name",
            )
        require(self.limit is None or self.limit >= 0, "limit", "must be >= 0")


def held_out_split() -> DatasetConfig:
    """The training recipes' default held-out data: the synthetic task's test split."""
    return DatasetConfig(name="synthetic", split="test")


@dataclasses.dataclass
class LoadReport:
    """What a load kept and skipped (``skipped`` lists ``"file:row: reason"``)."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: list[str] = dataclasses.field(default_factory=list)


def _field(row: dict[str, Any], key: str, where: str, kind: type = str) -> Any:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: field '{key}': missing")
    value = row[key]
    if kind is str and not isinstance(value, str):
        raise DataError(f"{where}: field '{key}': expected text, got {type(value).__name__}")
    return value


def _number(value: Any, key: str, where: str) -> float:
    number = (
        float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else (parse_number(value) if isinstance(value, str) else None)
    )
    if number is None or (isinstance(value, str) and parse_number(value) is None):
        raise DataError(f"{where}: field '{key}': not a number: {str(value)[:40]!r}")
    return number


_CALC = re.compile(r"<<[^>]*>>")
_REFT_TAIL = re.compile(r"\s*(?:Therefore,?\s*)?the answer is\s*:?\s*<[^<>]*>\s*\.?\s*$", re.IGNORECASE)


def _gsm8k(row: dict[str, Any], where: str, idx: int, cfg: DatasetConfig) -> Example:
    question = _field(row, "question", where)
    solution = _field(row, "answer", where)
    if "####" not in solution:
        raise DataError(f"{where}: field 'answer': no '#### <answer>' line")
    cot, _, final = solution.rpartition("####")
    answer = _number(final.strip(), "answer", where)
    if cfg.strip_calculator_annotations:
        cot = _CALC.sub("", cot)
    return Example(f"gsm8k-{cfg.split}-{idx}", question.strip(), cot.strip(), answer, "ncot")


def _svamp(row: dict[str, Any], where: str, idx: int, cfg: DatasetConfig) -> Example:
    body = _field(row, "Body", where).strip()
    question = _field(row, "Question", where).strip()
    answer = _number(_field(row, "Answer", where, object), "Answer", where)
    ident = str(row.get("ID", idx))
    # SVAMP bodies often lack a final period; add one so question and body stay two sentences.
    text = f"{body}{'' if body.endswith(('.', '?', '!')) else '.'} {question}" if body else question
    return Example(f"svamp-{ident}", text, "", answer, "ncot")


def _svamp_reft(row: dict[str, Any], where: str, idx: int, cfg: DatasetConfig) -> Example:
    ident = str(_field(row, "item_id", where, object))
    question = _field(row, "question", where).strip()
    answer = _number(_field(row, "answer_value", where, object), "answer_value", where)
    cot = row.get("answer_cot") or ""
    if not isinstance(cot, str):
        raise DataError(f"{where}: field 'answer_cot': expected text, got {type(cot).__name__}")
    if cfg.cot_style == "ncot":
        cot = _REFT_TAIL.sub("", cot).strip()
    elif cot and "def " not in cot:
        raise DataError(f"{where}: field 'answer_cot': not a P-CoT program (no 'def ')")
    return Example(ident, question, cot, answer, cfg.cot_style)


CONVERTERS: dict[str, Callable[[dict[str, Any], str, int, DatasetConfig], Example]] = {
    "gsm8k": _gsm8k,
    "svamp": _svamp,
    "svamp_reft": _svamp_reft,
}


def _local_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row number, parsed row) for a ``.jsonl`` file or a ``.json`` list."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, DataError(f"{path}:{number}: not valid JSON: {err.msg}")
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    yield from enumerate(rows, start=1)


def _resolve(cfg: DatasetConfig) -> Path:
    path = Path(cfg.path)  # type: ignore[arg-type]
    if path.is_dir():
        name = DEFAULT_FILES.get((cfg.name, cfg.split, cfg.cot_style))
        if name is None:
            raise DataError(f"{path}: no default file for {cfg.name}/{cfg.split}/{cfg.cot_style}; give a file path")
        path = path / name
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def _rows(cfg: DatasetConfig) -> tuple[str, Iterator[tuple[int, Any]]]:
    if cfg.hub_name is not None:
        import datasets  # heavy import, only for hub loads

        data = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.split)
        return cfg.hub_name, enumerate(data, start=1)
    path = _resolve(cfg)
    return str(path), _local_rows(path)


def load_examples_with_report(cfg: DatasetConfig) -> tuple[list[Example], LoadReport]:
    """Load ``cfg`` and say what was skipped (see :func:`load_examples`)."""
    if cfg.name == "synthetic":
        examples = generate(cfg.synthetic, cfg.split, cfg.cot_style)[: cfg.limit]
        return examples, LoadReport("synthetic", len(examples), len(examples))
    source, rows = _rows(cfg)
    report = LoadReport(source)
    convert = CONVERTERS[cfg.name]
    examples: list[Example] = []
    for number, row in rows:
        if cfg.limit is not None and len(examples) >= cfg.limit:
            break
        report.rows += 1
        where = f"{source}:{number}"
        try:
            if isinstance(row, DataError):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected an object, got {type(row).__name__}")
            example = convert(row, where, number - 1, cfg)
            if cfg.require_cot and not example.cot.strip():
                raise DataError(f"{where}: field 'answer_cot': missing or empty CoT")
        except (DataError, ValueError) as err:
            if not cfg.skip_malformed:
                raise DataError(str(err)) from None
            report.skipped.append(str(err))
            continue
        examples.append(example)
    report.kept = len(examples)
    if report.skipped:
        logger.warning("%s: skipped %d malformed rows (first: %s)", source, len(report.skipped), report.skipped[0])
    return examples, report


def load_examples(spec: DatasetConfig) -> list[Example]:
    """The examples described by ``spec``.

    Raises :class:`DataError` (file, row, field) on the first malformed row unless
    ``spec.skip_malformed``, in which case such rows are skipped, counted and logged.
    """
    return load_examples_with_report(spec)[0]
