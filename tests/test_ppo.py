"""Stage 3: PPO/RLOO/GRPO module invariants, Opacus per-example gradients, accounting, refusals, provenance,
resume, learning. (Per-prompt randomness, packing and neighbouring behaviour: tests/test_rollout.py.)"""

from __future__ import annotations

import json
import math

import dp_accounting
import lightning.pytorch as pl
import pytest
import torch
from dp_accounting import rdp

from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.privacy import DPCallback, DPConfigurationError
from lit_dprl.stages.ppo import PPOModule
from lit_dprl.steering import steering_modules
from tests.test_rewards import save_tiny_classifier

REWARD = "tests.toy_modules:mean_char_code"
WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
    "great",
    "bad",
    "plot",
    "actor",
    "story",
    "scene",
    "good",
    "awful",
    "fun",
    "long",
]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(80):
        n = 2 + i % 4
        words = [WORDS[j] for j in torch.randint(len(WORDS), (n,), generator=g).tolist()]
        rows.append(json.dumps({"prompt": " ".join(words), "user_id": i}))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def make_data(prompt_file, batch_size=8):
    return PromptDataModule(tokenizer="tiny", source=prompt_file, batch_size=batch_size, max_val_prompts=8)


def make_module(**kwargs):
    defaults = dict(model="tiny", reward_function=REWARD, max_new_tokens=6, min_new_tokens=2)
    defaults.update(kwargs)
    return PPOModule(**defaults)


