"""GenerationConfig validation and the Rollout -> padded training tensors view."""

from __future__ import annotations

import pytest
import torch

from carft_nemo.config import ConfigError
from carft_nemo.generation import GenerationConfig, Generator, Rollout


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("temperature", 0.0),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("eos_token_ids", [-2]),
        ("pad_token_id", -1),
        ("micro_batch_size", -1),
        ("cpu_threads", -1),
    ],
)
def test_bad_values_name_the_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"^{field}: "):
        GenerationConfig(**{field: value})


def test_single_eos_id_becomes_a_tuple() -> None:
    assert GenerationConfig(eos_token_ids=7).eos_token_ids == (7,)
    assert GenerationConfig(eos_token_ids=[7, 9]).eos_token_ids == (7, 9)


def test_to_batch_layout() -> None:
    r = Rollout(
        prompts=[[1, 2, 3], [4]],
        responses=[[5, 6], [7, 8, 9, 10]],
        logprobs=[[-0.5, -0.25], [-1.0, -2.0, -3.0, -4.0]],
        finished=[True, False],
    )
    b = r.to_batch(pad_token_id=99)
    assert b.tokens.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 10]]
    assert b.response_mask.tolist() == [[False, False, False, True, True], [False, True, True, True, True]]
    assert b.attention_mask.all()
    assert b.logprobs[0].tolist() == [0, 0, 0, -0.5, -0.25]
    assert b.logprobs[1, 1:].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert b.prompt_lengths.tolist() == [3, 1] and b.response_lengths.tolist() == [2, 4]
    assert b.finished.tolist() == [True, False]
    assert r.num_generated_tokens == 6


def test_to_batch_pads_short_rows() -> None:
    r = Rollout(prompts=[[1], [2, 3, 4]], responses=[[5], [6]], logprobs=[[-1.0], [-2.0]], finished=[False, True])
    b = r.to_batch(pad_token_id=0)
    assert b.tokens.tolist() == [[1, 5, 0, 0], [2, 3, 4, 6]]
    assert b.attention_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert b.response_mask.sum().item() == 2 and b.logprobs.dtype == torch.float32


def test_mismatched_fields_are_rejected() -> None:
    with pytest.raises(ValueError, match="sample 0"):
        Rollout(prompts=[[1]], responses=[[2, 3]], logprobs=[[-1.0]], finished=[False])
    with pytest.raises(ValueError, match="batch size"):
        Rollout(prompts=[[1], [2]], responses=[[2]], logprobs=[[-1.0]], finished=[False])


def test_megatron_generator_satisfies_the_interface() -> None:
    from carft_nemo.generation.megatron import MegatronGenerator

    assert issubclass(MegatronGenerator, Generator)


def test_loads_from_overrides_like_a_recipe_yaml() -> None:
    from carft_nemo.config import load_config

    cfg = load_config(GenerationConfig, None, ["eos_token_ids=[3,4]", "top_k=5", "temperature=0.5"])
    assert cfg.eos_token_ids == (3, 4) and cfg.top_k == 5 and cfg.temperature == 0.5
    with pytest.raises(ConfigError, match="^<defaults>: top_p: "):
        load_config(GenerationConfig, None, ["top_p=2"])
