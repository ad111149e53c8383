"""User-level DP: users are Poisson-sampled, each sampled user adds one clipped gradient, ε is at the user rate."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lit_dprl.privacy import DPCallback, DPConfigurationError
from lit_dprl.privacy.accounting import epsilon_after
from tests.test_privacy_callback import flat_params, make_trainer
from tests.toy_modules import ToyClassifier, toy_dataset


class UserRows(Dataset):
    """Rows ``(x, y)`` with one user id per row in ``user_ids`` (as ``PreferenceDataset`` has)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, user_ids: list[int]):
        self.x, self.y, self.user_ids = x, y, user_ids

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index], self.y[index]


class UserClassifier(ToyClassifier):
    def __init__(self, dataset: UserRows, users_per_batch: int, **kwargs):
        super().__init__(**kwargs)
        self.dataset, self.users_per_batch = dataset, users_per_batch

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.users_per_batch, shuffle=True)


def interleaved_users(users: int = 6, rows_each: int = 3, outlier_user: int = 2) -> UserRows:
    """Rows of ``users`` users in a shuffled order; the rows of ``outlier_user`` have huge gradients."""
    x, y = toy_dataset(users * rows_each, seed=1).tensors
    ids = torch.arange(users).repeat_interleave(rows_each)[torch.randperm(users * rows_each, generator=torch.Generator().manual_seed(0))]  # fmt: skip
    x = x.clone()
    x[ids == outlier_user] *= 1e3
    return UserRows(x, y, ids.tolist())


def without_user(data: UserRows, user: int) -> UserRows:
    keep = [i for i, u in enumerate(data.user_ids) if u != user]
    return UserRows(data.x[keep], data.y[keep], [data.user_ids[i] for i in keep])


def clipped_sum(tmp_path, data: UserRows, clip: float, **cb_kwargs) -> torch.Tensor:
    """Σ over sampled units of the clipped unit gradients: one SGD(lr=1) step at σ = 0 with q = 1."""
    units = len(set(data.user_ids)) if cb_kwargs.get("privacy_unit") == "user" else len(data)
    torch.manual_seed(0)
    model = UserClassifier(data, users_per_batch=units, lr=1.0)
    before = flat_params(model)
    cb = DPCallback(noise_multiplier=0.0, max_grad_norm=clip, sampling_seed=0, noise_seed=0, **cb_kwargs)
    make_trainer(tmp_path, [cb], max_steps=1).fit(model)
    return (before - flat_params(model)) * units  # the update is the sum / the expected number of units


def clipped_user_gradient(data: UserRows, user: int, clip: float) -> torch.Tensor:
    """Independent reference: the user's per-row gradients averaged by autograd, then clipped to ``clip``."""
    torch.manual_seed(0)
    model = ToyClassifier()
    rows = [i for i, u in enumerate(data.user_ids) if u == user]
    grads = []
    for i in rows:
        model.zero_grad()
        F.cross_entropy(model(data.x[i : i + 1]), data.y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    mean = torch.stack(grads).mean(0)
    return mean * min(1.0, clip / mean.norm().item())


def test_removing_an_interior_user_changes_the_sum_by_exactly_its_clipped_gradient(tmp_path):
    data, clip, user = interleaved_users(), 0.5, 2
    full = clipped_sum(tmp_path, data, clip, privacy_unit="user")
    removed = clipped_sum(tmp_path, without_user(data, user), clip, privacy_unit="user")
    contribution = full - removed
    assert contribution.norm().item() <= clip * (1 + 1e-5)  # one clipped gradient for all 3 rows
    torch.testing.assert_close(contribution, clipped_user_gradient(data, user, clip), rtol=1e-4, atol=1e-6)
    # row-level DP on the same data: the user's 3 rows are 3 clipped gradients (group privacy only)
    rows_full = clipped_sum(tmp_path, data, clip)
    rows_removed = clipped_sum(tmp_path, without_user(data, user), clip)
    assert (rows_full - rows_removed).norm().item() > 2 * clip


def test_user_level_epsilon_is_row_level_accounting_at_the_user_rate(tmp_path):
    x, y = toy_dataset(200).tensors
    data = UserRows(x, y, [i // 4 for i in range(200)])  # 50 users with 4 rows each
    model = UserClassifier(data, users_per_batch=5)
    cb = DPCallback(noise_multiplier=1.0, privacy_unit="user", sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=10).fit(model)
    assert cb.sample_rate == pytest.approx(5 / 50)
    assert cb._dp_optimizers[0].expected_batch_size == 5  # noise and mean over the expected users, not rows
    assert cb.epsilon == pytest.approx(
        epsilon_after(accountant="prv", batch_noise=1.0, sample_rate=0.1, batches=10, delta=50**-1.1),
        rel=1e-9,
    )
    assert all(size % 4 == 0 for size in model.batch_sizes)  # a sampled user brings all its rows
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["privacy_unit"].startswith("one user: every row with the same 'user_id'")
    assert report["dataset_size"] == 50 and report["dataset_rows"] == 200
    assert "N = 50 users" in report["delta_rule"]


def test_max_rows_per_user_caps_each_users_rows(tmp_path):
    x, y = toy_dataset(200).tensors
    data = UserRows(x, y, [i // 5 for i in range(200)])  # 40 users with 5 rows each
    model = UserClassifier(data, users_per_batch=8)
    cb = DPCallback(
        noise_multiplier=1.0, privacy_unit="user", max_rows_per_user=2, sampling_seed=0, noise_seed=0
    )
    make_trainer(tmp_path, [cb], max_steps=5).fit(model)
    assert all(size % 2 == 0 for size in model.batch_sizes) and max(model.batch_sizes) > 0
    assert "its first 2 rows" in cb.report()["privacy_unit"]


def test_physical_chunks_keep_each_user_whole(tmp_path):
    data, clip = interleaved_users(users=8, rows_each=3), 0.05
    whole = clipped_sum(tmp_path, data, clip, privacy_unit="user")
    chunked = clipped_sum(tmp_path, data, clip, privacy_unit="user", max_physical_batch_size=4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-7)


def test_row_level_on_data_with_user_ids_warns_of_group_privacy(tmp_path):
    x, y = toy_dataset(200).tensors
    model = UserClassifier(UserRows(x, y, [i // 4 for i in range(200)]), users_per_batch=10)
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    with pytest.warns(UserWarning, match="group privacy"):
        make_trainer(tmp_path, [cb], max_steps=2).fit(model)
    warnings = json.loads((tmp_path / "privacy.json").read_text())["warnings"]
    assert any("m·ε" in w and "up to m = 4" in w for w in warnings)


def test_user_level_needs_user_ids(tmp_path):
    cb = DPCallback(noise_multiplier=1.0, privacy_unit="user")
    with pytest.raises(DPConfigurationError, match="needs a user id for every row"):
        make_trainer(tmp_path, [cb], max_steps=2).fit(ToyClassifier())


def test_more_users_per_batch_than_users_is_refused_before_training(tmp_path):
    x, y = toy_dataset(200).tensors
    model = UserClassifier(UserRows(x, y, [i // 4 for i in range(200)]), users_per_batch=60)  # 50 users
    cb = DPCallback(noise_multiplier=1.0, privacy_unit="user")
    with pytest.raises(
        DPConfigurationError, match=r"batch size 60 does not fit the 50 users: .* q = .* = 1\.2 "
    ):
        make_trainer(tmp_path, [cb], max_steps=2).fit(model)
    assert not (tmp_path / "privacy.json").exists() and model.batch_sizes == []
