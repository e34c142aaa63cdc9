"""Bad layouts and model configs fail at configuration time, naming the key, with no process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from carft_nemo.config import ConfigError, load_config
from carft_nemo.distributed.layout import ParallelConfig, ProcessInfo, initialize, validate_layout
from carft_nemo.models.config import ModelConfig


@pytest.fixture(autouse=True)
def _no_process_group():
    assert not dist.is_initialized()
    yield
    assert not dist.is_initialized(), "a failing validation must not leave a process group behind"


def _fails_in_initialize(parallel: ParallelConfig, world: int, model: ModelConfig, match: str) -> None:
    """``initialize`` must reject the layout before it would start a ``world``-process group."""
    process = ProcessInfo(rank=0, world_size=world, local_rank=0, master_addr="127.0.0.1", master_port=29999)
    with pytest.raises(ConfigError, match=match):
        initialize(
            parallel,
            process=process,
            num_layers=model.num_layers,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.num_query_groups,
        )


def test_heads_not_divisible_by_tp() -> None:
    model = ModelConfig(preset="micro", num_attention_heads=4, num_query_groups=4)  # 4 heads
    _fails_in_initialize(
        ParallelConfig(tensor_parallel=8),
        8,
        model,
        r"parallel\.tensor_parallel: 8 does not divide model\.num_attention_heads=4",
    )


def test_query_groups_not_divisible_by_tp() -> None:
    model = ModelConfig(preset="micro")  # 4 heads, 2 key/value groups
    _fails_in_initialize(
        ParallelConfig(tensor_parallel=4),
        4,
        model,
        r"parallel\.tensor_parallel: 4 does not divide model\.num_query_groups=2",
    )


def test_world_not_divisible_by_model_parallel() -> None:
    model = ModelConfig(preset="tiny")
    _fails_in_initialize(
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
        6,
        model,
        r"world size 6 is not divisible by .*= 2\*2\*1 = 4",
    )


def test_more_stages_than_layers() -> None:
    model = ModelConfig(preset="micro")  # 2 layers
    _fails_in_initialize(
        ParallelConfig(pipeline_parallel=4), 4, model, r"parallel\.pipeline_parallel: 4 stages for model\.num_layers=2"
    )


def test_uneven_stages() -> None:
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel: 3 does not divide model\.num_layers=4"):
        validate_layout(ParallelConfig(pipeline_parallel=3), 3, num_layers=4)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="GPU-only options are valid on GPUs")
@pytest.mark.parametrize(
    "field, value, key",
    [("sequence_parallel", True, "parallel.sequence_parallel")],  # context parallelism runs on CPU (our attention)
)
def test_gpu_only_options_rejected_on_cpu(field: str, value, key: str) -> None:
    parallel = ParallelConfig(tensor_parallel=2, **{field: value})
    _fails_in_initialize(
        parallel, 4, ModelConfig(preset="micro"), key.replace(".", r"\.") + ": .*(GPU|Transformer Engine)"
    )


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(tensor_parallel=0), "^tensor_parallel: "),
        (dict(pipeline_parallel=-1), "^pipeline_parallel: "),
        (dict(context_parallel=1.5), "^context_parallel: "),
    ],
)
def test_parallel_sizes_must_be_positive_integers(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ParallelConfig(**kwargs)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"^preset: unknown preset 'llama_9000'.*codellama_7b"):
        ModelConfig(preset="llama_9000")


def test_unknown_family() -> None:
    with pytest.raises(ConfigError, match=r"^family: must be one of \('llama', 'qwen2'\), got 'mistral'"):
        ModelConfig(preset="micro", family="mistral")


def test_heads_must_divide_hidden_and_groups_must_divide_heads() -> None:
    with pytest.raises(ConfigError, match=r"^hidden_size: 64 is not divisible by num_attention_heads=5"):
        ModelConfig(preset="micro", num_attention_heads=5, num_query_groups=5)
    with pytest.raises(ConfigError, match=r"^num_query_groups: 3 must divide"):
        ModelConfig(preset="micro", num_query_groups=3)


def test_bad_process_env_names_variable() -> None:
    with pytest.raises(ConfigError, match=r"RANK: 2 is not in \[0, world size 2\)"):
        ProcessInfo.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match=r"MASTER_PORT: environment variable must be an integer, got 'abc'"):
        ProcessInfo.from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "abc"})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "platform.yaml"
    path.write_text(text)
    return path


def test_yaml_typo_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "tensor_paralel: 2\n")
    with pytest.raises(ConfigError, match=r"platform\.yaml: .*tensor_paralel"):
        load_config(ParallelConfig, path)


def test_yaml_bad_value_reaches_post_init(tmp_path: Path) -> None:
    path = _write(tmp_path, "tensor_parallel: 2\npipeline_parallel: 0\n")
    with pytest.raises(ConfigError, match=r"platform\.yaml: pipeline_parallel: must be an integer >= 1"):
        load_config(ParallelConfig, path)


def test_yaml_unknown_model_preset(tmp_path: Path) -> None:
    path = _write(tmp_path, "preset: gpt5\n")
    with pytest.raises(ConfigError, match=r"platform\.yaml: preset: unknown preset 'gpt5'"):
        load_config(ModelConfig, path)


def test_valid_layout_returns_data_parallel_size() -> None:
    model = ModelConfig(preset="tiny")
    dp = validate_layout(
        ParallelConfig(tensor_parallel=2, pipeline_parallel=2),
        8,
        num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
    )
    assert dp == 2


def test_cp_comm_type_is_one_of_te_s_and_reaches_the_transformer_config():
    from carft_nemo.models.gpt import transformer_config

    with pytest.raises(ConfigError, match=r"cp_comm_type: must be one of .*'p2p'.*got 'ring'"):
        ParallelConfig(context_parallel=2, cp_comm_type="ring")
    model = ModelConfig(preset="micro", vocab_size=64)
    assert transformer_config(model, ParallelConfig(context_parallel=2, cp_comm_type="a2a")).cp_comm_type == "a2a"
    assert transformer_config(model, ParallelConfig(context_parallel=2)).cp_comm_type == "p2p"


def test_a2a_context_parallelism_needs_heads_that_divide_by_cp():
    # micro: 4 heads, 2 key/value groups; TP 1 x CP 4 over all-to-all cannot split 2 groups 4 ways
    dims = {"num_attention_heads": 4, "num_query_groups": 2}
    with pytest.raises(ConfigError, match=r"parallel\.cp_comm_type: a2a .*num_query_groups=2 .*p2p"):
        validate_layout(ParallelConfig(context_parallel=4, cp_comm_type="a2a"), 4, **dims)
    assert validate_layout(ParallelConfig(context_parallel=2, cp_comm_type="a2a"), 4, **dims) == 2
    assert validate_layout(ParallelConfig(context_parallel=4), 4, **dims) == 1  # p2p: any heads