def make_trainer(tmp_path, callbacks=(), **kwargs):
    defaults = dict(
        accelerator="cpu",
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def first_batch(prompt_file, batch_size=8):
    data = make_data(prompt_file, batch_size)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.mark.parametrize("settings", [{}, {"advantage_estimator": "grpo", "samples_per_prompt": 3}])
def test_first_minibatch_ratio_is_one_and_kl_is_zero_at_init(prompt_file, settings):
    module = make_module(rollout_seed=0, **settings)
    rollout = module.rollout(first_batch(prompt_file))
    # fresh LoRA adapter (B = 0): the policy equals the reference; the sampling loop's log-probs are the old ones
    torch.testing.assert_close(rollout.logprobs, rollout.ref_logprobs, rtol=0, atol=1e-5)
    assert rollout.kl.abs().max() < 1e-5
    _, stats = module.minibatch_loss(rollout, torch.arange(rollout.responses.shape[0]))
    torch.testing.assert_close(stats["ratio"], torch.ones_like(stats["ratio"]), rtol=0, atol=1e-5)
    assert stats["approxkl"].abs().max() < 1e-9
    assert stats["clipfrac"].abs().max() == 0


def test_one_update_changes_adapter_and_value_head_only(prompt_file, tmp_path):
    torch.manual_seed(0)
    module = make_module(learning_rate=1e-2)
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("value_head" in n for n in trainable)
    make_trainer(tmp_path, max_steps=1).fit(module, make_data(prompt_file))
    params = dict(module.named_parameters())
    assert all(not torch.equal(params[n], before) for n, before in trainable.items() if "lora_A" not in n)
    assert all(torch.equal(params[n], before) for n, before in frozen.items())  # the reference body


def test_critic_free_estimators_have_no_value_head_and_need_groups():
    module = make_module(advantage_estimator="rloo", samples_per_prompt=2)
    assert module.value_head is None
    optimized = [p for group in module.configure_optimizers().param_groups for p in group["params"]]
    names = {id(p): n for n, p in module.named_parameters()}
    assert optimized and all("lora_" in names[id(p)] for p in optimized)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        make_module(advantage_estimator="grpo", samples_per_prompt=1)
    with pytest.raises(ValueError, match="one completion per prompt"):
        make_module(samples_per_prompt=4)
    with pytest.raises(ValueError, match="'gae', 'rloo' or 'grpo'"):
        make_module(advantage_estimator="ppo")


class RecordingPPO(PPOModule):
    """One optimizer step on the whole batch, recording the rollout, the parameters and Opacus's grad samples."""

    def training_step(self, batch, batch_idx):
        rollout = self.rollout(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        self.recorded = {"rollout": rollout, "params": {n: p.detach().clone() for n, p in trainable}}
        loss, _ = self.minibatch_loss(rollout, torch.arange(rollout.responses.shape[0]))
        self.manual_backward(loss)
        self.recorded["grad_sample"] = {n: p.grad_sample.detach().clone() for n, p in trainable}
        optimizer.step()


@pytest.mark.parametrize("settings", [{}, {"advantage_estimator": "grpo", "samples_per_prompt": 3}])
def test_opacus_per_example_gradients_equal_a_per_prompt_loop(prompt_file, tmp_path, settings):
    """Through DPCallback's hooks (σ = 0): LoRA + value head (gae), or LoRA alone with G = 3 completions packed
    per prompt (grpo), give one per-example gradient per prompt, equal to the gradient of that prompt's loss
    computed alone (a batch of one)."""
    torch.manual_seed(0)
    module = RecordingPPO(
        **(dict(model="tiny", reward_function=REWARD, max_new_tokens=6, min_new_tokens=2) | settings)
    )
    with torch.no_grad():  # non-zero LoRA B and value head, so every gradient is non-trivial
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    cb = DPCallback(noise_multiplier=0.0, max_grad_norm=1e6, accountant="rdp", sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path, [cb], max_steps=1).fit(module, make_data(prompt_file))
    recorded = module.recorded
    prompts = recorded["rollout"].responses.shape[0]
    assert all(g.shape[0] == prompts for g in recorded["grad_sample"].values())
    assert any("value_head" in n for n in recorded["grad_sample"]) == (module.value_head is not None)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in recorded["params"].items():
            params[name].copy_(value)
    for row in range(prompts):
        module.zero_grad()
        loss, _ = module.minibatch_loss(recorded["rollout"], torch.tensor([row]))
        loss.backward()
        for name, grad_sample in recorded["grad_sample"].items():
            # float32 sums in another order (batched vs one row) differ by up to ~3e-5; a gradient that mixed
            # rows or missed a row's scaling would be off by the size of the gradient itself (~1e-2)
            torch.testing.assert_close(grad_sample[row], params[name].grad, atol=5e-5, rtol=1e-3)


@pytest.mark.parametrize("epochs,minibatches", [(1, 1), (4, 1), (1, 4), (4, 4)])
def test_epsilon_matches_dp_accounting_for_reused_batches(prompt_file, tmp_path, epochs, minibatches):
    torch.manual_seed(0)
    module = make_module(ppo_epochs=epochs, num_mini_batches=minibatches, max_new_tokens=3)
    cb = DPCallback(noise_multiplier=1.2, accountant="rdp", sampling_seed=0, noise_seed=0)
    batches = 3
    make_trainer(tmp_path, [cb], max_steps=batches * epochs * minibatches).fit(module, make_data(prompt_file))
    report = json.loads((tmp_path / "privacy.json").read_text())
    assert report["steps"] == batches and report["optimizer_steps"] == batches * epochs * minibatches
    q = report["sample_rate"]
    event = dp_accounting.PoissonSampledDpEvent(
        q, dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(1.2)] * epochs)
    )
    independent = rdp.RdpAccountant().compose(event, batches).get_epsilon(report["delta"])
    assert report["epsilon"] == pytest.approx(independent, rel=0.02)


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"whiten_advantages": True}, "whiten_advantages"),
        ({"adaptive_kl": True}, "adaptive_kl"),
        ({"minibatch_assignment": "permutation", "num_mini_batches": 2}, "permutation"),
        ({"lora_dropout": 0.1}, "lora_dropout"),
    ],
)
def test_batch_statistics_are_refused_under_dp_and_allowed_without(prompt_file, tmp_path, setting, message):
    with pytest.raises(DPConfigurationError, match=message):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], max_steps=1).fit(
            make_module(**setting), make_data(prompt_file)
        )
    make_trainer(tmp_path, max_steps=2).fit(make_module(**setting), make_data(prompt_file))


