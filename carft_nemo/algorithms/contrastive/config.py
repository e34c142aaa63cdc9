"""Configuration of CARFT's contrastive signals and embedding-based partial reward."""

from __future__ import annotations

from dataclasses import dataclass

from carft_nemo.config import require

__all__ = ["ContrastiveConfig", "MODES"]

MODES = ("positive", "negative", "both")


@dataclass
class ContrastiveConfig:
    """Switches and coefficients of the CARFT contrastive module (paper ablations).

    Total loss added to PPO: ``coef * (positive_weight * L_pos + negative_weight * L_neg)``,
    with the unused term dropped in ``positive`` / ``negative`` mode.

    Fields:
        enabled: add the contrastive loss at all (False = plain ReFT/PPO).
        mode: ``"positive"`` (correct samples, my_cl_trainer_v4), ``"negative"`` (wrong
            samples, LCS split) or ``"both"`` (my_cl_trainer_v9).
        positive_weight, negative_weight: weights of the two terms; ``None`` means 1.0 for the
            active term in a single mode and 0.5 / 0.5 in ``"both"`` (the paper's values).
        coef: c_cl, multiplier of the contrastive loss in the total loss.
        tau: InfoNCE temperature (paper 0.2).
        projection_dim: size d of the learned CoT-token projection e_t = W h_t (paper 64).
        clamp_positive_similarity: cap on the positive pair's cosine in the numerator
            (paper code 0.9); ``None`` = no cap.
        gather_with_grad: gradients flow through the data-parallel all-gather of the
            on-policy embeddings (True) or the gathered copy is detached as in the paper
            code (False), so the InfoNCE denominators pass no gradient.
        detach_annotated: treat the annotated-CoT embedding as a fixed target (the paper
            computes it under ``no_grad`` at rollout time).
        partial_reward: replace the reward of wrong-but-extractable answers by
            ``partial_reward_scale * cos(z_ann, z_gen) + partial_reward_offset``
            (my_cl_trainer_v11; range [0.1, 0.3] with the defaults).
        partial_reward_scale, partial_reward_offset: the two coefficients above.
    """

    enabled: bool = True
    mode: str = "both"
    positive_weight: float | None = None
    negative_weight: float | None = None
    coef: float = 0.1
    tau: float = 0.2
    projection_dim: int = 64
    clamp_positive_similarity: float | None = 0.9
    gather_with_grad: bool = True
    detach_annotated: bool = True
    partial_reward: bool = False
    partial_reward_scale: float = 0.1
    partial_reward_offset: float = 0.2

    def __post_init__(self) -> None:
        require(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
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
            self.partial_reward_scale >= 0,
            "partial_reward_scale",
            f"must be >= 0, got {self.partial_reward_scale}",
        )

    @property
    def weights(self) -> tuple[float, float]:
        """Effective ``(positive, negative)`` weights for the configured mode."""
        default = 0.5 if self.mode == "both" else 1.0
        pos = default if self.positive_weight is None else self.positive_weight
        neg = default if self.negative_weight is None else self.negative_weight
        return (pos if self.mode != "negative" else 0.0, neg if self.mode != "positive" else 0.0)

    @property
    def uses_positive(self) -> bool:
        return self.mode in ("positive", "both")

    @property
    def uses_negative(self) -> bool:
        return self.mode in ("negative", "both")
