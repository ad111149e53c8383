"""Stage 3: policy optimisation on private prompts (PPO, RLOO, GRPO). ``PPOModule`` (``module.py``) is the
LightningModule; ``policy.py`` builds the policy, its reference and the reward; ``settings.py`` checks the
hyperparameters and declares what they mean for privacy. ``class_path: lit_dprl.stages.ppo.PPOModule`` names it."""

from lit_dprl.stages.ppo.module import PPOModule

__all__ = ["PPOModule"]

PPOModule.__module__ = __name__  # reports, configs and checkpoints name it by its public path
