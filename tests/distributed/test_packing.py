"""Sequence packing: packed forward passes and gradients equal the unpacked ones (CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from carft_nemo.data.packing import PAD_SEGMENT, first_fit_decreasing, pack, plan, row_lengths, unpack
from tests.multiprocess import run_ranks

VOCAB = 64
LENGTHS = [4, 7, 20, 11, 3, 5, 16, 9]  # a wide spread, as rollouts have


def test_first_fit_decreasing_places_every_row_once_within_the_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        lengths = torch.randint(1, 33, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        bins = first_fit_decreasing(lengths, 32)
        assert sorted(r for b in bins for r in b) == list(range(len(lengths)))
        assert all(sum(lengths[r] for r in b) <= 32 for b in bins)
        assert len(bins) <= -(-sum(lengths) * 11 // 9 // 32) + 1 + 1  # FFD <= 11/9 OPT + 1 (OPT >= sum / budget)
    assert first_fit_decreasing([5, 5, 4, 3, 3], 10) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="packing.max_tokens"):
        first_fit_decreasing([11], 10)


def test_pack_and_unpack_round_trip():
    tokens = torch.arange(1, 8 * 20 + 1).view(8, 20)
    lengths = torch.tensor(LENGTHS)
    budget, bins = plan(lengths, 20, multiple=8)
    assert budget == 24
    packed = pack(tokens, lengths, budget, bins)
    assert packed["packed_tokens"].shape[1] == 24
    real = packed["packed_segments"] != PAD_SEGMENT
    assert int(real.sum()) == sum(LENGTHS)
    assert packed["packed_tokens"].shape[0] < len(LENGTHS)  # fewer rows for the model
    back = unpack(packed["packed_tokens"].unsqueeze(-1).float(), packed["unpack_index"]).squeeze(-1)
    keep = torch.arange(20)[None, :] < lengths[:, None]
    assert torch.equal(back[keep], tokens[keep].float()) and torch.equal(back[~keep], torch.zeros(int((~keep).sum())))
    for row, n in enumerate(LENGTHS):  # each row restarts its positions
        where = packed["packed_segments"] == row
        assert packed["packed_positions"][where].tolist() == list(range(n))
    assert pack(tokens, lengths, budget, bins, min_bins=7)["packed_tokens"].shape[0] == 7  # pipeline: fixed shape


def test_row_lengths_from_the_action_mask():
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 2:5] = True  # tokens 3..5 are actions: the row holds 6 tokens
    mask[1, 0:9] = True
    assert row_lengths({"action_mask": mask}).tolist() == [6, 10, 1]
    assert row_lengths({"lengths": torch.tensor([3, 4])}).tolist() == [3, 4]


def _build(pp: int = 1):
    from carft_nemo.distributed.layout import ParallelConfig, initialize
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.heads import attach_policy_heads

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    parallel = ParallelConfig(pipeline_parallel=pp)
    initialize(
        parallel,
        seed=1234,
        num_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_attention_heads,
        num_query_groups=model_cfg.num_query_groups,
    )
    model = build_gpt_model(model_cfg, parallel)
    attach_policy_heads(unwrap(model), shared_value_head=True, contrastive_dim=8)
    return model, parallel


def _scoring(rank: int, world: int, max_tokens: int):
    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.distributed.layout import shutdown
    from carft_nemo.models.forward import unwrap
    from carft_nemo.workers.actor_loss import policy_outputs
    from carft_nemo.workers.model_worker import ModelWorker, on_token_positions

    try:
        model, parallel = _build()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, VOCAB, (len(LENGTHS), 20), generator=g)
        batch = on_token_positions({"tokens": tokens, "lengths": torch.tensor(LENGTHS)})
        fn = policy_outputs(unwrap(model), ("logprobs", "values", "embeddings"), 1.0, VOCAB)
        results = []
        for packing in (PackingConfig(), PackingConfig(enabled=True, max_tokens=max_tokens)):
            worker = ModelWorker()
            worker.model = model
            worker.spec = type("Spec", (), {"parallel": parallel, "packing": packing})()
            out = worker.collect_forward(batch, fn, 4, hidden_to_loss=True)
            results.append({k: v.numpy() for k, v in out.items()})
        return results
    finally:
        shutdown()


@pytest.mark.parametrize("max_tokens", [0, 24, 40])
def test_packed_scoring_equals_unpacked(max_tokens):
    ((plain, packed),) = run_ranks(_scoring, 1, max_tokens)  # outputs are defined up to each row's length
    assert set(plain) == set(packed) == {"logprobs", "values", "embeddings"}
    for row, n in enumerate(LENGTHS):
        for key in plain:
            real = n - 1 if key == "logprobs" else n
            a, b = torch.from_numpy(plain[key][row]), torch.from_numpy(packed[key][row])
            torch.testing.assert_close(b[:real], a[:real], atol=1e-5, rtol=1e-5, msg=f"{key} row {row}")


def _training(rank: int, world: int, pp: int):
    """Loss and gradients of a loss over log-probs, values and a hidden-state pooling, packed and not."""
    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.distributed import axes
    from carft_nemo.distributed.layout import shutdown
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.heads import shared_values
    from carft_nemo.models.logprobs import token_logprobs
    from carft_nemo.training.forward_backward import run_forward_backward

    try:
        model, parallel = _build(pp)
        gpt = unwrap(model)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, VOCAB, (len(LENGTHS), 20), generator=g)
        weights = torch.randn(len(LENGTHS), 19, generator=g)
        lengths = torch.tensor(LENGTHS)
        mask = (torch.arange(19)[None, :] < (lengths - 1)[:, None]).float()
        batch = {"tokens": tokens, "lengths": lengths, "weights": weights * mask}

        def loss_fn(output, micro, hidden):
            logp = token_logprobs(output[:, :-1], micro["tokens"][:, 1:], vocab_size=VOCAB)
            policy = (logp * micro["weights"]).sum()
            values = shared_values(gpt, hidden).t()  # [b, s]
            keep = torch.arange(values.shape[1])[None, :] < micro["lengths"][:, None]
            pooled = (hidden.transpose(0, 1) * keep.unsqueeze(-1)).sum(1)  # per-row sum: a pooling over its tokens
            loss = policy + (values * keep).pow(2).sum() + pooled.pow(2).sum() * 1e-3
            return loss, {"policy": policy.detach()}

        results = []
        for packing in (PackingConfig(), PackingConfig(enabled=True, max_tokens=24)):
            for p in model.parameters():
                p.grad = None
                if hasattr(p, "main_grad"):
                    p.main_grad.zero_()
            model.zero_grad_buffer() if hasattr(model, "zero_grad_buffer") else None
            metrics = run_forward_backward(
                model, batch, loss_fn=loss_fn, normalizer=100.0, micro_batch_size=4, hidden_to_loss=True,
                packing=packing,
            )  # fmt: skip
            grads = {n: getattr(p, "main_grad", None) for n, p in model.named_parameters()}
            grads = {n: g if g is not None else p.grad for (n, g), p in zip(grads.items(), model.parameters())}
            results.append((metrics, {n: g.clone().numpy() for n, g in grads.items() if g is not None}))
        return results, axes.rank("pp")
    finally:
        shutdown()


@pytest.mark.parametrize("pp", [1, 2])
def test_packed_training_equals_unpacked(pp):
    for (plain, packed), _stage in run_ranks(_training, pp, pp):
        (m_plain, g_plain), (m_packed, g_packed) = plain, packed
        assert m_plain.keys() == m_packed.keys()
        for key in m_plain:
            assert m_packed[key] == pytest.approx(m_plain[key], rel=1e-5, abs=1e-5), key
        assert g_plain.keys() == g_packed.keys() and g_plain
        for name in g_plain:
            torch.testing.assert_close(
                torch.from_numpy(g_packed[name]), torch.from_numpy(g_plain[name]), atol=1e-5, rtol=1e-4, msg=name
            )


def test_a_budget_below_the_longest_row_is_refused_at_start_up_by_its_full_key():
    from carft_nemo.config import ConfigError
    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.data.tokenization import EncodingConfig
    from carft_nemo.rl.config import ActorConfig, CriticConfig, RLConfig
    from carft_nemo.sft.config import SFTConfig, SFTLoopConfig

    with pytest.raises(ConfigError, match=r"actor\.packing\.max_tokens: 100 is below the longest row .*256 tokens"):
        RLConfig(actor=ActorConfig(packing=PackingConfig(enabled=True, max_tokens=100)))
    with pytest.raises(ConfigError, match=r"critic\.packing\.max_tokens"):
        RLConfig(critic=CriticConfig(packing=PackingConfig(enabled=True, max_tokens=200)))
    with pytest.raises(ConfigError, match=r"train\.packing\.max_tokens: 64 is below .*256 tokens"):
        SFTConfig(train=SFTLoopConfig(packing=PackingConfig(enabled=True, max_tokens=64)))
    from carft_nemo.distributed.layout import ParallelConfig

    SFTConfig(train=SFTLoopConfig(packing=PackingConfig(enabled=True)), parallel=ParallelConfig(context_parallel=2))
    with pytest.raises(ConfigError, match=r"parallel\.context_parallel: 4 needs sequences of at least 8 tokens"):
        SFTConfig(
            parallel=ParallelConfig(context_parallel=4),
            encoding=EncodingConfig(max_prompt_tokens=2, max_total_tokens=6),
        )
    RLConfig(actor=ActorConfig(packing=PackingConfig(enabled=True, max_tokens=512)))  # room for any row
    RLConfig(actor=ActorConfig(packing=PackingConfig(enabled=True)))  # 0: each micro-batch's width


def _ppo_update(rank: int, world: int, contrastive: bool):
    """The actor's real PPO (+ shared value, + CARFT v4) update, packed and not: the weights after one step."""
    from carft_nemo.algorithms.contrastive import ContrastiveConfig
    from carft_nemo.data.packing import PackingConfig
    from carft_nemo.distributed.layout import ParallelConfig, initialize, shutdown
    from carft_nemo.models.config import ModelConfig
    from carft_nemo.models.forward import unwrap
    from carft_nemo.models.gpt import build_gpt_model
    from carft_nemo.models.heads import attach_policy_heads
    from carft_nemo.training.optim import OptimConfig, make_trainable
    from carft_nemo.workers.actor_loss import ActorTrainSettings, actor_loss
    from carft_nemo.workers.model_worker import ModelWorker, on_token_positions

    model_cfg = ModelConfig(preset="micro", vocab_size=VOCAB)
    parallel = ParallelConfig()
    heads = {"num_attention_heads": model_cfg.num_attention_heads, "num_query_groups": model_cfg.num_query_groups}
    initialize(parallel, seed=1234, num_layers=model_cfg.num_layers, **heads)
    try:
        g = torch.Generator().manual_seed(2)
        b, s = len(LENGTHS), 20
        tokens = torch.randint(0, VOCAB, (b, s), generator=g)
        lengths = torch.tensor(LENGTHS)
        cols = torch.arange(s - 1)[None, :]
        mask = (cols >= 1) & (cols < (lengths - 1)[:, None])  # response = tokens[2:length]
        batch = {
            "tokens": tokens,
            "action_mask": mask,
            "old_logprobs": (torch.randn(b, s - 1, generator=g).clamp(-3, 0) - 1.0) * mask,
            "advantages": torch.randn(b, s - 1, generator=g) * mask,
            "old_values": torch.randn(b, s - 1, generator=g) * mask,
            "returns": torch.randn(b, s - 1, generator=g) * mask,
        }
        cl = None
        if contrastive:
            cl = ContrastiveConfig(enabled=True, variant="v4", coef=0.5, clamp_positive_similarity=None)
            sa = 12
            batch.update(
                response_mask=torch.cat([torch.zeros(b, 1, dtype=torch.bool), mask], dim=1),
                correct=torch.tensor([True, False, True, True, False, True, True, False]),
                critic_token_values=torch.randn(b, s, generator=g),
                ann_embeddings=torch.randn(b, sa, 8, generator=g),
                ann_values=torch.randn(b, sa, generator=g),
                ann_cot_mask=torch.arange(sa)[None, :].expand(b, sa) >= 3,
            )
        settings = ActorTrainSettings(epochs=1, mini_batch_rows=b, seed=0, contrastive=cl, shared_value=True)
        weights, initial = [], None
        for packing in (PackingConfig(), PackingConfig(enabled=True, max_tokens=24)):
            model = build_gpt_model(model_cfg, parallel)
            attach_policy_heads(unwrap(model), shared_value_head=True, contrastive_dim=8 if contrastive else 0)
            if initial is None:  # both runs start from the same weights
                initial = {k: v.clone() for k, v in unwrap(model).state_dict().items() if torch.is_tensor(v)}
            unwrap(model).load_state_dict(initial, strict=False)
            trainable = make_trainable(model, model_cfg, parallel, OptimConfig(lr=1e-3, schedule="constant"), 10)
            worker = ModelWorker()
            worker.trainable, worker.model = trainable, trainable.model
            worker.spec = type("Spec", (), {"parallel": parallel, "packing": packing})()
            gpt = unwrap(trainable.model)

            def make_loss(mini, num_micro, gpt=gpt):
                return actor_loss(gpt, settings, VOCAB, None, mean_term_weight=float(mask.sum()) / num_micro), float(
                    mask.sum()
                )

            metrics = worker.train_epochs(on_token_positions(batch), epochs=1, mini_batch_rows=b,
                                          micro_batch_size=4, seed=0, make_loss=make_loss,
                                          hidden_to_loss=True)  # fmt: skip
            state = {k: v.detach().clone().numpy() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
            weights.append((metrics, state))
        return weights
    finally:
        shutdown()


@pytest.mark.parametrize("contrastive", [False, True], ids=["ppo", "carft_v4"])
def test_packed_ppo_update_gives_the_same_weights(contrastive):
    ((plain, packed),) = run_ranks(_ppo_update, 1, contrastive)
    (m_plain, w_plain), (m_packed, w_packed) = plain, packed
    for key in ("loss", "grad_norm"):
        assert m_packed[key] == pytest.approx(m_plain[key], rel=1e-5, abs=1e-6), key
    assert w_plain.keys() == w_packed.keys()
    for name in w_plain:
        torch.testing.assert_close(torch.from_numpy(w_packed[name]), torch.from_numpy(w_plain[name]),
                                   atol=1e-5, rtol=1e-5, msg=name)  # fmt: skip


def test_thd_sequences_start_at_every_segment_and_bin_boundary():
    from carft_nemo.models.forward import thd_sequences

    segments = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 2, -1, -1], [-1, -1, -1, -1, -1, -1]])
    params = thd_sequences(segments)  # the third bin is an empty one (pipeline parallelism's fixed shape)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 2, 5, 6, 10, 12, 18]
    assert params.max_seqlen_q == params.max_seqlen_kv == 6
