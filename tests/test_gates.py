"""FFP gate variants (tanh gate), the gate learning-rate multiplier's config, and the demo's accuracy line."""

from __future__ import annotations

import pytest
import torch

from dualfocus.evaluate.words import accuracy_in_words
from dualfocus.connectors.dualfocus import DualFocusConfig as ConnectorConfig
from dualfocus.train.config import OptimConfig
from dualfocus.connectors.ffp import FocusFeatureProjector


def _ffp(gate_kind: str, gate: float) -> FocusFeatureProjector:
    torch.manual_seed(0)
    return FocusFeatureProjector(8, 6, 16, n_blocks=1, n_heads=2, gate_init=gate, gate_kind=gate_kind).double()


def test_tanh_gate_scales_the_fused_branch_by_tanh_of_the_gate():
    sem, mot = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    linear, tanh = _ffp("linear", 0.0), _ffp("tanh", 0.0)
    base = linear.mlp_s(sem)
    assert torch.equal(tanh(sem, mot), base)  # tanh(0) = 0: the paper's identity at init holds
    for ffp, value in ((linear, 0.9), (tanh, 0.9)):
        with torch.no_grad():
            ffp.blocks[0].gate.fill_(value)
    branch = (linear(sem, mot) - base) / 0.9  # the fused branch c, from the linear gate
    assert torch.allclose(tanh(sem, mot), base + torch.tanh(torch.tensor(0.9)) * branch, atol=1e-12)
    assert tanh.blocks[0].gate_value().item() == pytest.approx(torch.tanh(torch.tensor(0.9)).item())


def test_gate_gets_a_gradient_at_zero_for_both_kinds():
    for kind in ("linear", "tanh"):
        ffp = _ffp(kind, 0.0)
        sem, mot = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
        ffp(sem, mot).square().sum().backward()
        assert ffp.blocks[0].gate.grad.abs().item() > 0, kind


def test_gate_options_are_validated():
    with pytest.raises(ValueError, match="gate_kind"):
        FocusFeatureProjector(8, 6, 16, n_blocks=1, n_heads=2, gate_kind="sigmoid")
    assert ConnectorConfig(gate_kind="sigmoid").check() == ["gate_kind must be linear or tanh, got 'sigmoid'"]
    assert OptimConfig(gate_lr_scale=0).check() == ["gate_lr_scale must be > 0, got 0"]
    assert ConnectorConfig().gate_kind == "linear" and OptimConfig().gate_lr_scale == 1.0  # the paper's


def test_accuracy_in_words():
    report = {"overall": {"exact_match": 0.8667}, "per_type": {"color": {"exact_match": 1.0},
                                                               "shape": {"exact_match": 0.6},
                                                               "direction": {"exact_match": 1.0}}}
    assert accuracy_in_words(report) == "accuracy 0.87: colour 1.00, shape 0.60, direction 1.00"
    assert accuracy_in_words({"overall": {"exact_match": 0.5}, "per_type": {}}) == "accuracy 0.50"
    assert accuracy_in_words({"overall": {"exact_match": None}, "per_type": {}}) == "accuracy: no scored questions"


def test_gate_settings_of_the_train_config_reach_the_model(tiny_model):
    """connector.gate_kind / gate_init in a recipe must build that FFP (they were once accepted and dropped)."""
    from dualfocus.connectors.dualfocus import build_dualfocus

    ffp = build_dualfocus(str(tiny_model), ConnectorConfig(gate_kind="tanh", gate_init=0.5)).connector.ffp
    assert [(b.gate_kind, b.gate.item()) for b in ffp.blocks] == [("tanh", 0.5)] * len(ffp.blocks)