def test_dp_ppo_with_a_dp_reward_model_from_stage_2(tmp_path, prompt_file):
    from lit_dprl.commands.fit import main

    rm_dir = tmp_path / "rm"
    main(["fit", "--config", "configs/tiny/reward.yaml", "--trainer.max_steps=2",
          f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.export_dir={rm_dir}"])  # fmt: skip
    assert (rm_dir / "privacy.json").is_file()
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    module = make_module(reward_function=None, reward_model=str(rm_dir))
    make_trainer(tmp_path, [cb], max_steps=2).fit(module, make_data(prompt_file))
    assert cb.steps == 2
    assert module.privacy_metadata()["inputs"]["reward_model"] == json.loads(
        (rm_dir / "privacy.json").read_text()
    )
    # a report of a non-private run on private data (ε = ∞) is refused, as is no report, unless declared public
    (rm_dir / "privacy.json").write_text(
        json.dumps({"epsilon": float("inf"), "differentially_private": False})
    )
    with pytest.raises(DPConfigurationError, match=r"reward_model was trained on private data without DP"):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], max_steps=1).fit(
            make_module(reward_function=None, reward_model=str(rm_dir)), make_data(prompt_file)
        )
    (rm_dir / "privacy.json").unlink()
    with pytest.raises(DPConfigurationError, match=r"privacy\.json"):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], max_steps=1).fit(
            make_module(reward_function=None, reward_model=str(rm_dir)), make_data(prompt_file)
        )
    public = make_module(reward_function=None, reward_model=str(rm_dir), reward_model_is_public=True)
    assert public.privacy_hazards() == []


@pytest.mark.parametrize(
    "report,declared_public,refused",
    [
        ({"epsilon": float("inf"), "differentially_private": False}, False, True),
        ({"epsilon": float("inf"), "differentially_private": False}, True, False),
        ({"epsilon": float("inf"), "differentially_private": False, "private_data": False}, False, False),
        ({"epsilon": 3.0, "delta": 1e-5}, False, False),
        (None, False, False),  # a classifier without a report is taken as public
    ],
)
def test_a_reward_classifier_trained_on_private_data_without_dp_is_refused(
    tmp_path, report, declared_public, refused
):
    directory = save_tiny_classifier(tmp_path / "classifier", num_labels=2)
    if report is not None:
        (tmp_path / "classifier" / "privacy.json").write_text(json.dumps(report))
    module = make_module(
        reward_function=None, reward_classifier=directory, reward_classifier_is_public=declared_public
    )
    assert (
        any("reward_classifier was trained on private data" in h for h in module.privacy_hazards()) == refused
    )
    metadata = module.privacy_metadata()
    assert metadata["inputs"] == {"model": None, "reward_classifier": report}
    assert metadata["declared_public"] == {"reward_classifier": declared_public}


def test_privacy_metadata_records_the_starting_policy_report(tmp_path):
    make_module().export(tmp_path / "sft")
    sft_report = {"epsilon": 2.5, "delta": 1e-6, "differentially_private": True}
    (tmp_path / "sft" / "privacy.json").write_text(json.dumps(sft_report))
    module = make_module(model=str(tmp_path / "sft"), advantage_estimator="rloo", samples_per_prompt=4)
    metadata = module.privacy_metadata()
    assert metadata["inputs"] == {"model": sft_report}
    assert (metadata["ppo_epochs"], metadata["num_mini_batches"]) == (1, 1)
    assert (metadata["advantage_estimator"], metadata["samples_per_prompt"]) == ("rloo", 4)
    assert metadata["secret_rollout_randomness"] and json.loads(json.dumps(metadata)) == metadata
    assert make_module(rollout_seed=3).privacy_metadata()["secret_rollout_randomness"] is False


