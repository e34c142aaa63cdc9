"""Trained tokenizers load through transformers; SFT encoding, truncation and batching."""

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from carft_nemo.data.prompts import build_prompt, build_target
from carft_nemo.data.synthetic import SyntheticConfig, generate
from carft_nemo.data.tokenization import (
    EncodingConfig,
    TokenizerConfig,
    collate,
    collate_sft,
    encode_prompts,
    encode_sft,
    get_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

CFG = SyntheticConfig(seed=0, n_train=300, n_test=20)


@pytest.fixture(scope="module")
def examples():
    return generate(CFG, "train", "ncot") + generate(CFG, "train", "pcot")


@pytest.fixture(scope="module", params=["wordlevel", "bpe"])
def tokenizer(request, examples, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    get_tokenizer(TokenizerConfig(kind=request.param, vocab_size=600), examples, out)
    return load_tokenizer(out)


def test_saved_folder_loads_with_auto_and_fast(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    for tok in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
        assert None not in ids and len(ids) == 3
        assert tok.convert_ids_to_tokens(tok.eos_token_id) == "</s>"


def test_round_trip_is_exact_for_ncot_and_pcot(tokenizer, examples):
    for ex in examples[:20] + examples[-20:]:
        text = build_prompt(ex) + build_target(ex)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text


def test_encode_sft_masks_response_and_appends_eos(tokenizer, examples):
    encoded, stats = encode_sft(examples[:5], tokenizer)
    assert stats.examples == 5 and stats.prompts_truncated == stats.responses_truncated == 0
    for enc, ex in zip(encoded, examples[:5]):
        prompt_ids = tokenizer(build_prompt(ex), add_special_tokens=False)["input_ids"]
        assert enc.tokens[: enc.prompt_length] == prompt_ids
        assert enc.tokens[-1] == tokenizer.eos_token_id
        assert enc.loss_mask == [0] * enc.prompt_length + [1] * (len(enc.tokens) - enc.prompt_length)
        assert tokenizer.decode(enc.tokens[enc.prompt_length : -1]) == build_target(ex)


def test_truncation_counts(tokenizer, examples):
    cfg = EncodingConfig(max_prompt_tokens=10, max_total_tokens=25)
    encoded, stats = encode_sft(examples[:8], tokenizer, cfg)
    assert stats.prompts_truncated == 8 and stats.responses_truncated == 8
    assert all(len(e.tokens) == 25 and e.prompt_length == 10 for e in encoded)
    full_prompt = tokenizer(build_prompt(examples[0]), add_special_tokens=False)["input_ids"]
    assert encoded[0].tokens[:10] == full_prompt[-10:]  # left truncation keeps the header
    assert stats.prompt_tokens_cut == sum(
        len(tokenizer(build_prompt(e), add_special_tokens=False)["input_ids"]) - 10 for e in examples[:8]
    )
    dropped, dstats = encode_sft(examples[:8], tokenizer, EncodingConfig(10, 25, long_prompts="drop"))
    assert dropped == [] and dstats.dropped == 8
    prompts, ids, pstats = encode_prompts(examples[:8], tokenizer, cfg)
    assert [len(p) for p in prompts] == [10] * 8 and ids == [e.id for e in examples[:8]]
    assert pstats.prompts_truncated == 8


def test_collate_shapes_and_masks(tokenizer, examples):
    encoded, _ = encode_sft(examples[:4], tokenizer)
    batch = collate_sft(encoded, tokenizer.pad_token_id, pad_to_multiple_of=8)
    b, s = batch["tokens"].shape
    longest = max(len(e.tokens) for e in encoded)
    assert b == 4 and s % 8 == 0 and longest <= s < longest + 8
    assert batch["tokens"].dtype == torch.long and batch["loss_mask"].shape == (b, s)
    assert batch["lengths"].tolist() == [len(e.tokens) for e in encoded]
    assert batch["prompt_lengths"].tolist() == [e.prompt_length for e in encoded]
    assert batch["attention_mask"].sum(1).tolist() == batch["lengths"].tolist()
    assert (batch["tokens"][~batch["attention_mask"]] == tokenizer.pad_token_id).all()
    assert batch["loss_mask"].sum().item() == sum(sum(e.loss_mask) for e in encoded)
    prompt_batch = collate([[5, 6, 7], [8]], pad_id=0)
    assert prompt_batch["tokens"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert prompt_batch["prompt_lengths"].tolist() == [3, 1]


def test_load_tokenizer_adds_pad_when_missing(tmp_path, examples):
    tok = train_tokenizer([build_prompt(e) for e in examples], tmp_path / "t", TokenizerConfig(vocab_size=300))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    again = load_tokenizer(tmp_path / "nopad")
    assert again.pad_token_id == again.eos_token_id


def test_bad_encoding_config():
    from carft_nemo.config.base import ConfigError

    with pytest.raises(ConfigError, match="^max_total_tokens: "):
        EncodingConfig(max_prompt_tokens=300, max_total_tokens=300)
    with pytest.raises(ConfigError, match="^kind: "):
        TokenizerConfig(kind="sentencepiece")
