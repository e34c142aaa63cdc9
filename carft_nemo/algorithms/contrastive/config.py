"""Configuration of CARFT's contrastive signals and embedding-based partial reward.

The authors' code (github WNQzhu/CARFT, ``code/vae/scripts/``) holds one trainer per version;
``variant`` picks which one this run is:

======= ================================================ =========================================
variant what it adds to ReFT's PPO                       the authors' file
======= ================================================ =========================================
``v4``  positive signal only (InfoNCE pulling a correct  ``my_cl_trainer_v4.py``; its README: "use
        sample's CoT toward its annotated CoT's)         cl_trainer_v4 to reproduce the results"
``v8``  negative signal only (LCS split of wrong          ``my_cl_trainer_v8.py`` (``my_cl_trainer.py``
        samples' CoTs)                                   is a copy: the trainer their YAML sweeps run)
``v9``  positive + negative, ``0.5 * (pos + neg)``        ``my_cl_trainer_v9.py``
``v11`` v4 + the embedding-enhanced partial reward        ``my_cl_trainer_v11.py``
        ``0.1 * cos + 0.2`` for wrong-but-extractable
======= ================================================ =========================================

No authors' trainer combines the negative signal with the partial reward. The defaults are
theirs (v4, tau 0.2, positive cosine clamped at 0.9, the annotated embedding without gradient,
the gathered embeddings without gradient, the LCS over the whole prompt + CoT sequences);
our extensions are options named for what they do, off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

from carft_nemo.config import require

__all__ = ["ContrastiveConfig", "VARIANTS"]

# variant -> (positive signal, negative signal, partial reward)
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "v4": (True, False, False),
    "v8": (False, True, False),
    "v9": (True, True, False),
    "v11": (True, False, True),
}


@dataclass
class ContrastiveConfig:
    """Switches and coefficients of the CARFT contrastive module.

    Total loss added to PPO: ``coef * (positive_weight * L_pos + negative_weight * L_neg)``,
    the unused term dropped (module docstring for what each variant uses).

    Fields:
        enabled: add the contrastive loss at all (False = plain ReFT/PPO).
        variant: which of the authors' trainers (``v4``, ``v8``, ``v9``, ``v11``).
        positive_weight, negative_weight: weights of the two terms; ``None`` means 1.0 for a
            variant with one term and 0.5 / 0.5 for v9 (the authors' values).
        coef: c_cl, multiplier of the contrastive loss in the total loss. The authors' config
            class defaults to 0.1 (``my_cl_config.py``), their launcher to 0.001
            (``paas_my_cl2.py``, ``run_cl.py``); which one the paper's tables used is not
            recorded.
        tau: InfoNCE temperature (0.2).
        projection_dim: size d of the learned CoT-token projection e_t = W h_t (64).
        clamp_positive_similarity: cap on the positive pair's cosine (0.9): above it the
            positive term sends no gradient; ``None`` = no cap.
        detach_annotated: the annotated-CoT embedding is a fixed target (the authors compute it
            under ``no_grad`` at rollout time).
        gather_with_grad: ours, off by default. Gradients flow through the data-parallel
            all-gather of the on-policy embeddings, so the InfoNCE denominators push each
            sample's embedding away from the others'. The authors' gather is a plain
            ``all_gather``: their v4 only pulls correct samples toward their annotated CoT.
        lcs_cot_only: ours, off by default. Compute the LCS of annotated and on-policy CoT
            tokens only; the authors' runs over the whole sequences, so the shared prompt lands
            in the "common" part the negative signal pools.
        partial_reward_scale, partial_reward_offset: v11's ``scale * cos + offset``.
        diagnostics_every: every N RL steps, measure the norm of the contrastive loss's gradient
            over the policy loss's on the policy's parameters, and their cosine (one micro-batch,
            one extra forward and two backward passes); 0 = never. Needs pipeline_parallel 1.
    """

    enabled: bool = True
    variant: str = "v4"
    positive_weight: float | None = None
    negative_weight: float | None = None
    coef: float = 0.1
    tau: float = 0.2
    projection_dim: int = 64
    clamp_positive_similarity: float | None = 0.9
    detach_annotated: bool = True
    gather_with_grad: bool = False
    lcs_cot_only: bool = False
    partial_reward_scale: float = 0.1
    partial_reward_offset: float = 0.2
    diagnostics_every: int = 1

    def __post_init__(self) -> None:
        require(self.variant in VARIANTS, "variant", f"must be one of {tuple(VARIANTS)}, got {self.variant!r}")
        for name in ("positive_weight", "negative_weight"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, f"must be >= 0, got {value}")
        require(self.coef >= 0, "coef", f"must be >= 0, got {self.coef}")
        require(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        require(self.projection_dim >= 1, "projection_dim", f"must be >= 1, got {self.projection_dim}")
        clamp = self.clamp_positive_similarity
        require(
            clamp is None or -1.0 < clamp <= 1.0,
            "clamp_positive_similarity",
            f"must be None or in (-1, 1], got {clamp}",
        )
        require(
            self.partial_reward_scale >= 0, "partial_reward_scale", f"must be >= 0, got {self.partial_reward_scale}"
        )
        require(self.diagnostics_every >= 0, "diagnostics_every", f"must be >= 0, got {self.diagnostics_every}")

    @property
    def uses_positive(self) -> bool:
        return VARIANTS[self.variant][0]

    @property
    def uses_negative(self) -> bool:
        return VARIANTS[self.variant][1]

    @property
    def partial_reward(self) -> bool:
        """The embedding-enhanced partial reward replaces ReFT's 0.1 (v11)."""
        return VARIANTS[self.variant][2]

    @property
    def weights(self) -> tuple[float, float]:
        """Effective ``(positive, negative)`` weights of the variant's terms (0 for an unused one)."""
        default = 0.5 if self.uses_positive and self.uses_negative else 1.0
        pos = default if self.positive_weight is None else self.positive_weight
        neg = default if self.negative_weight is None else self.negative_weight
        return (pos if self.uses_positive else 0.0, neg if self.uses_negative else 0.0)