def responses_in_call(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that would normalise across the batch: it returns how many responses it was given."""
    return [float(len(responses))] * len(responses)


def test_a_reward_function_sees_one_response_per_call(prompt_file):
    module = make_module(
        reward_function="tests.test_ppo:responses_in_call", advantage_estimator="grpo", samples_per_prompt=2
    )
    assert torch.equal(module.rollout(first_batch(prompt_file)).scores, torch.ones(8, 2))


def test_tiny_grpo_config_runs_through_the_cli(tmp_path):
    from lit_dprl.commands.fit import main

    main(["fit", "--config", "configs/tiny/grpo.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
          f"--model.init_args.export_dir={tmp_path / 'model'}", "--trainer.max_steps=2"])  # fmt: skip
    report = json.loads((tmp_path / "model" / "privacy.json").read_text())
    assert report["steps"] == 2 and report["epsilon"] > 0
    assert (tmp_path / "model" / "model.safetensors").is_file() and not (
        tmp_path / "model" / "value_head.pt"
    ).exists()


def test_exactly_one_reward_source():
    with pytest.raises(ValueError, match="exactly one reward source"):
        PPOModule(model="tiny")
    with pytest.raises(ValueError, match="exactly one reward source"):
        PPOModule(model="tiny", reward_function=REWARD, reward_classifier="/nonexistent")


def test_checkpoint_resume_restores_ppo_state_and_accountant(prompt_file, tmp_path):
    torch.manual_seed(0)
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    trainer = make_trainer(tmp_path, [cb], max_steps=2)
    module = make_module()
    trainer.fit(module, make_data(prompt_file))
    trainer.save_checkpoint(tmp_path / "ppo.ckpt")
    resumed_cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    resumed = make_module()
    make_trainer(tmp_path, [resumed_cb], max_steps=4).fit(
        resumed, make_data(prompt_file), ckpt_path=tmp_path / "ppo.ckpt"
    )
    assert resumed_cb.steps == 4
    assert resumed.episodes > module.episodes
    # the secret rollout seed and the batch counter come back: no rollout stream is reused after a resume
    assert resumed.rollout_seed == module.rollout_seed != make_module().rollout_seed
    assert (module.rollout_batches, resumed.rollout_batches) == (2, 4)
    straight = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path / "s", [straight], max_steps=4).fit(make_module(), make_data(prompt_file))
    assert resumed_cb.epsilon == pytest.approx(straight.epsilon, rel=1e-9)


def _learn(tmp_path, prompt_rows, callbacks, batch_size, steps, epochs, lr, **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "many_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompt_rows))
    data = PromptDataModule(tokenizer="tiny", source=str(prompts), batch_size=batch_size, max_val_prompts=64)
    pl.seed_everything(0)
    module = PPOModule(
        model="tiny",
        reward_function="lit_dprl.rewards:vowel_fraction",
        use_lora=False,
        learning_rate=lr,
        ppo_epochs=epochs,
        max_new_tokens=8,
        kl_coef=0.01,
        **settings,
    )
    trainer = make_trainer(tmp_path, callbacks, max_steps=steps * epochs, limit_val_batches=1)
    before = trainer.validate(module, data, verbose=False)[0]["eval/reward"]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["eval/reward"]
    return before, after


def test_ppo_raises_the_reward_without_and_with_dp(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [
        " ".join(WORDS[j] for j in torch.randint(len(WORDS), (3,), generator=g).tolist()) for _ in range(512)
    ]
    before, after = _learn(tmp_path / "plain", rows, [], batch_size=32, steps=12, epochs=2, lr=3e-3)
    print(f"non-private PPO: mean vowel-fraction reward {before:.3f} -> {after:.3f}")
    assert after > 3 * before
    dp = DPCallback(target_epsilon=50.0, max_grad_norm=0.1, sampling_seed=0, noise_seed=0)
    before_dp, after_dp = _learn(tmp_path / "dp", rows, [dp], batch_size=64, steps=20, epochs=1, lr=1e-2)
    print(f"DP-PPO (eps={dp.epsilon:.1f}): mean vowel-fraction reward {before_dp:.3f} -> {after_dp:.3f}")
    assert after_dp > 2 * before_dp
    assert dp.epsilon <= 50.0


def test_grpo_and_rloo_raise_the_reward_without_and_with_dp(tmp_path):
    """Critic-free, G = 4 completions per prompt, full fine-tuning of the tiny model on the vowel-fraction reward."""
    g = torch.Generator().manual_seed(0)
    rows = [
        " ".join(WORDS[j] for j in torch.randint(len(WORDS), (3,), generator=g).tolist()) for _ in range(512)
    ]
    settings = dict(samples_per_prompt=4, rollout_seed=0)
    before, after = _learn(
        tmp_path / "rloo", rows, [], batch_size=16, steps=6, epochs=1, lr=1e-2,
        advantage_estimator="rloo", kl_in_loss=True, **settings,
    )  # fmt: skip
    print(f"non-private RLOO (kl in loss): mean vowel-fraction reward {before:.3f} -> {after:.3f}")
    assert after > 5 * before
    dp = DPCallback(noise_multiplier=0.3, max_grad_norm=0.1, accountant="rdp", sampling_seed=0, noise_seed=0)
    before_dp, after_dp = _learn(
        tmp_path / "grpo", rows, [dp], batch_size=32, steps=16, epochs=1, lr=1e-2, advantage_estimator="grpo",
        **settings,
    )  # fmt: skip
    print(f"DP-GRPO (eps={dp.epsilon:.1f}): mean vowel-fraction reward {before_dp:.3f} -> {after_dp:.3f}")
    assert after_dp > 2 * before_dp


@pytest.mark.parametrize("direction", ["class_mean", "token_log_odds"])
def test_steering_coefficients_stay_within_their_bound(tmp_path, direction):
    from lit_dprl.commands.fit import main

    cli = main(["fit", "--config", "configs/tiny/grpo.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--model.init_args.export_dir={tmp_path / 'model'}", "--trainer.max_steps=1",
                "--model.init_args.steering_layers=[0, 1]", "--model.init_args.steering_examples=32",
                f"--model.init_args.steering_direction={direction}",
                "--model.init_args.learning_rate=0.5", "--model.init_args.steering_max_coefficient=0.2"])  # fmt: skip
    alphas = [m.alpha.item() for m in steering_modules(cli.model.policy)]
    assert all(abs(a) == pytest.approx(0.2) for a in alphas)  # Adam's first step moves each α by ~lr = 0.5
    report = json.loads((tmp_path / "model" / "privacy.json").read_text())
    assert "each within ±0.2" in report["stage"]["adapter"]
    described = {"class_mean": "class-mean directions", "token_log_odds": "token log-odds directions"}[
        direction
    ]
    assert described in report["stage"]["adapter"]


def test_steering_adapter_trains_only_public_direction_coefficients_under_dp(tmp_path):
    from transformers import AutoModelForCausalLM

    from lit_dprl.commands.fit import main

    cli = main(["fit", "--config", "configs/tiny/grpo.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--model.init_args.export_dir={tmp_path / 'model'}", "--trainer.max_steps=3",
                "--model.init_args.steering_layers=[0, 1]", "--model.init_args.steering_examples=32",
                "--model.init_args.learning_rate=0.5"])  # fmt: skip
    module = cli.model
    assert [p.numel() for p in module.parameters() if p.requires_grad] == [1, 1]
    alphas = [m.alpha.item() for m in steering_modules(module.policy)]
    assert all(a != 0.0 for a in alphas)  # the DP steps moved every coefficient
    logged = cli.trainer.logged_metrics
    assert [float(logged[f"steering/alpha_{layer}_0"]) for layer in (0, 1)] == pytest.approx(alphas)
    report = json.loads((tmp_path / "model" / "privacy.json").read_text())
    assert report["steps"] == 3 and math.isfinite(report["epsilon"])
    assert "steering" in report["stage"]["adapter"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # plain transformers, shift merged
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(
            exported(ids).logits, module.policy.cpu()(ids).logits, atol=1e-5, rtol=1e-5
        )


def test_prompts_longer_than_max_prompt_tokens_are_cut_with_a_warning(prompt_file):
    with pytest.raises(ValueError, match="max_prompt_tokens must be >= 1"):
        PromptDataModule(tokenizer="tiny", source=prompt_file, max_prompt_tokens=0)
    data = PromptDataModule(
        tokenizer="tiny", source=prompt_file, batch_size=8, max_val_prompts=8, max_prompt_tokens=4
    )
    with pytest.warns(
        UserWarning, match=r"\d+ of \d+ training prompts are longer than max_prompt_tokens=4 and were cut"
    ):
        data.setup("fit")
    assert max(len(row["input_ids"]) for row in data.train_set) == 4
