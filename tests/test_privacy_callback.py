"""DPCallback on plain (non-language) LightningModules: guarantees, refusals, resume."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from lit_dprl.privacy import DPCallback, DPConfigurationError
from lit_dprl.privacy.accounting import epsilon_after
from lit_dprl.privacy.sampling import PoissonDataLoader
from tests.toy_modules import ToyClassifier, TwoOptimizerModule, toy_dataset


def make_trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=10,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_reported_epsilon_matches_an_independent_computation(tmp_path):
    cb = DPCallback(noise_multiplier=1.1, sampling_seed=0, noise_seed=0)
    model = ToyClassifier(n=200, batch_size=10)
    make_trainer(tmp_path, [cb], max_steps=30).fit(model)
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["steps"] == cb.steps == 30
    assert report["sample_rate"] == cb.sample_rate == pytest.approx(10 / 200)
    assert report["delta"] == cb.delta == pytest.approx(200**-1.1)  # default δ = N^-1.1 < 1/N
    assert "N^-1.1" in report["delta_rule"]
    assert report["dataset_size"] == 200
    independent = epsilon_after(
        accountant="prv", batch_noise=1.1, sample_rate=0.05, batches=30, delta=200**-1.1
    )
    assert report["epsilon"] == pytest.approx(independent, rel=1e-6) == cb.epsilon
    for key in ("noise_multiplier", "accountant", "max_grad_norm", "epsilon_rdp"):
        assert key in report


@pytest.mark.parametrize("source", ["module", "datamodule", "fit"])
def test_the_train_loader_is_poisson_sampled_whoever_gives_it(tmp_path, source):
    """The module's ``train_dataloader``, a data module's, or ``fit(train_dataloaders=...)``: all are replaced."""
    given = {
        "module": {},
        "datamodule": {"datamodule": pl.LightningDataModule.from_datasets(toy_dataset(200), batch_size=20)},
        "fit": {"train_dataloaders": DataLoader(toy_dataset(200), batch_size=20, shuffle=True)},
    }[source]
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=3)
    trainer.fit(ToyClassifier(n=100, batch_size=5), **given)
    assert isinstance(trainer.train_dataloader, PoissonDataLoader) and cb.steps == 3
    assert cb.sample_rate == pytest.approx(5 / 100 if source == "module" else 20 / 200)


def test_target_epsilon_calibrates_sigma_and_is_spent(tmp_path):
    cb = DPCallback(target_epsilon=3.0, accountant="rdp", sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2).fit(ToyClassifier(n=200, batch_size=10))
    assert cb.steps == 2 * 20  # 1/q batches per epoch
    assert 2.9 < cb.epsilon <= 3.0
    assert cb.noise_multiplier > 0


def test_trains_a_plain_classifier_with_no_dp_code(tmp_path):
    model = ToyClassifier(n=400, batch_size=40, lr=0.5)
    cb = DPCallback(target_epsilon=8.0, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=60).fit(model)
    assert model.accuracy() > 0.85
    assert len(set(model.batch_sizes)) > 1  # Poisson sampling: the batch size varies
    assert cb.epsilon <= 8.0


def test_zero_noise_huge_clip_equals_non_private_training(tmp_path):
    torch.manual_seed(0)
    reference = ToyClassifier(n=64, batch_size=8)
    private = copy.deepcopy(reference)
    pl.seed_everything(1)
    make_trainer(tmp_path, [], max_steps=8).fit(reference)
    pl.seed_everything(1)
    cb = DPCallback(noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=8).fit(private)
    torch.testing.assert_close(flat_params(private), flat_params(reference), rtol=1e-5, atol=1e-6)


def _one_step_update(tmp_path, dataset, clip):
    """Parameter change of one SGD(lr=1) step over the whole dataset as one batch, sigma=0."""

    class FullBatch(ToyClassifier):
        def train_dataloader(self):
            return DataLoader(dataset, batch_size=len(dataset), shuffle=False)

    torch.manual_seed(0)
    model = FullBatch(lr=1.0)
    before = flat_params(model)
    cb = DPCallback(noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=1).fit(model)
    return (before - flat_params(model)) * len(dataset)  # = sum of clipped per-example gradients


@pytest.mark.parametrize("clip", [0.1, 1.0])
def test_sensitivity_of_clipped_sum_is_at_most_c(tmp_path, clip):
    x, y = toy_dataset(16).tensors
    neighbour_x = x.clone()
    neighbour_x[3] = 1e3  # replace one example by an outlier with a huge gradient
    y2 = y.clone()
    y2[3] = 1 - y[3]
    sum_d = _one_step_update(tmp_path, TensorDataset(x, y), clip)
    sum_d2 = _one_step_update(tmp_path, TensorDataset(neighbour_x, y2), clip)
    distance = (sum_d - sum_d2).norm().item()
    assert distance <= 2 * clip + 1e-5  # replace-one: remove (<= C) plus add (<= C)
    assert distance > 0.5 * clip  # the outlier really moved the sum; without clipping it would be huge
    # add/remove-one neighbour: the sums differ by exactly one clipped gradient, norm <= C
    sum_minus = _one_step_update(tmp_path, TensorDataset(x[:15], y[:15]), clip)
    sum_full = _one_step_update(tmp_path, TensorDataset(x[:16], y[:16]), clip)
    assert (sum_full - sum_minus).norm().item() <= clip + 1e-5


def _noise_std_ratio(tmp_path, sigma=2.0, clip=0.5):
    model = ToyClassifier(n=100, batch_size=10, lr=1.0, hidden=400, zero_loss=True)
    before = flat_params(model)
    cb = DPCallback(noise_multiplier=sigma, max_grad_norm=clip, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=1).fit(model)
    expected_batch = 100 * cb.sample_rate
    return (before - flat_params(model)) / (sigma * clip / expected_batch)


def test_noise_has_the_calibrated_std(tmp_path):
    z = _noise_std_ratio(tmp_path).numpy()
    assert stats.kstest(z, "norm").pvalue > 0.01
    assert stats.kstest(z / (2 / 3), "norm").pvalue < 1e-6  # would-be noise at 2/3 sigma is rejected
    assert stats.kstest(z / 1.5, "norm").pvalue < 1e-6  # and at 3/2 sigma


def test_empty_poisson_batches_are_noise_only_steps(tmp_path):
    model = ToyClassifier(n=200, batch_size=1)  # q = 0.005: about 37% of batches are empty
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=3, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=40).fit(model)
    assert cb.steps == 40  # every batch, empty or not, was accounted
    assert len(model.batch_sizes) < 40  # some batches were empty and never reached training_step
    assert min(model.batch_sizes) >= 1


def test_empty_batch_changes_parameters_by_noise(tmp_path):
    from lit_dprl.privacy.sampling import PoissonBatchSampler

    n = 50  # q = 1/50: the first sample is empty with probability (1 - q)^n = 0.36
    seed = next(s for s in range(100) if next(iter(PoissonBatchSampler(n, 1 / n, 1, seed=s))) == [])
    model = ToyClassifier(n=n, batch_size=1)
    before = flat_params(model)
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=seed, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=1).fit(model)
    assert model.batch_sizes == []  # the module never saw the empty sample
    assert cb.steps == 1  # ... yet the step was taken and accounted
    assert not torch.equal(before, flat_params(model))  # a noise-only update


def test_manual_optimization_with_two_optimizers(tmp_path):
    model = TwoOptimizerModule(n=200, batch_size=20)
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=20).fit(model)  # global_step counts both optimizers' steps
    report = cb.report()
    assert report["steps"] == 10 and report["optimizer_steps"] == 20
    opt_a, opt_b = cb._dp_optimizers  # one noise stream: the two optimizers' noises are independent draws
    assert opt_a.generator is opt_b.generator
    # each example is in two Gaussian steps per batch (one per optimizer): sigma_batch = sigma / sqrt(2)
    assert report["batch_noise_multiplier"] == pytest.approx(1.0 / 2**0.5)
    assert cb.epsilon == pytest.approx(
        epsilon_after(accountant="prv", batch_noise=2**-0.5, sample_rate=0.1, batches=10, delta=200**-1.1),
        rel=1e-6,
    )


def test_module_stepping_more_than_declared_is_stopped(tmp_path):
    model = TwoOptimizerModule(n=200, batch_size=20, steps_taken_per_batch=2)
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    # the second pass over the batch is stopped before its noise is released (every row would take part twice)
    with pytest.raises(RuntimeError, match="more steps than declared"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(model)
    assert cb.steps == 1  # the batch whose noise was released is still accounted


def test_module_stepping_less_than_declared_is_stopped(tmp_path):
    model = TwoOptimizerModule(n=200, batch_size=20, steps_taken_per_batch=1)
    model.minibatches_per_batch = 2  # declares two minibatch steps, takes one
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    with pytest.raises(RuntimeError, match="exactly 2 noisy step"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(model)
    assert cb.steps == 1


def test_declared_epochs_per_batch_are_accounted(tmp_path):
    model = TwoOptimizerModule(n=200, batch_size=20, steps_taken_per_batch=3)
    model.epochs_per_batch = 3
    cb = DPCallback(noise_multiplier=1.5, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=24).fit(model)
    assert cb.steps == 4
    assert cb.report()["noisy_steps_per_example_per_batch"] == 6


def test_budget_stops_training_cleanly(tmp_path):
    cb = DPCallback(noise_multiplier=0.8, max_epsilon=1.5, accountant="rdp", sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=500).fit(ToyClassifier(n=200, batch_size=10))
    assert 0 < cb.steps < 500
    assert cb.epsilon <= 1.5
    nxt = epsilon_after(
        accountant="rdp", batch_noise=0.8, sample_rate=0.05, batches=cb.steps + 1, delta=200**-1.1
    )
    assert nxt > 1.5
    assert json.loads((tmp_path / "privacy.json").read_text())["stopped_by_budget"] is True


def test_checkpoint_resume_reports_the_same_epsilon(tmp_path):
    uninterrupted = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path / "a", [uninterrupted], max_steps=12).fit(ToyClassifier())

    first = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path / "b", [first], max_steps=6)
    model = ToyClassifier()
    trainer.fit(model)
    ckpt = tmp_path / "b" / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    at_half = flat_params(model)

    resumed = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    model2 = ToyClassifier()
    make_trainer(tmp_path / "c", [resumed], max_steps=12).fit(model2, ckpt_path=ckpt)
    assert resumed.steps == 12
    assert resumed.epsilon == pytest.approx(uninterrupted.epsilon, rel=1e-9)
    assert not torch.equal(at_half, flat_params(model2))  # training continued


class StopAt(pl.Callback):
    def __init__(self, batches: int):
        self.batches = batches

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.batches:
            trainer.should_stop = True


def test_resume_with_calibrated_sigma_keeps_sigma_and_refuses_overspending(tmp_path):
    first = DPCallback(target_epsilon=2.0, accountant="rdp", sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [first, StopAt(5)], max_steps=10)  # interrupted half-way
    trainer.fit(ToyClassifier())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    again = DPCallback(target_epsilon=2.0, accountant="rdp", sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [again], max_steps=10)
    trainer.fit(ToyClassifier(), ckpt_path=tmp_path / "half.ckpt")
    assert again.noise_multiplier == first.noise_multiplier
    assert again.steps == 10 and 1.95 < again.epsilon <= 2.0
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    extended = DPCallback(target_epsilon=2.0, accountant="rdp", sampling_seed=0, noise_seed=0)
    with pytest.raises(DPConfigurationError, match="allows no further step"):
        make_trainer(tmp_path, [extended], max_steps=50).fit(
            ToyClassifier(), ckpt_path=tmp_path / "done.ckpt"
        )


# ---------------------------------------------------------------------------------------------- refusals
def test_exactly_one_of_target_epsilon_and_noise_multiplier():
    with pytest.raises(DPConfigurationError, match="exactly one"):
        DPCallback()
    with pytest.raises(DPConfigurationError, match=r"exactly one.*set it to null"):
        DPCallback(target_epsilon=1.0, noise_multiplier=1.0)


def test_refuses_gradient_accumulation(tmp_path):
    trainer = make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], accumulate_grad_batches=2)
    with pytest.raises(
        DPConfigurationError, match=r"accumulate_grad_batches=2.*raise the DataModule's batch_size"
    ):
        trainer.fit(ToyClassifier())


def test_delta_at_least_one_over_n_only_when_given_and_warned_in_the_report(tmp_path):
    cb = DPCallback(noise_multiplier=1.0, target_delta=0.01, sampling_seed=0, noise_seed=0)
    with pytest.warns(UserWarning, match=r"at least 1/N"):
        make_trainer(tmp_path, [cb], max_steps=2).fit(ToyClassifier(n=200))
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["delta"] == 0.01 and report["delta_rule"] == "target_delta given by the user"
    assert any("at least 1/N" in w for w in report["warnings"])


def test_refuses_attaching_twice(tmp_path):
    with pytest.raises((DPConfigurationError, RuntimeError), match="more than one"):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0), DPCallback(noise_multiplier=1.0)]).fit(
            ToyClassifier()
        )
    # the same callback attached to a module that already carries DP hooks is refused too
    model = ToyClassifier()
    model._lit_dprl_dp_callback = object()
    with pytest.raises(DPConfigurationError, match="already has DP hooks"):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)]).fit(model)


def test_refuses_batch_norm(tmp_path):
    class WithBatchNorm(ToyClassifier):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2)
            )

    trainer = make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)])
    with pytest.raises(DPConfigurationError, match="BatchNorm"):
        trainer.fit(WithBatchNorm())


def test_refuses_fp16_grad_scaler(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], plugins=[plugin])
    with pytest.raises(DPConfigurationError, match="GradScaler"):
        trainer.fit(ToyClassifier())


def test_refuses_unsupported_modules(tmp_path):
    class WithLSTM(ToyClassifier):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 4, batch_first=True)

    trainer = make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)])
    with pytest.raises(DPConfigurationError, match="per-example"):
        trainer.fit(WithLSTM())


def test_refuses_a_budget_that_allows_no_step(tmp_path):
    trainer = make_trainer(tmp_path, [DPCallback(noise_multiplier=0.3, max_epsilon=0.01)])
    with pytest.raises(DPConfigurationError, match="allows no further step"):
        trainer.fit(ToyClassifier())


def test_physical_batches_give_the_same_step_as_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    whole = ToyClassifier(n=200, batch_size=20)
    chunked = copy.deepcopy(whole)
    cb_whole = DPCallback(noise_multiplier=0.0, max_grad_norm=0.05, sampling_seed=4, noise_seed=0)
    make_trainer(tmp_path, [cb_whole], max_steps=6).fit(whole)
    cb_chunked = DPCallback(
        noise_multiplier=0.0, max_grad_norm=0.05, sampling_seed=4, noise_seed=0, max_physical_batch_size=3
    )
    make_trainer(tmp_path, [cb_chunked], max_steps=6).fit(chunked)
    assert max(chunked.batch_sizes) <= 3 < max(whole.batch_sizes)
    torch.testing.assert_close(flat_params(chunked), flat_params(whole), rtol=1e-5, atol=1e-7)
    assert cb_chunked.steps == cb_whole.steps == 6
    assert cb_chunked._dp_optimizers[0].noisy_steps == 6  # noise is added once per sampled batch
