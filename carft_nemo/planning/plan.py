"""A run's memory plan: every role of an RL or SFT config on its GPUs, and the start-up check.

:func:`plan_rl` / :func:`plan_sft` turn a validated config into one :class:`RoleMemory` a role
(:mod:`carft_nemo.planning.memory` has the terms); :func:`render` prints them as a table in GiB;
:func:`check_fits` refuses a plan whose role cannot fit, with one message naming the role, the
estimate, the limit and what to change. The recipes call :func:`check_fits` before any worker
starts (``recipes/plan.py`` prints the same table without launching anything).
"""

from __future__ import annotations

from dataclasses import dataclass

from carft_nemo import compat
from carft_nemo.config import ConfigError, require
from carft_nemo.distributed import device
from carft_nemo.distributed.layout import ParallelConfig
from carft_nemo.models.config import ModelConfig
from carft_nemo.planning.memory import GIB, Precision, RoleMemory, Workload, training_memory


@dataclass
class ClusterConfig:
    """``cluster``: the machines a run is planned for (:mod:`carft_nemo.planning`).

    Attributes:
        gpu_memory_gb: memory of one GPU in GB (2^30 bytes); 0 = what CUDA reports at start-up
            (no check on a machine without a GPU).
        gpus_per_node: GPUs of one node (host memory per node holds that many ranks' state).
        host_memory_gb: CPU memory of one node for the plan's host part; 0 = unchecked.
    """

    gpu_memory_gb: float = 0.0
    gpus_per_node: int = 8
    host_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        require(self.gpu_memory_gb >= 0, "gpu_memory_gb", f"must be >= 0, got {self.gpu_memory_gb}")
        require(self.gpus_per_node >= 1, "gpus_per_node", f"must be >= 1, got {self.gpus_per_node}")
        require(self.host_memory_gb >= 0, "host_memory_gb", f"must be >= 0, got {self.host_memory_gb}")


