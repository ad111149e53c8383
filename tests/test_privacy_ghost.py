"""Ghost clipping (``DPCallback(grad_sample_mode="ghost")``) gives hook mode's noisy clipped gradient and ε."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from opacus.grad_sample import GradSampleHooks
from torch.utils.data import DataLoader

from lit_dprl.commands.fit import main
from lit_dprl.data.preferences import collate_preference_batch
from lit_dprl.data.text import collate_left_padded
from lit_dprl.losses import training_output
from lit_dprl.privacy import DPCallback, DPConfigurationError
from lit_dprl.privacy.ghost import GhostNormHooks, clipping_coefficients
from lit_dprl.privacy.optimizers import make_dp_optimizer
from lit_dprl.privacy.tied import logit_gradients_at_inputs, tied_cross_term
from lit_dprl.stages.reward import RewardModule
from lit_dprl.stages.sft import SFTModule
from tests.test_privacy_callback import make_trainer
from tests.test_reward import encode_rows, randomise_lora_b
from tests.toy_modules import ToyClassifier, TwoOptimizerModule

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "a short one",
    "a much longer review of a film that went on",
    "mid sized text here",
    "x",
    "fine words",
    "end",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (see test_reward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sft_module(use_lora: bool) -> SFTModule:
    module = SFTModule(model="tiny", use_lora=use_lora, lora_r=4)
    randomise_lora_b(module)
    return module


def sft_loader(module: SFTModule) -> DataLoader:
    rows = []
    for text in TEXTS:
        ids = module.tokenizer(text)["input_ids"] + [module.tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "loss_mask": [0] + [1] * (len(ids) - 1)})
    pad = module.tokenizer.pad_token_id
    return DataLoader(rows, batch_size=len(rows), collate_fn=lambda b: collate_left_padded(b, pad))


def reward_module(use_lora: bool) -> RewardModule:
    module = RewardModule(use_lora=use_lora, seed=2)
    randomise_lora_b(module)
    return module


def reward_loader(module: RewardModule) -> DataLoader:
    rows = encode_rows(module.tokenizer)
    pad = module.tokenizer.pad_token_id
    return DataLoader(rows, batch_size=len(rows), collate_fn=lambda b: collate_preference_batch(b, pad))


def hook_mode_norms(module, loader: DataLoader) -> torch.Tensor:
    """Per-example gradient norms from Opacus's per-example gradients (the reference)."""
    hooks = GradSampleHooks(module, loss_reduction="mean")
    module.training_step(next(iter(loader)), 0)["loss"].backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.flatten(1).norm(dim=1) for p in trainable]).norm(dim=0)
    hooks.cleanup()
    module.zero_grad(set_to_none=True)
    return norms


def noisy_gradient(tmp_path, module, loader: DataLoader, mode: str, clip: float) -> dict[str, torch.Tensor]:
    """``p.grad`` after one DP step on the whole loader batch: (Σ clipped + noise) / B, fixed noise seed."""
    cb = DPCallback(
        noise_multiplier=0.5, max_grad_norm=clip, poisson_sampling=False, noise_seed=3, grad_sample_mode=mode
    )
    make_trainer(tmp_path / mode, [cb], max_steps=1).fit(module, train_dataloaders=loader)
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad}


CASES = {
    "sft-lora": (sft_module, sft_loader, True),
    "sft-full": (sft_module, sft_loader, False),  # tied embedding/output weights, GPT-2's Conv1D
    "reward-lora": (reward_module, reward_loader, True),  # two forwards per pair
}


