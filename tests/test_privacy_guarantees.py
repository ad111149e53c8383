"""Proof gaps closed: one backward per step, per-example participation, bf16 clipping, a hard budget, δ, secure mode."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lit_dprl.privacy import DPCallback, DPConfigurationError
from lit_dprl.privacy import optimizers as dp_optimizers
from lit_dprl.privacy.accounting import epsilon_after
from tests.test_privacy_callback import flat_params, make_trainer
from tests.toy_modules import ToyClassifier, toy_dataset


class ManualModule(ToyClassifier):
    """Manual optimization: ``backwards`` backward passes per step, or ``minibatches`` steps per batch."""

    def __init__(self, backwards: int = 1, minibatches: int = 1, feed_all_rows: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.backwards, self.minibatches_per_batch, self.feed_all_rows = backwards, minibatches, feed_all_rows

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        for rows in torch.arange(len(x)).tensor_split(self.minibatches_per_batch):
            rows = torch.arange(len(x)) if self.feed_all_rows else rows
            opt.zero_grad()
            if len(rows):
                for _ in range(
                    self.backwards
                ):  # e.g. manual_backward(policy_loss); manual_backward(value_loss)
                    self.manual_backward(F.cross_entropy(self(x[rows]), y[rows]))
            opt.step()


# ------------------------------------------------------------------------------- one backward per step
def test_two_backward_passes_before_one_step_are_refused(tmp_path):
    model = ManualModule(backwards=2)
    before = flat_params(model)
    cb = DPCallback(noise_multiplier=0.8, sampling_seed=0, noise_seed=0)
    with pytest.raises(RuntimeError, match=r"two or more backward passes.*Sum the losses"):
        make_trainer(tmp_path, [cb], max_steps=4).fit(model)
    assert torch.equal(flat_params(model), before)  # refused before any noise was released
    assert cb.steps == 0


def test_one_backward_of_the_summed_losses_trains(tmp_path):
    cb = DPCallback(noise_multiplier=0.8, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=4).fit(ManualModule(backwards=1))
    assert cb.steps == 4


# ------------------------------------------------------------------------------- per-example participation
def test_minibatches_that_reuse_every_row_are_caught(tmp_path):
    """Declares 2 minibatches but feeds the whole batch to both: every row takes part in 2 steps, not 1."""
    model = ManualModule(minibatches=2, feed_all_rows=True, n=200, batch_size=20)
    cb = DPCallback(noise_multiplier=0.8, sampling_seed=0, noise_seed=0)
    with pytest.raises(RuntimeError, match="more steps than declared"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(model)
    assert cb._dp_optimizers[0].noisy_steps == 1  # the second minibatch's noise was never released
    assert cb.steps == 1  # ... and the first one's is accounted


def test_minibatches_that_partition_the_batch_train(tmp_path):
    cb = DPCallback(noise_multiplier=0.8, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=8).fit(ManualModule(minibatches=2, n=200, batch_size=20))
    assert cb.steps == 4 and cb._dp_optimizers[0].noisy_steps == 8


def test_under_bf16_mixed_no_clipped_per_example_gradient_exceeds_c(tmp_path, monkeypatch):
    """Per-example gradients come out of Opacus in bf16; clipping them in bf16 overshoots C by up to 2^-8."""
    norms = []
    clip = dp_optimizers.NoiseOnlyDPOptimizer.clip_and_accumulate

    def recording(self):
        clip(self)  # one example per step: summed_grad is that example's clipped gradient
        norms.append(torch.sqrt(sum((p.summed_grad.double() ** 2).sum() for p in self.params)).item())

    monkeypatch.setattr(dp_optimizers.NoiseOnlyDPOptimizer, "clip_and_accumulate", recording)

    class Outliers(ToyClassifier):
        def train_dataloader(self):
            x, y = super().train_dataloader().dataset.tensors
            dataset = torch.utils.data.TensorDataset(300 * x, y)  # gradients far above C
            return torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False)

    c = 0.01
    cb = DPCallback(noise_multiplier=0.0, max_grad_norm=c, poisson_sampling=False, noise_seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=64, precision="bf16-mixed")
    trainer.fit(Outliers(n=64, batch_size=1, hidden=64))
    assert len(norms) == 64
    assert max(norms) <= c * (1 + 1e-6)
    assert min(norms) > 0.99 * c  # clipping was active


# ------------------------------------------------------------------------------- numerical faults
def test_a_non_finite_example_drops_out_of_the_step_instead_of_poisoning_it(tmp_path):
    """One NaN row: its per-example gradient is zeroed and counted; the step equals the other rows' step."""
    n, bad = 16, 5

    class OneNaN(ToyClassifier):
        def train_dataloader(self):
            x, y = toy_dataset(n).tensors
            x = x.clone()
            x[bad] = float("nan")
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=n)

    model = OneNaN(n=n, batch_size=n)
    reference = ToyClassifier(n=n, batch_size=n)
    reference.load_state_dict(model.state_dict())
    x, y = toy_dataset(n).tensors
    keep = torch.arange(n) != bad
    loss = (
        F.cross_entropy(reference(x[keep]), y[keep], reduction="sum") / n
    )  # DP-SGD divides by the batch size
    loss.backward()
    expected = torch.cat([(p - model.lr * p.grad).detach().flatten() for p in reference.parameters()])
    cb = DPCallback(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=1).fit(model)
    assert cb._dp_optimizers[0].non_finite_units == 1
    torch.testing.assert_close(flat_params(model), expected)