def _data_parallel(parallel: ParallelConfig, ranks: int) -> int:
    return max(ranks // parallel.model_parallel_size, 1)


def plan_rl(cfg, model: ModelConfig, precision: Precision) -> list[RoleMemory]:
    """Every GPU role of an :class:`~carft_nemo.rl.config.RLConfig` for ``model`` (its tokenizer's vocab)."""
    longest = min(cfg.longest_sequence, model.max_sequence_length)
    actor = cfg.actor
    dp = _data_parallel(actor.parallel, actor.num_workers)
    replicas = dp * actor.parallel.context_parallel  # generation replicas
    share = -(-cfg.rl.rollout_size // replicas)
    gen_rows = max(cfg.generation.micro_batch_size or share, cfg.eval_generation.micro_batch_size or share)
    micro = max(cfg.rl.mini_batch_size // (dp * actor.micro_batch_size), 1)
    work = Workload(rows=actor.micro_batch_size, sequence=longest, micro_batches=micro, generation_rows=gen_rows,
                    generation_sequence=longest, recompute=actor.parallel.recompute)  # fmt: skip
    projection = cfg.contrastive.projection_dim if cfg.contrastive.enabled else 0
    roles = [training_memory("actor", model, actor.parallel, precision, work, ranks=actor.num_workers,
                             shared_value_head=cfg.critic.layout == "shared", projection_dim=projection,
                             data_parallel=dp)]  # fmt: skip
    if cfg.reference.mode == "swap":  # the SFT weights of every rank, in CPU memory
        roles[0].host_per_rank["reference"] = roles[0].weights
    if cfg.uses_critic_group:
        critic = cfg.critic
        cdp = _data_parallel(critic.parallel, critic.num_workers)
        cwork = Workload(rows=critic.micro_batch_size, sequence=longest, logits=False,
                         micro_batches=max(cfg.rl.mini_batch_size // (cdp * critic.micro_batch_size), 1),
                         recompute=critic.parallel.recompute)  # fmt: skip
        roles.append(training_memory("critic", model, critic.parallel, precision, cwork, ranks=critic.num_workers,
                                     value_head=True, data_parallel=cdp))  # fmt: skip
    if cfg.uses_reference_group:
        ref = cfg.reference
        rwork = Workload(rows=actor.micro_batch_size, sequence=longest, trains=False)
        rdp = _data_parallel(ref.parallel, ref.num_workers)
        roles.append(training_memory("reference", model, ref.parallel, precision, rwork, ranks=ref.num_workers,
                                     data_parallel=rdp))  # fmt: skip
    return _with_host_per_node(roles, cfg.cluster.gpus_per_node)


def plan_sft(cfg, model: ModelConfig, precision: Precision, world_size: int) -> list[RoleMemory]:
    """The one role of an :class:`~carft_nemo.sft.config.SFTConfig` on ``world_size`` ranks."""
    parallel = cfg.parallel
    dp = _data_parallel(parallel, world_size)
    train = cfg.train
    longest = min(cfg.encoding.max_total_tokens, model.max_sequence_length)
    generation = min(cfg.encoding.max_prompt_tokens + cfg.generation.max_new_tokens, model.max_sequence_length)
    work = Workload(rows=train.micro_batch_size, sequence=longest,
                    micro_batches=max(train.global_batch_size // (dp * train.micro_batch_size), 1),
                    generation_rows=cfg.generation.micro_batch_size or train.micro_batch_size,
                    generation_sequence=generation, recompute=parallel.recompute)  # fmt: skip
    roles = [training_memory("sft", model, parallel, precision, work, ranks=world_size, data_parallel=dp)]
    return _with_host_per_node(roles, cfg.cluster.gpus_per_node)


# what a rank may keep in host memory -> (how the plan names it for n ranks, what to change if it does not fit)
HOST_PARTS = {
    "reference": ("the reference weights of {n} ranks (reference.mode: swap)", "reference.mode: group"),
    "offloaded_optimizer": (
        "the offloaded optimizer state of {n} ranks",
        "a smaller {layout}.optimizer_offload_fraction",
    ),
}


def _with_host_per_node(roles: list[RoleMemory], gpus_per_node: int) -> list[RoleMemory]:
    """Each role's host part per node: its per-rank parts times its ranks on one node, with a note a part."""
    for role in roles:
        ranks_on_node = min(role.ranks, gpus_per_node)
        for part, (named, _) in HOST_PARTS.items():
            if part in role.host_per_rank:
                role.host += role.host_per_rank[part] * ranks_on_node
                role.notes.append(f"host: {named.format(n=ranks_on_node)}")
    return roles


def render(roles: list[RoleMemory], limit_gb: float | None) -> str:
    """A table in GiB: one row a role, its components, peak and headroom against ``limit_gb``."""
    head = ["role", "GPUs", "layout", *RoleMemory.COLUMNS, "peak", "headroom", "host/node"]
    rows = []
    for r in roles:
        cells = [r.role, str(r.ranks), r.layout, *(f"{getattr(r, c) / GIB:.2f}" for c in RoleMemory.COLUMNS)]
        headroom = f"{limit_gb - r.peak / GIB:+.2f}" if limit_gb else "-"
        rows.append([*cells, f"{r.peak / GIB:.2f}", headroom, f"{r.host / GIB:.1f}" if r.host else "-"])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    for r in roles:
        lines += [f"  {r.role}: {note}" for note in r.notes]
    return "\n".join(lines)


# role -> (where its layout sits in the config, its micro-batch key)
ROLE_KEYS = {
    "actor": ("actor.parallel", "actor.micro_batch_size"),
    "critic": ("critic.parallel", "critic.micro_batch_size"),
    "reference": ("reference.parallel", "actor.micro_batch_size"),
    "sft": ("parallel", "train.micro_batch_size"),
}


def _advice(role: RoleMemory) -> str:
    """What to change, for the two largest components."""
    layout, micro = ROLE_KEYS.get(role.role, (f"{role.role}.parallel", f"{role.role}.micro_batch_size"))
    more_parallel = f"more tensor or pipeline parallelism ({layout}.tensor_parallel, {layout}.pipeline_parallel)"
    parts = {
        "weights": more_parallel,
        "gradients": more_parallel,
        "optimizer": f"the distributed optimizer ({layout}.use_distributed_optimizer: true), more data "
        f"parallel ranks, or optimizer offload on GPUs with Transformer Engine ({layout}.optimizer_offload_fraction)",
        "activations": f"activation recompute ({layout}.recompute: selective or full), a smaller {micro}, "
        f"or context parallelism ({layout}.context_parallel)",
        "logits": f"a smaller {micro} or more tensor parallelism (the logits are vocab-parallel)",
        "kv_cache": "a smaller generation.micro_batch_size (and eval_generation.micro_batch_size)",
    }
    ranked = sorted(RoleMemory.COLUMNS, key=lambda c: -getattr(role, c))
    return "; ".join(dict.fromkeys(parts[c] for c in ranked[:2]))


def check_fits(roles: list[RoleMemory], limit_gb: float, *, host_limit_gb: float = 0.0) -> None:
    """Refuse a plan with a role over ``limit_gb`` per GPU (or over ``host_limit_gb`` per node)."""
    for r in roles:
        layout = ROLE_KEYS.get(r.role, (f"{r.role}.parallel",))[0]
        if r.peak / GIB > limit_gb:
            parts = ", ".join(f"{c} {getattr(r, c) / GIB:.1f}" for c in RoleMemory.COLUMNS if getattr(r, c))
            raise ConfigError(
                f"{layout}: the {r.role} needs about {r.peak / GIB:.1f} GiB per GPU ({parts}; {r.layout}) "
                f"but a GPU has {limit_gb:.4g} GiB (cluster.gpu_memory_gb, or what the GPU reports). "
                f"Try {_advice(r)}. recipes/plan.py prints the whole plan."
            )
        if host_limit_gb and r.host / GIB > host_limit_gb:
            held = [note.removeprefix("host: ") for note in r.notes if note.startswith("host: ")]
            remedies = [
                remedy.format(layout=layout) for part, (_, remedy) in HOST_PARTS.items() if part in r.host_per_rank
            ]
            raise ConfigError(
                f"cluster.host_memory_gb: the {r.role}'s host part ({'; '.join(held)}) needs about "
                f"{r.host / GIB:.1f} GiB per node but a node has {host_limit_gb:.4g} GiB; use {' or '.join(remedies)}"
            )


def gpu_limit_gb(cluster: ClusterConfig) -> float | None:
    """The GPU memory to plan against: the config's, else what CUDA reports, else ``None`` (no GPU)."""
    if cluster.gpu_memory_gb:
        return cluster.gpu_memory_gb
    total = device.gpu_memory_bytes()
    return None if total is None else total / GIB


def running_precision(model: ModelConfig) -> Precision:
    """The precision this machine runs ``model`` in: bf16 and TE's fused attention on GPUs (when
    installed), fp32 with unfused attention on CPU."""
    if device.has_cuda():
        return Precision.gpu(model, compat.transformer_engine_available())
    return Precision.cpu()


def check_at_start(roles: list[RoleMemory], cluster: ClusterConfig) -> None:
    """The recipes' start-up check: refuse a plan that cannot fit (no limit known: nothing to check)."""
    limit = gpu_limit_gb(cluster)
    if limit is not None:
        check_fits(roles, limit, host_limit_gb=cluster.host_memory_gb)


__all__ = [
    "HOST_PARTS",
    "ROLE_KEYS",
    "ClusterConfig",
    "check_at_start",
    "check_fits",
    "gpu_limit_gb",
    "plan_rl",
    "plan_sft",
    "render",
    "running_precision",
]
