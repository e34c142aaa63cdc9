"""Every worker class honours its written contract: the protocol's methods, with its parameters."""

from __future__ import annotations

import inspect
from typing import Protocol

import pytest

from carft_nemo.distributed.ray_group import method_name
from carft_nemo.workers.actor import ActorWorker
from carft_nemo.workers.contracts import PolicyWorker, RewardScorer, ValueWorker
from carft_nemo.workers.critic import CriticWorker
from carft_nemo.workers.reward import RewardWorker

PAIRS = [(ActorWorker, PolicyWorker), (CriticWorker, ValueWorker), (RewardWorker, RewardScorer)]


def _methods(protocol: type) -> dict[str, inspect.Signature]:
    own = {name: fn for name, fn in vars(protocol).items() if inspect.isfunction(fn) and not name.startswith("_")}
    return {name: inspect.signature(fn) for name, fn in own.items()}


def _shape(sig: inspect.Signature) -> list[tuple[str, inspect._ParameterKind, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize("worker, protocol", PAIRS, ids=lambda c: c.__name__)
def test_worker_has_every_protocol_method_with_its_parameters(worker: type, protocol: type) -> None:
    methods = _methods(protocol)
    assert methods, f"{protocol.__name__} declares no methods"
    for name, sig in methods.items():
        impl = getattr(worker, name, None)
        assert callable(impl), f"{worker.__name__} lacks {protocol.__name__}.{name}"
        assert _shape(inspect.signature(impl)) == _shape(sig), f"{worker.__name__}.{name} differs from the contract"
        assert inspect.getdoc(getattr(protocol, name)), f"{protocol.__name__}.{name} has no docstring"


@pytest.mark.parametrize("protocol", [p for _, p in PAIRS], ids=lambda c: c.__name__)
def test_contracts_are_protocols_documenting_shapes(protocol: type) -> None:
    assert Protocol in protocol.__mro__
    docs = " ".join(inspect.getdoc(fn) or "" for fn in vars(protocol).values() if inspect.isfunction(fn))
    assert protocol is RewardScorer or "[B, S]" in docs  # model roles state their batch shapes


def test_groups_resolve_contract_methods_by_name_and_reject_others() -> None:
    assert method_name(ActorWorker, PolicyWorker.forward) == "forward"
    assert method_name(CriticWorker, ValueWorker.train) == "train"
    with pytest.raises(AttributeError, match="RewardWorker has no method 'forward'"):
        method_name(RewardWorker, PolicyWorker.forward)
    with pytest.raises(TypeError, match="expected a worker method"):
        method_name(ActorWorker, "forward")
