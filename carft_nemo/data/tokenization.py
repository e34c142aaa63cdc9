"""Tokenizers, SFT / rollout encodings, and the padded batch with named keys.

* :func:`load_tokenizer` opens any Hugging Face tokenizer folder (or hub name) with
  ``AutoTokenizer``; :func:`train_tokenizer` fits a small word-level or BPE tokenizer on
  the data (for tiny from-scratch models) and saves it as a folder that
  ``AutoTokenizer.from_pretrained`` / ``PreTrainedTokenizerFast`` load, with
  bos/eos/pad/unk set.
* :func:`encode_sft` turns :class:`Example` s into ``prompt ids + response ids + eos`` with
  a loss mask on the response only. Truncation follows ReFT's limits (prompt <= 300
  tokens, whole sequence <= 1024, both configurable): an over-long prompt keeps its *last*
  tokens (the ``"Answer reasoning:"`` header must stay next to the response) or is dropped,
  an over-long response is cut at the end (and then has no EOS). Counts of what was cut
  come back in :class:`TruncationStats`.
* :func:`collate` pads to ``[B, S]`` tensors with named keys (see its docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from carft_nemo.config.base import require
from carft_nemo.data.prompts import build_prompt, build_target
from carft_nemo.data.records import Example

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
TOKENIZER_KINDS = ("wordlevel", "bpe")
_SPACE = "\u2581"  # Metaspace marker for a preceding space


@dataclasses.dataclass
class TokenizerConfig:
    """How to get a tokenizer.

    Attributes:
        path: a tokenizer folder or hub name to load; ``None`` means train one.
        kind: trained tokenizer type: ``"wordlevel"`` (whole words, right for synthetic
            data) or ``"bpe"`` (byte-level BPE, any text).
        vocab_size: upper bound on the trained vocabulary.
        min_frequency: a word / merge must occur this often to enter the vocabulary.
        split_digits: pre-tokenize numbers digit by digit (so arithmetic is over digits).
    """

    path: str | None = None
    kind: str = "wordlevel"
    vocab_size: int = 4096
    min_frequency: int = 1
    split_digits: bool = False

    def __post_init__(self) -> None:
        require(self.kind in TOKENIZER_KINDS, "kind", f"must be one of {TOKENIZER_KINDS}")
        require(self.vocab_size >= len(SPECIAL_TOKENS) + 1, "vocab_size", "too small")
        require(self.min_frequency >= 1, "min_frequency", "must be >= 1")


@dataclasses.dataclass
class EncodingConfig:
    """Length limits (ReFT: 300 prompt tokens, 1024 in all).

    Attributes:
        max_prompt_tokens: longest prompt kept.
        max_total_tokens: longest prompt + response (+ eos).
        long_prompts: ``"truncate_left"`` (keep the last tokens) or ``"drop"`` the example.
        add_eos: append EOS to SFT targets.
    """

    max_prompt_tokens: int = 300
    max_total_tokens: int = 1024
    long_prompts: str = "truncate_left"
    add_eos: bool = True

    def __post_init__(self) -> None:
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
        require(self.max_total_tokens > self.max_prompt_tokens, "max_total_tokens", "must exceed max_prompt_tokens")
        require(self.long_prompts in ("truncate_left", "drop"), "long_prompts", "must be 'truncate_left' or 'drop'")


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, config: TokenizerConfig = TokenizerConfig()
) -> PreTrainedTokenizerFast:
    """Fit a tokenizer on ``texts``, save it to ``out_dir`` and return it loaded back.

    Both kinds round-trip in-vocabulary text exactly (P-CoT indentation included):
    word-level via Metaspace + isolated newlines/punctuation, BPE because it is byte-level.
    Word-level maps unseen words to ``<unk>``: use it only for closed-vocabulary data.
    """
    texts = list(texts)
    if config.kind == "wordlevel":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        # Newlines are tokens; a space is folded into the next word as "\u2581" (Metaspace),
        # and runs of spaces (P-CoT indentation) become "\u2581" tokens, so decode is exact.
        pre = [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Punctuation(),
        ]
        if config.split_digits:
            pre.append(pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
        tok.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
        trainer = trainers.WordLevelTrainer(
            vocab_size=config.vocab_size, min_frequency=config.min_frequency, special_tokens=list(SPECIAL_TOKENS)
        )
    else:
        tok = Tokenizer(models.BPE(unk_token=None))
        pre = [pre_tokenizers.ByteLevel(add_prefix_space=False)]
        if config.split_digits:
            pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path_or_name: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained`` with a pad token guaranteed (falls back to EOS)."""
    tok = AutoTokenizer.from_pretrained(str(path_or_name))
    require(tok.eos_token_id is not None, "tokenizer.path", f"{path_or_name} has no eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def get_tokenizer(config: TokenizerConfig, examples: Sequence[Example], out_dir: str | Path) -> PreTrainedTokenizerBase:
    """Load ``config.path`` if set, else train on the prompts + targets of ``examples``."""
    if config.path is not None:
        return load_tokenizer(config.path)
    return train_tokenizer((build_prompt(ex) + build_target(ex) for ex in examples), out_dir, config)


@dataclasses.dataclass
class TruncationStats:
    """What :func:`encode_sft` / :func:`encode_prompts` cut."""

    examples: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    dropped: int = 0
    prompt_tokens_cut: int = 0
    response_tokens_cut: int = 0


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """One SFT sequence: ``tokens[:prompt_length]`` is the prompt; ``loss_mask`` is 1 on
    response tokens (including EOS) and 0 on the prompt."""

    id: str
    tokens: list[int]
    loss_mask: list[int]
    prompt_length: int


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit_prompt(ids: list[int], cfg: EncodingConfig, stats: TruncationStats) -> list[int] | None:
    if len(ids) <= cfg.max_prompt_tokens:
        return ids
    if cfg.long_prompts == "drop":
        stats.dropped += 1
        return None
    stats.prompts_truncated += 1
    stats.prompt_tokens_cut += len(ids) - cfg.max_prompt_tokens
    return ids[-cfg.max_prompt_tokens :]


def encode_sft(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, config: EncodingConfig = EncodingConfig()
) -> tuple[list[EncodedExample], TruncationStats]:
    """Prompt ids + response ids (+ EOS) with a response-only loss mask (see module doc)."""
    stats = TruncationStats()
    out = []
    for ex in examples:
        stats.examples += 1
        prompt = _fit_prompt(_ids(tokenizer, build_prompt(ex)), config, stats)
        if prompt is None:
            continue
        response = _ids(tokenizer, build_target(ex)) + ([tokenizer.eos_token_id] if config.add_eos else [])
        room = config.max_total_tokens - len(prompt)
        if len(response) > room:
            stats.responses_truncated += 1
            stats.response_tokens_cut += len(response) - room
            response = response[:room]
        out.append(EncodedExample(ex.id, prompt + response, [0] * len(prompt) + [1] * len(response), len(prompt)))
    return out, stats


def encode_prompts(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, config: EncodingConfig = EncodingConfig()
) -> tuple[list[list[int]], list[str], TruncationStats]:
    """Prompt-only ids for rollouts: (ids per kept example, their example ids, stats)."""
    stats = TruncationStats()
    ids, kept = [], []
    for ex in examples:
        stats.examples += 1
        prompt = _fit_prompt(_ids(tokenizer, build_prompt(ex)), config, stats)
        if prompt is not None:
            ids.append(prompt)
            kept.append(ex.id)
    return ids, kept, stats


def collate(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    loss_masks: Sequence[Sequence[int]] | None = None,
    prompt_lengths: Sequence[int] | None = None,
    pad_to_multiple_of: int = 1,
) -> dict[str, torch.Tensor]:
    """Right-pad ``sequences`` into one batch.

    Returns:
        ``tokens``: ``[B, S]`` int64, padded with ``pad_id``.
        ``loss_mask``: ``[B, S]`` float32, the given masks (0 on padding); all-zero if none given.
        ``attention_mask``: ``[B, S]`` bool, True on real tokens.
        ``lengths``: ``[B]`` int64, real tokens per row.
        ``prompt_lengths``: ``[B]`` int64 (equals ``lengths`` when not given: prompt-only batches).

    ``S`` is the longest row rounded up to ``pad_to_multiple_of``.
    """
    require(len(sequences) > 0, "collate.sequences", "empty batch")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max())
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), width), dtype=torch.float32)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        if loss_masks is not None:
            require(len(loss_masks[row]) == len(seq), "collate.loss_masks", f"row {row}: length mismatch")
            loss_mask[row, : len(seq)] = torch.tensor(list(loss_masks[row]), dtype=torch.float32)
    attention_mask = torch.arange(width)[None, :] < lengths[:, None]
    plens = lengths.clone() if prompt_lengths is None else torch.tensor(list(prompt_lengths), dtype=torch.long)
    return {
        "tokens": tokens,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "lengths": lengths,
        "prompt_lengths": plens,
    }


def collate_sft(encoded: Sequence[EncodedExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """:func:`collate` for :func:`encode_sft` output."""
    return collate(
        [e.tokens for e in encoded],
        pad_id,
        loss_masks=[e.loss_mask for e in encoded],
        prompt_lengths=[e.prompt_length for e in encoded],
        pad_to_multiple_of=pad_to_multiple_of,
    )