@pytest.mark.parametrize("case", CASES)
def test_ghost_step_equals_hook_step_with_some_examples_clipped(tmp_path, case):
    build, loader_of, use_lora = CASES[case]
    norms = hook_mode_norms(build(use_lora), loader_of(build(use_lora)))
    clip = float(norms.median())
    assert (norms > clip * 1.01).any() and (norms < clip * 0.99).any()  # some clipped, some not
    hooks, ghost = (
        noisy_gradient(tmp_path, module, loader_of(module), mode, clip)
        for mode, module in (("hooks", build(use_lora)), ("ghost", build(use_lora)))
    )
    assert hooks.keys() == ghost.keys()
    for name, grad in hooks.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(ghost[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ghost_norms_equal_per_example_gradient_norms_on_full_gpt2():
    module = sft_module(use_lora=False)
    loader = sft_loader(module)
    reference = hook_mode_norms(module, loader)
    hooks = GhostNormHooks(module, max_grad_norm=1.0)
    gpt2 = module.model
    assert hooks.tied == {gpt2.transformer.wte: gpt2.lm_head, gpt2.lm_head: gpt2.transformer.wte}
    hooks.start_step()
    norms = hooks.norm_pass(module.training_step(next(iter(loader)), 0)["per_example_loss"])
    hooks.cleanup()
    torch.testing.assert_close(norms, reference, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in module.parameters())  # the norm pass left no gradient behind


def test_tied_cross_term_is_the_inner_product_of_the_embedding_and_output_gradients():
    generator = torch.Generator().manual_seed(0)
    batch, length, vocab, width = 3, 5, 7, 4
    ids = torch.randint(vocab, (batch, length), generator=generator)
    embedding_backprops = torch.randn(batch, length, width, generator=generator)
    output_inputs = torch.randn(batch, length, width, generator=generator)
    logit_backprops = torch.randn(batch, length, vocab, generator=generator)
    embedding_grads = torch.zeros(batch, vocab, width)
    for n in range(batch):
        embedding_grads[n].index_add_(0, ids[n], embedding_backprops[n])
    output_grads = torch.einsum("nsv,nsd->nvd", logit_backprops, output_inputs)
    cross = tied_cross_term(
        logit_gradients_at_inputs(logit_backprops, ids), embedding_backprops, output_inputs
    )
    torch.testing.assert_close(cross, (embedding_grads * output_grads).sum((1, 2)))


def test_clipping_coefficients_drop_non_finite_examples():
    norms = torch.tensor([0.5, 2.0, float("nan"), float("inf")])
    torch.testing.assert_close(
        clipping_coefficients(norms, 1.0), torch.tensor([1.0, 1.0 / (2.0 + 1e-6), 0.0, 0.0])
    )


def fit_tiny(tmp_path: Path, stage: str, mode: str) -> dict:
    export = tmp_path / mode / stage / "model"
    main(
        [
            "fit",
            "--config",
            str(ROOT / f"configs/tiny/{stage}.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp_path / mode}",
            f"--model.init_args.export_dir={export}",
            "--trainer.max_steps=3",
            f"--trainer.callbacks.init_args.grad_sample_mode={mode}",
        ]
    )
    return json.loads((export / "privacy.json").read_text())


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_tiny_stage_trains_in_ghost_mode_through_the_cli_with_hook_modes_epsilon(tmp_path, stage):
    ghost, hooks = fit_tiny(tmp_path, stage, "ghost"), fit_tiny(tmp_path, stage, "hooks")
    assert ghost["steps"] == hooks["steps"] == 3
    assert ghost["epsilon"] == hooks["epsilon"] > 0
    assert ghost["noise_multiplier"] == hooks["noise_multiplier"]
    assert (ghost["grad_sample_mode"], hooks["grad_sample_mode"]) == ("ghost", "hooks")


class PerExampleToy(ToyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return training_output(torch.nn.functional.cross_entropy(self(x), y, reduction="none"))


def test_empty_poisson_batches_take_noise_only_steps_in_ghost_mode(tmp_path):
    module = PerExampleToy(n=200, batch_size=1)  # q = 0.005: most batches are empty
    before = [p.detach().clone() for p in module.parameters()]
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0, grad_sample_mode="ghost")
    make_trainer(tmp_path, [cb], max_steps=5).fit(module)
    assert cb.steps == 5 and cb._dp_optimizers[0].noisy_steps == 5
    assert all(not torch.equal(p, b) for p, b in zip(module.parameters(), before, strict=True))


def ghost_optimizer(layer: torch.nn.Module):
    return make_dp_optimizer(
        torch.optim.SGD(layer.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=1,
        distributed=False,
        generator=None,
        ghost=True,
    )


def test_ghost_optimizer_refuses_a_gradient_the_norm_pass_did_not_measure():
    layer = torch.nn.Linear(2, 1)
    optimizer = ghost_optimizer(layer)
    optimizer.record_norm_pass(1, 0, {id(layer.weight)})  # the bias got no norm
    for p in layer.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="did not measure"):
        optimizer.step()


def test_ghost_optimizer_refuses_a_non_finite_clipped_sum():
    layer = torch.nn.Linear(2, 1)
    optimizer = ghost_optimizer(layer)
    optimizer.record_norm_pass(1, 1, {id(p) for p in layer.parameters()})
    for p in layer.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        optimizer.step()
    assert optimizer.non_finite_units == 1


class LayerWithBuffer(PerExampleToy):
    def __init__(self):
        super().__init__()
        self.net[0].register_buffer(
            "running_scale", torch.ones(1)
        )  # Opacus cannot serve a layer with buffers


class NoPerExampleLoss(ToyClassifier):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx)}


class MeanOfOtherLosses(ToyClassifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = torch.nn.functional.cross_entropy(self(x), y, reduction="none")
        return {"loss": losses.mean(), "per_example_loss": 2 * losses}


@pytest.mark.parametrize(
    ("module", "callback_kwargs", "message"),
    [
        (TwoOptimizerModule(), {}, "manual"),
        (ToyClassifier(), {"privacy_unit": "user"}, "privacy_unit='user'"),
        (ToyClassifier(), {"max_physical_batch_size": 4}, "max_physical_batch_size"),
        (NoPerExampleLoss(), {}, "per_example_loss"),
        (MeanOfOtherLosses(), {}, "not the mean"),
        (ToyClassifier(), {"grad_sample_mode": "functorch"}, "'hooks' or 'ghost'"),
        (LayerWithBuffer(), {}, "ghost clipping cannot serve"),
    ],
    ids=[
        "manual-optimization",
        "user-level",
        "physical-batches",
        "no-per-example-loss",
        "wrong-mean",
        "mode",
        "layer-with-buffer",
    ],
)
def test_ghost_mode_refuses_what_it_does_not_serve(tmp_path, module, callback_kwargs, message):
    with pytest.raises(DPConfigurationError, match=message):
        cb = DPCallback(
            noise_multiplier=1.0, sampling_seed=0, **({"grad_sample_mode": "ghost"} | callback_kwargs)
        )
        make_trainer(tmp_path, [cb], max_steps=2).fit(module)
