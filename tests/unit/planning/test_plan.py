"""Plans of whole configs: recipes/plan.py on every config, the start-up refusal naming the role."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from carft_nemo.config import ConfigError, load_config
from carft_nemo.distributed import device
from carft_nemo.models.config import ModelConfig
from carft_nemo.planning.memory import Precision
from carft_nemo.planning.plan import ClusterConfig, check_at_start, plan_rl
from carft_nemo.rl.config import RLConfig
from carft_nemo.rl.controller import check_layouts

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"base", "data"} & set(p.parts))


def test_plan_prints_a_table_for_every_config_and_says_which_fit_80_gb():
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "plan.py"), *map(str, CONFIGS), "--model-preset", "tiny"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    headers = re.findall(r"^== (\S+) \(80 GiB a GPU\)$", done.stdout, re.M)
    assert sorted(headers) == sorted(str(p) for p in CONFIGS)
    verdicts = re.findall(r"^(\w+): peak ([\d.]+) GiB a GPU: (fits|DOES NOT FIT) in 80 GiB$", done.stdout, re.M)
    assert len(verdicts) >= len(CONFIGS) and {v[2] for v in verdicts} == {"fits"}
    assert "skipped" not in done.stdout
    # the paper-scale 7B actor: 3.8B parameters a rank (TP 2) in bf16, fp32 gradients, Adam sharded over 4
    qwen = done.stdout.split("carft-qwen2.5-7b-instruct-gsm8k-ncot-1n8g-tp2.yaml")[1]
    assert re.search(r"^actor\s+8\s+TP2 PP1 CP1 DP4\s+7\.09\s+14\.19\s+10\.64\s", qwen, re.M), qwen[:600]


def test_a_layout_that_cannot_fit_is_refused_naming_the_role_and_what_to_change():
    cfg = load_config(RLConfig, ROOT / "configs" / "carft-qwen2.5-7b-instruct-gsm8k-ncot-1n8g-tp2.yaml")
    model = cfg.model.with_vocab(151665)
    roles = plan_rl(cfg, model, Precision.gpu(model))
    refused = r"^actor\.parallel: the actor needs about 4\d\.\d GiB per GPU .* but a GPU has 40 GiB "
    with pytest.raises(ConfigError, match=refused + r".*Try .*actor\.parallel\.(tensor_parallel|recompute)"):
        check_at_start(roles, ClusterConfig(gpu_memory_gb=40))
    check_at_start(roles, ClusterConfig(gpu_memory_gb=80))  # fits
    host = r"^cluster\.host_memory_gb: the actor's host part \(the reference weights of 8 ranks .*\) needs about 56\.\d"
    with pytest.raises(ConfigError, match=host + r" GiB per node but a node has 32 GiB; use reference\.mode: group"):
        check_at_start(roles, ClusterConfig(gpu_memory_gb=80, host_memory_gb=32))
    separate = load_config(RLConfig, ROOT / "configs" / "reft-tiny-synthetic.yaml", ["cluster.gpu_memory_gb=0.05"])
    tiny = ModelConfig(preset="tiny").with_vocab(512)
    with pytest.raises(ConfigError, match=r"^(actor|critic)\.parallel: the (actor|critic) needs"):
        check_at_start(plan_rl(separate, tiny, Precision.cpu()), separate.cluster)


def test_optimizer_offload_is_planned_validated_and_refused_without_transformer_engine():
    path = ROOT / "configs" / "carft-qwen2.5-7b-instruct-gsm8k-ncot-1n8g-tp2.yaml"
    half = load_config(RLConfig, path, ["actor.parallel.optimizer_offload_fraction=0.5"])
    model = half.model.with_vocab(151665)
    (base,) = plan_rl(load_config(RLConfig, path), model, Precision.gpu(model))
    (offloaded,) = plan_rl(half, model, Precision.gpu(model))
    assert offloaded.optimizer == pytest.approx(base.optimizer / 2)
    # 8 ranks a node, each half its shard's 12 bytes and an fp32 gradient copy (16 bytes) a parameter
    assert offloaded.host - base.host == pytest.approx(8 * base.optimizer / 2 * 16 / 12)
    assert any("offloaded optimizer state of 8 ranks" in note for note in offloaded.notes)
    with pytest.raises(ConfigError, match=r"actor\.parallel\.optimizer_offload_fraction: offloads the distributed"):
        load_config(RLConfig, path, ["actor.parallel.optimizer_offload_fraction=0.5",
                                     "actor.parallel.use_distributed_optimizer=false"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer_offload_fraction: must be in \[0, 1\], got 1\.5"):
        load_config(RLConfig, path, ["actor.parallel.optimizer_offload_fraction=1.5"])
    offload_only = load_config(
        RLConfig, path, ["actor.parallel.optimizer_offload_fraction=0.5", "reference.mode=group"]
    )
    roles = plan_rl(offload_only, model, Precision.gpu(model))
    advice = r"offloaded optimizer state of 8 ranks\) needs about 56\.\d GiB .*; use a smaller actor\.parallel\.optim"
    with pytest.raises(ConfigError, match=advice):
        check_at_start(roles, ClusterConfig(gpu_memory_gb=80, host_memory_gb=32))
    if not device.has_cuda():  # megatron-core offloads through TE's precision-aware Adam only
        with pytest.raises(ConfigError, match=r"^actor\.parallel\.optimizer_offload_fraction: megatron-core"):
            check_layouts(half, model)


def test_the_sft_recipe_refuses_at_start_up_before_any_process_starts(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "sft.py"), "--config", "configs/sft-tiny-synthetic.yaml",
         f"output_dir={tmp_path}", "cluster.gpu_memory_gb=0.05"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert re.search(r"error: parallel: the sft needs about [\d.]+ GiB per GPU .*has 0\.05 GiB", done.stderr), (
        done.stderr
    )
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
