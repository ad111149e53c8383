"""The white-box audit: the score on a linear toy whose answer is known, and the command end to end on SFT."""

import math

import numpy as np
import pytest
import torch

from lit_dprl.commands import audit_whitebox
from lit_dprl.commands.audit import main as audit_main
from lit_dprl.commands.audit_whitebox import InitialGradients
from tests.test_audit import FAST_SFT


class LinearCanaries:
    """Canary i's statistic is ⟨x_i, w⟩ for a linear model w (so ∇s_i = x_i); a row is the index i."""

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor) -> None:
        self.model, self.inputs = model, inputs

    def statistic_tensor(self, rows: list[int]) -> torch.Tensor:
        assert not self.model.training  # gradients are taken in eval mode
        return self.model.linear(self.inputs[rows]).squeeze(-1)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1, bias=False)
        self.frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)  # never part of θ


def test_score_is_the_update_along_each_canarys_unit_gradient(monkeypatch):
    monkeypatch.setattr(audit_whitebox, "SCORING_BATCH", 2)  # three chunks of the five canaries
    toy = Toy().train()
    inputs = torch.tensor([[2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 0], [1.0, 1.0, 0, 0], [-1.0, 0, 0, 0]])
    initial = InitialGradients.capture(toy, LinearCanaries(toy, inputs), list(range(5)))
    assert toy.training and initial.directions.shape == (5, 4)
    with torch.no_grad():
        toy.linear.weight += 0.5 * inputs[0]  # the update is exactly along canary 0's gradient: Δθ = e_1
        toy.frozen += 7.0  # not trainable: ignored
    np.testing.assert_allclose(initial.scores(), [1.0, 0.0, 0.0, 1 / math.sqrt(2), -1.0], atol=1e-6)


def test_no_trainable_parameters_is_refused():
    toy = Toy().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        InitialGradients.capture(toy, LinearCanaries(toy, torch.ones(1, 4)), [0])


def test_white_box_sft_audit_end_to_end(tmp_path):
    """Without DP and with every weight trained, the members' updates show: every member scores above
    every non-member."""
    audit = audit_main(["--config", "configs/tiny/sft.yaml", "--canaries", "16", "--seed", "0", "--mode", "white-box",
                        "--non-private", "--out", str(tmp_path), "--", *FAST_SFT, "--trainer.max_steps=10",
                        "--data.init_args.max_train_examples=16", "--model.init_args.use_lora=false",
                        "--model.init_args.learning_rate=3e-3"])  # fmt: skip
    assert audit["mode"] == "white-box" and "⟨θ_final − θ_init, ∇s⟩" in audit["score"]
    assert "−(mean NLL)" in audit["score"]
    scores, included = np.array(audit["canary_scores"]), np.array(audit["canary_included"])
    assert audit["canaries"] == len(scores) == 16 and 0 < included.sum() < 16
    assert scores[included].min() > scores[~included].max()


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        audit_main(["--config", "configs/tiny/sft.yaml", "--mode", "grey-box", "--out", str(tmp_path)])
