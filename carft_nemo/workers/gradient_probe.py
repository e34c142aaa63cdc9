"""How hard the contrastive term pulls on the policy, measured against the policy loss.

On one micro-batch (this data-parallel rank's first of the step), one forward pass and two
backward passes give, on the policy's own parameters (the heads excluded: the projection
trains only on the contrastive loss, the value head only on the value loss),

    g_pol = d L_policy / d theta    (L_policy: the clipped surrogate, a token mean)
    g_cl  = d (c_cl * L_contrastive) / d theta

weighted as they are in the training loss, and reports ``contrastive/grad_ratio`` =
``|g_cl| / |g_pol|`` and ``contrastive/grad_cosine`` = ``cos(g_cl, g_pol)`` (left out when
either gradient is 0, e.g. v4 with every correct pair above the clamp). Norms and the dot
product are summed over tensor-parallel shards (replicated parameters counted once); the
two figures are then averaged over data-parallel ranks, each of which measured its own
micro-batch. ``torch.autograd.grad`` leaves the parameters' gradient buffers alone; the
training step that follows zeroes them anyway.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from carft_nemo.distributed.collectives import all_reduce_sum_no_grad, group_size
from carft_nemo.models.forward import capture_final_hidden, causal_inputs, unwrap
from carft_nemo.models.heads import POLICY_HEADS, shared_values
from carft_nemo.workers.actor_loss import ActorTrainSettings, contrastive_term, policy_term


def _gradients(loss: torch.Tensor, params: list[torch.Tensor], *, keep_graph: bool) -> list[torch.Tensor | None]:
    if not loss.requires_grad:  # a constant (no sample qualified): no gradient at all
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=keep_graph, allow_unused=True))


def _sums(g_pol: list, g_cl: list, params: list[torch.Tensor], tp_group) -> torch.Tensor:
    """``[g_pol . g_cl, |g_pol|^2, |g_cl|^2]`` over the whole model (float64)."""
    sums = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    for p, a, b in zip(params, g_pol, g_cl):
        if not param_is_not_tensor_parallel_duplicate(p, tp_group):
            continue
        a = a.double() if a is not None else None
        b = b.double() if b is not None else None
        if a is not None and b is not None:
            sums[0] += (a * b).sum()
        if a is not None:
            sums[1] += (a * a).sum()
        if b is not None:
            sums[2] += (b * b).sum()
    return all_reduce_sum_no_grad(sums, tp_group)


def contrastive_gradient_probe(
    model: torch.nn.Module,
    micro: dict[str, torch.Tensor],
    settings: ActorTrainSettings,
    vocab_size: int,
    dp_group,
    tp_group,
) -> dict[str, float]:
    """``contrastive/grad_ratio`` and ``contrastive/grad_cosine`` of one micro-batch (module docstring).

    Collective over the data- and tensor-parallel groups; pipeline parallelism is not
    supported (the caller skips the probe there).
    """
    gpt = unwrap(model)
    params = [p for name, p in gpt.named_parameters() if p.requires_grad and not name.startswith(POLICY_HEADS)]
    positions, mask = causal_inputs(micro["tokens"])
    with capture_final_hidden(model) as captured:
        logits = model(micro["tokens"], positions, mask)
    hidden = captured["hidden"]
    policy_sum, _ = policy_term(logits, micro, settings, vocab_size)
    policy_mean = policy_sum / micro["action_mask"].sum().clamp(min=1)
    values = shared_values(gpt, hidden) if settings.shared_value else None
    cl_loss, _ = contrastive_term(gpt, micro, hidden, values, settings.contrastive, dp_group)
    g_pol = _gradients(policy_mean, params, keep_graph=True)
    g_cl = _gradients(cl_loss, params, keep_graph=False)
    dot, pol_sq, cl_sq = _sums(g_pol, g_cl, params, tp_group).tolist()
    dp = group_size(dp_group)
    ratio = (cl_sq**0.5 / pol_sq**0.5) if pol_sq > 0 else 0.0
    cosine = dot / (pol_sq * cl_sq) ** 0.5 if pol_sq > 0 and cl_sq > 0 else float("nan")
    # average over data-parallel ranks; a rank with an undefined cosine counts as missing
    figures = torch.tensor([ratio, 0.0 if cosine != cosine else cosine, float(cosine == cosine)], dtype=torch.float64)
    total = all_reduce_sum_no_grad(figures.to(params[0].device), dp_group).tolist()
    out = {"contrastive/grad_ratio": total[0] / dp}
    if total[2] > 0:
        out["contrastive/grad_cosine"] = total[1] / total[2]
    return out


__all__ = ["contrastive_gradient_probe"]
