"""Synthetic arithmetic word problems sized for a tiny model trained from scratch on CPU.

Every problem follows one regular template so a 2-4 layer transformer can learn the
*format* quickly and spend its capacity on the arithmetic, which it gets partly right:
that middling accuracy is what RL then improves. Example (2 steps, one distractor)::

    Question: Tom has 7 apples. Mia has 4 pens. Tom buys 5 more apples. Tom gives 3 apples
              away. How many apples does Tom have now?
    N-CoT:    Tom starts with 7 apples. 7 + 5 = 12. 12 - 3 = 9.
              Therefore, the answer is: 9
    P-CoT:    def solution():
                  apples = 7
                  apples = apples + 5
                  apples = apples - 3
                  result = apples
                  return result

Operations: ``add`` (buys more), ``sub`` (gives away; never below zero), ``mul`` (the
count becomes k times as many, k from ``multiplier_range``), ``div`` (shares equally among
k and keeps one share; only exact divisions). Intermediate values stay within
``max_value``. Determinism: one ``random.Random`` seeded from the string
``"{seed}/{split}"`` (string seeds are hashed with SHA-512, not ``hash()``), and only
ordered sequences are sampled from, so data are identical across runs and processes.
"""

from __future__ import annotations

import dataclasses
import random

from carft_nemo.config.base import require
from carft_nemo.data.records import Example

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe")
ITEMS = ("apples", "pens", "books", "cards", "balls", "cookies", "stickers", "toys")
OPERATIONS = ("add", "sub", "mul", "div")
SPLITS = ("train", "test")


