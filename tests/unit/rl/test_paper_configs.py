"""The 18 paper-scale RL recipes (CARFT, ReFT, Dr.GRPO x 2 models x 3 data sets) carry the paper
code's settings and fit one node of 8 GPUs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.models.config import ModelConfig
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import check_layouts

ROOT = Path(__file__).resolve().parents[3]
METHODS = ("carft", "reft", "grpo")
# file-name model -> (preset, tokenizer size: CodeLlama 32,016, Qwen2.5 151,665)
MODELS = {"codellama-7b": ("codellama_7b", 32016), "qwen2.5-7b-instruct": ("qwen2_5_7b", 151665)}
# file-name data set -> (train_data.name, cot_style, training questions, eval_data.name)
DATA = {
    "gsm8k-ncot": ("gsm8k", "ncot", 7473, "gsm8k"),
    "svamp-ncot": ("svamp_reft", "ncot", 3076, "svamp_reft"),
    "svamp-pcot": ("svamp_reft", "pcot", 3043, "svamp_reft"),
}
STEPS = {"gsm8k-ncot": 11677, "svamp-ncot": 4807, "svamp-pcot": 4755}  # ceil(100 epochs x N / 64)
RECIPES = [(m, model, data) for m, model, data in itertools.product(METHODS, MODELS, DATA)]


def _path(method: str, model: str, data: str) -> Path:
    return ROOT / "configs" / f"{method}-{model}-{data}-1n8g-tp2.yaml"


def _load(method: str, model: str, data: str, overrides: tuple[str, ...] = ()) -> RLConfig:
    return load_config(RLConfig, _path(method, model, data), overrides)


def _model(cfg: RLConfig, model: str) -> ModelConfig:
    """The model the run would build: the config's own, else the file name's preset."""
    preset, vocab = MODELS[model]
    resolved = ModelConfig(preset=preset) if cfg.model.is_unset else cfg.model
    return resolved.with_vocab(vocab)


def test_there_are_eighteen_paper_recipes() -> None:
    found = {
        p.name
        for m, model in itertools.product(METHODS, MODELS)
        for p in (ROOT / "configs").glob(f"{m}-{model}-*.yaml")
    }
    assert found == {_path(*r).name for r in RECIPES}


@pytest.mark.parametrize("method,model,data", RECIPES, ids=lambda v: v)
def test_paper_settings(method: str, model: str, data: str) -> None:
    cfg = _load(method, model, data)
    assert cfg.method == method
    assert cfg.actor.optim.lr == pytest.approx(3e-7)
    # ReFT keeps lr 3e-7 constant; the CARFT YAMLs leave HF's default, linear decay to 0, no warm-up
    schedule = "linear" if method == "carft" else "constant"
    assert (cfg.actor.optim.schedule, cfg.actor.optim.warmup_steps, cfg.actor.optim.min_lr) == (schedule, 0, 0.0)
    assert cfg.actor.optim.clip_grad == 1.0
    assert (cfg.rl.gamma, cfg.rl.lam, cfg.rl.clip_ratio) == (1.0, 0.95, 0.2)
    assert (cfg.rl.ppo_epochs, cfg.rl.mini_batch_size, cfg.rl.rollout_size) == (2, 64, 64)
    assert (cfg.encoding.max_prompt_tokens, cfg.encoding.max_total_tokens) == (300, 1024)
    for gen in (cfg.generation, cfg.eval_generation):
        assert cfg.encoding.max_prompt_tokens + gen.max_new_tokens <= 1024
    assert cfg.generation.max_new_tokens == 700 and cfg.generation.temperature == 1.0
    assert cfg.eval_generation.greedy and cfg.rl.eval_examples == 0
    assert cfg.rl.seed == 42 and cfg.reference.mode == "swap"

    if method == "grpo":
        assert (cfg.rl.algorithm, cfg.rl.questions_per_step, cfg.rl.samples_per_question) == ("grpo", 8, 8)
        assert cfg.rl.kl_coef == 0.0
        assert not cfg.uses_critic_group and not cfg.uses_shared_value_head
    else:
        assert (cfg.rl.algorithm, cfg.rl.questions_per_step, cfg.rl.samples_per_question) == ("ppo", 64, 1)
        assert cfg.rl.kl_coef == pytest.approx(0.01 if data.endswith("pcot") else 0.05)
        assert cfg.critic.layout == "shared" and cfg.uses_shared_value_head and not cfg.uses_critic_group
        assert (cfg.critic.value_loss_coef, cfg.critic.value_clip) == (5.0, 0.2)
        assert cfg.rl.whiten_advantages

    contrastive = cfg.contrastive
    assert contrastive.enabled == (method == "carft")
    if method == "carft":
        # my_cl_trainer_v4, as the authors' README says the paper ran: the positive signal only
        assert contrastive.variant == "v4" and not contrastive.partial_reward and not contrastive.uses_negative
        assert (contrastive.tau, contrastive.projection_dim, contrastive.coef) == (0.2, 64, 0.1)
        assert contrastive.clamp_positive_similarity == 0.9 and not contrastive.gather_with_grad
        assert contrastive.detach_annotated and not contrastive.lcs_cot_only
        assert contrastive.weights == (1.0, 0.0)


@pytest.mark.parametrize("method,model,data", RECIPES, ids=lambda v: v)
def test_data_steps_and_paths(method: str, model: str, data: str) -> None:
    cfg = _load(method, model, data)
    name, cot, questions, eval_name = DATA[data]
    assert (cfg.train_data.name, cfg.train_data.cot_style, cfg.train_data.split) == (name, cot, "train")
    assert cfg.train_data.require_cot
    assert (cfg.eval_data.name, cfg.eval_data.cot_style, cfg.eval_data.split) == (eval_name, cot, "test")
    assert cfg.rl.steps == STEPS[data] == math.ceil(100 * questions / 64)
    assert cfg.rl.eval_every == cfg.rl.save_every == math.ceil(questions / 64)
    # Placeholders that name the SFT run they stand for; the output dir is the recipe's own.
    assert cfg.sft_checkpoint == f"/path/to/sft/{model}-{data}"
    assert cfg.tokenizer_path == f"/path/to/sft/{model}-{data}/tokenizer"
    assert cfg.output_dir == f"outputs/{method}-{model}-{data}"


@pytest.mark.parametrize("method,model,data", RECIPES, ids=lambda v: v)
def test_layout_fits_one_node_of_eight_gpus(method: str, model: str, data: str) -> None:
    cfg = _load(method, model, data)
    resolved = _model(cfg, model)
    assert cfg.model.preset == MODELS[model][0] and resolved.bf16
    assert resolved.num_layers == {"codellama-7b": 32, "qwen2.5-7b-instruct": 28}[model]
    assert cfg.actor.num_workers == 8 and cfg.actor.parallel.tensor_parallel == 2
    assert check_layouts(cfg, resolved) == {"actor": 4}  # shared value head, swapped reference: actor only
    # 64 samples = 4 data-parallel replicas x micro-batches of 4, in the rollout and in each mini-batch.
    assert cfg.actor.micro_batch_size == 4


def test_layout_check_rejects_what_does_not_divide() -> None:
    model = _model(_load("carft", "codellama-7b", "gsm8k-ncot"), "codellama-7b")
    with pytest.raises(ConfigError, match="actor.micro_batch_size"):
        check_layouts(_load("carft", "codellama-7b", "gsm8k-ncot", ("actor.micro_batch_size=3",)), model)
    with pytest.raises(ConfigError, match="parallel"):
        check_layouts(
            _load("reft", "codellama-7b", "gsm8k-ncot", ("actor.num_workers=6", "actor.parallel.tensor_parallel=4")),
            model,
        )
    qwen = _model(_load("grpo", "qwen2.5-7b-instruct", "gsm8k-ncot"), "qwen2.5-7b-instruct")
    with pytest.raises(ConfigError, match="tensor_parallel"):  # Qwen2.5-7B has 28 heads, 4 KV heads
        check_layouts(_load("grpo", "qwen2.5-7b-instruct", "gsm8k-ncot", ("actor.parallel.tensor_parallel=8",)), qwen)


def test_kl_of_pcot_is_the_recipes_own() -> None:
    """The P-CoT KL (0.01) lives in the PPO recipes: Dr.GRPO's P-CoT runs keep no KL term."""
    assert _load("reft", "codellama-7b", "svamp-pcot").rl.kl_coef == pytest.approx(0.01)
    assert _load("grpo", "codellama-7b", "svamp-pcot").rl.kl_coef == 0.0
    assert _load("carft", "qwen2.5-7b-instruct", "svamp-ncot").rl.kl_coef == pytest.approx(0.05)
