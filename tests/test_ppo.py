"""Stage 3: PPO module invariants, DP neighbouring behaviour, accounting, refusals, resume."""

from __future__ import annotations

import json

import dp_accounting
import lightning.pytorch as pl
import pytest
import torch
from dp_accounting import rdp
from opacus.grad_sample import GradSampleHooks

from lit_dprl.data.prompts import PromptDataModule
from lit_dprl.privacy import DPCallback, DPConfigurationError
from lit_dprl.stages.ppo import PPOModule, minibatch_indices

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


def test_first_minibatch_ratio_is_one_and_kl_is_zero_at_init(prompt_file):
    torch.manual_seed(0)
    module = make_module()
    rollout = module.rollout(first_batch(prompt_file))
    # fresh LoRA adapter (B = 0): the policy equals the reference
    torch.testing.assert_close(rollout.logprobs, rollout.ref_logprobs, rtol=0, atol=1e-6)
    assert rollout.kl.abs().max() < 1e-6
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


def test_minibatch_assignment_independent_is_per_row():
    g = torch.Generator().manual_seed(0)
    parts = minibatch_indices(10, 4, "independent", g)
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    # the first 10 rows of a batch of 11 land where they landed in the batch of 10
    g11 = torch.Generator().manual_seed(0)
    parts11 = minibatch_indices(11, 4, "independent", g11)
    assign10 = {r: m for m, rows in enumerate(parts) for r in rows.tolist()}
    assign11 = {r: m for m, rows in enumerate(parts11) for r in rows.tolist()}
    assert all(assign11[r] == assign10[r] for r in range(10))


def per_example_grads(module, rollout):
    hooks = GradSampleHooks(module, loss_reduction="mean")
    try:
        module.zero_grad()
        for p in module.parameters():
            p.grad_sample = None
        loss, _ = module.minibatch_loss(rollout, torch.arange(rollout.responses.shape[0]))
        loss.backward()
        return torch.cat(
            [p.grad_sample.flatten(1) for p in module.parameters() if p.requires_grad], dim=1
        ).detach()
    finally:
        hooks.cleanup()


def test_changing_one_prompt_changes_only_its_per_example_gradient(prompt_file):
    torch.manual_seed(0)
    module = make_module(learning_rate=1e-2)
    with torch.no_grad():  # move away from the zero value head / zero LoRA B so all gradients are non-trivial
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = first_batch(prompt_file)
    neighbour = {k: v.clone() for k, v in batch.items()}
    row = 2
    valid = neighbour["attention_mask"][row].bool()
    neighbour["input_ids"][row, valid] = module.tokenizer("x" * int(valid.sum()), add_special_tokens=False)[
        "input_ids"
    ][0]
    torch.manual_seed(1)
    rollout_a = module.rollout(batch)
    torch.manual_seed(1)
    rollout_b = module.rollout(neighbour)
    grads_a, grads_b = per_example_grads(module, rollout_a), per_example_grads(module, rollout_b)
    others = [i for i in range(grads_a.shape[0]) if i != row]
    torch.testing.assert_close(grads_a[others], grads_b[others], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads_a[row], grads_b[row])


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
    ],
)
def test_batch_statistics_are_refused_under_dp_and_allowed_without(prompt_file, tmp_path, setting, message):
    with pytest.raises(DPConfigurationError, match=message):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], max_steps=1).fit(
            make_module(**setting), make_data(prompt_file)
        )
    make_trainer(tmp_path, max_steps=2).fit(make_module(**setting), make_data(prompt_file))


def test_dp_ppo_with_a_dp_reward_model_from_stage_2(tmp_path, prompt_file):
    from lit_dprl.cli import main

    rm_dir = tmp_path / "rm"
    main(["fit", "--config", "configs/tiny/reward.yaml", "--trainer.max_steps=2",
          f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.export_dir={rm_dir}"])  # fmt: skip
    assert (rm_dir / "privacy.json").is_file()
    cb = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    module = make_module(reward_function=None, reward_model=str(rm_dir))
    make_trainer(tmp_path, [cb], max_steps=2).fit(module, make_data(prompt_file))
    assert cb.steps == 2
    # the same directory without its privacy report is refused under DP unless declared public
    (rm_dir / "privacy.json").unlink()
    with pytest.raises(DPConfigurationError, match=r"privacy\.json"):
        make_trainer(tmp_path, [DPCallback(noise_multiplier=1.0)], max_steps=1).fit(
            make_module(reward_function=None, reward_model=str(rm_dir)), make_data(prompt_file)
        )
    public = make_module(reward_function=None, reward_model=str(rm_dir), reward_model_is_public=True)
    assert public.privacy_hazards() == []


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
    straight = DPCallback(noise_multiplier=1.0, sampling_seed=0, noise_seed=0)
    make_trainer(tmp_path / "s", [straight], max_steps=4).fit(make_module(), make_data(prompt_file))
    assert resumed_cb.epsilon == pytest.approx(straight.epsilon, rel=1e-9)


def _learn(tmp_path, prompt_rows, callbacks, batch_size, steps, epochs, lr):
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