@dataclasses.dataclass
class SyntheticConfig:
    """Knobs of the generator.

    Attributes:
        seed: data seed; same seed -> same data on any machine / process.
        n_train, n_test: problems per split.
        min_steps, max_steps: operations per problem (inclusive).
        min_number, max_number: range of the start value and add/sub operands.
        multiplier_range: (lo, hi) factor for mul/div steps.
        max_value: no intermediate value may exceed this (keeps numbers few-token).
        operations: subset of ``("add", "sub", "mul", "div")``.
        distractor_prob: chance of one irrelevant sentence about another person.
    """

    seed: int = 0
    n_train: int = 4000
    n_test: int = 500
    min_steps: int = 1
    max_steps: int = 3
    min_number: int = 1
    max_number: int = 12
    multiplier_range: tuple[int, int] = (2, 3)
    max_value: int = 60
    operations: tuple[str, ...] = ("add", "sub", "mul")
    distractor_prob: float = 0.3

    def __post_init__(self) -> None:
        # YAML / OmegaConf hand sequences over as lists; keep them immutable and comparable.
        self.multiplier_range = tuple(self.multiplier_range)
        self.operations = tuple(self.operations)
        require(len(self.multiplier_range) == 2, "multiplier_range", "must be (lo, hi)")
        require(self.n_train >= 0 and self.n_test >= 0, "n_train", "split sizes must be >= 0")
        require(1 <= self.min_steps <= self.max_steps, "min_steps", "need 1 <= min_steps <= max_steps")
        require(0 <= self.min_number <= self.max_number, "min_number", "need 0 <= min_number <= max_number")
        lo, hi = self.multiplier_range
        require(2 <= lo <= hi, "multiplier_range", "need 2 <= lo <= hi")
        require(self.max_value >= self.max_number, "max_value", "must be >= max_number")
        require(
            len(self.operations) > 0 and all(op in OPERATIONS for op in self.operations),
            "operations",
            f"non-empty subset of {OPERATIONS}",
        )
        require(0.0 <= self.distractor_prob <= 1.0, "distractor_prob", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class _Step:
    op: str
    operand: int
    before: int
    after: int


def _candidate_steps(cfg: SyntheticConfig, rng: random.Random, value: int) -> list[_Step]:
    lo, hi = cfg.multiplier_range
    steps = []
    for op in cfg.operations:
        if op == "add":
            b = rng.randint(cfg.min_number, cfg.max_number)
            after = value + b
        elif op == "sub":
            # Keep at least one item: "0" answers would otherwise dominate the answer set.
            if value - 1 < max(cfg.min_number, 1):
                continue
            b = rng.randint(max(cfg.min_number, 1), min(cfg.max_number, value - 1))
            after = value - b
        elif op == "mul":
            b = rng.randint(lo, hi)
            after = value * b
        else:
            divisors = [k for k in range(lo, hi + 1) if value % k == 0]
            if not divisors:
                continue
            b = rng.choice(divisors)
            after = value // b
        if 0 <= after <= cfg.max_value and b >= 0:
            steps.append(_Step(op, b, value, after))
    return steps


_SENTENCE = {
    "add": "{name} buys {b} more {item}.",
    "sub": "{name} gives {b} {item} away.",
    "mul": "Then {name} has {b} times as many {item}.",
    "div": "{name} shares the {item} equally among {b} friends and keeps one share.",
}
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
_PY_OP = {"add": "+", "sub": "-", "mul": "*", "div": "//"}


def _one(cfg: SyntheticConfig, rng: random.Random, idx: int, split: str, style: str) -> Example:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    start = rng.randint(max(cfg.min_number, 1), cfg.max_number)
    n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
    steps: list[_Step] = []
    value = start
    for _ in range(n_steps):
        options = _candidate_steps(cfg, rng, value)
        if not options:
            break
        step = rng.choice(options)
        steps.append(step)
        value = step.after
    if not steps:  # cannot happen with add/sub unless the ranges are degenerate
        steps.append(_Step("add", 0, start, start))
    sentences = [f"{name} has {start} {item}."]
    if rng.random() < cfg.distractor_prob:
        other = rng.choice([n for n in NAMES if n != name])
        sentences.append(
            f"{other} has {rng.randint(cfg.min_number, cfg.max_number)} {rng.choice([i for i in ITEMS if i != item])}."
        )
    sentences += [_SENTENCE[s.op].format(name=name, b=s.operand, item=item) for s in steps]
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    if style == "ncot":
        cot = f"{name} starts with {start} {item}. " + " ".join(
            f"{s.before} {_SYMBOL[s.op]} {s.operand} = {s.after}." for s in steps
        )
    else:
        body = [f"    {item} = {start}"] + [f"    {item} = {item} {_PY_OP[s.op]} {s.operand}" for s in steps]
        cot = "def solution():\n" + "\n".join(body) + f"\n    result = {item}\n    return result"
    return Example(f"synthetic-{split}-{idx}", question, cot, float(value), style)


def generate(cfg: SyntheticConfig, split: str, cot_style: str = "ncot") -> list[Example]:
    """The ``split`` ("train" or "test") problems of ``cfg`` in ``cot_style``.

    The same problems (same questions and answers) come out for both CoT styles; train
    and test come from differently seeded streams.
    """
    require(split in SPLITS, "synthetic.split", f"must be one of {SPLITS}, got {split!r}")
    require(cot_style in ("ncot", "pcot"), "synthetic.cot_style", f"must be ncot or pcot, got {cot_style!r}")
    rng = random.Random(f"{cfg.seed}/{split}")
    n = cfg.n_train if split == "train" else cfg.n_test
    if split == "train":
        return [_one(cfg, rng, i, split, cot_style) for i in range(n)]
    # Test problems never repeat a train question (a held-out split must be held out).
    seen = {ex.question for ex in generate(cfg, "train", "ncot")}
    out: list[Example] = []
    for _ in range(100 * max(n, 1)):
        if len(out) == n:
            break
        ex = _one(cfg, rng, len(out), split, cot_style)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
    require(len(out) == n, "synthetic.n_test", f"only {len(out)} distinct test problems exist for this config")
    return out