# ------------------------------------------------------------------------------- the budget is a hard limit
def test_min_steps_that_would_overspend_are_refused(tmp_path):
    cb = DPCallback(noise_multiplier=0.8, max_epsilon=1.5, accountant="rdp", sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=500, min_steps=400)
    with pytest.raises(DPConfigurationError, match=r"min_steps=400.*allows only"):
        trainer.fit(ToyClassifier(n=200, batch_size=10))


def test_min_epochs_that_would_overspend_are_refused(tmp_path):
    cb = DPCallback(noise_multiplier=0.8, max_epsilon=1.5, accountant="rdp", sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=5, min_epochs=3)
    with pytest.raises(DPConfigurationError, match=r"min_epochs=3.*allows only"):
        trainer.fit(ToyClassifier(n=200, batch_size=10))


def test_resume_with_a_smaller_batch_never_overspends(tmp_path):
    """The first 10 batches ran at q = 0.2; pricing them at the resumed q = 0.05 allows all 120 (ε ≈ 4.13 > 4)."""
    first = DPCallback(noise_multiplier=1.0, accountant="rdp", sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [first], max_steps=10)
    trainer.fit(ToyClassifier(n=200, batch_size=40))
    trainer.save_checkpoint(tmp_path / "q02.ckpt")
    resumed = DPCallback(
        noise_multiplier=1.0, max_epsilon=4.0, accountant="rdp", sampling_seed=0, noise_seed=0
    )
    make_trainer(tmp_path, [resumed], max_steps=120).fit(
        ToyClassifier(n=200, batch_size=10), ckpt_path=tmp_path / "q02.ckpt"
    )
    delta = 200**-1.1
    history = [(1.0, 0.2, 10)]
    assert 10 < resumed.steps < 120
    assert resumed.epsilon == pytest.approx(
        epsilon_after(
            accountant="rdp",
            batch_noise=1.0,
            sample_rate=0.05,
            batches=resumed.steps - 10,
            delta=delta,
            history=history,
        ),
        rel=1e-9,
    )
    assert resumed.epsilon <= 4.0
    one_more = epsilon_after(
        accountant="rdp",
        batch_noise=1.0,
        sample_rate=0.05,
        batches=resumed.steps - 9,
        delta=delta,
        history=history,
    )
    assert one_more > 4.0
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert [h["sample_rate"] for h in report["accounting_history"]] == [0.2, 0.05]


# ------------------------------------------------------------------------------- secure randomness
def test_secure_mode_is_refused_without_torchcsprng():
    if importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed")
    with pytest.raises(DPConfigurationError, match=r"torchcsprng.*not installed"):
        DPCallback(noise_multiplier=1.0, secure_mode=True)


def test_secure_mode_draws_sampling_and_noise_from_the_secure_generator(tmp_path, monkeypatch):
    """Wiring only: a stand-in torchcsprng whose generator we can recognise."""
    secure = torch.Generator().manual_seed(1234)
    fake = types.ModuleType("torchcsprng")
    fake.create_random_device_generator = lambda path: secure
    monkeypatch.setitem(sys.modules, "torchcsprng", fake)
    with pytest.raises(DPConfigurationError, match="give no seeds"):
        DPCallback(noise_multiplier=1.0, secure_mode=True, noise_seed=0)
    cb = DPCallback(noise_multiplier=1.0, secure_mode=True)
    make_trainer(tmp_path, [cb], max_steps=2).fit(ToyClassifier())
    (optimizer,) = cb._dp_optimizers
    assert (
        optimizer.secure_mode and optimizer.generator is secure and cb._training.sampler.generator is secure
    )
    assert json.loads((tmp_path / "privacy.json").read_text())["secure_mode"] is True
