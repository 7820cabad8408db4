"""Learning from feedback on the finetuning trainer: preference data, reward models, DPO, and RL
(PPO, GRPO).

    camelid finetune recipes/quickstart-reward.toml      # model.objective = "reward"
    camelid finetune recipes/quickstart-dpo.toml         # model.objective = "dpo"
    camelid finetune recipes/quickstart-ppo.toml         # model.objective = "ppo" (or grpo)

camelid.align.preference reads and renders preference pairs; camelid.align.losses and
camelid.align.rl hold the losses as pure functions; camelid.align.pairwise (RewardTrainer),
camelid.align.dpo (DPOTrainer) and camelid.align.ppo (PPOTrainer) train on the finetuning
trainer; camelid.align.reward_model scores. See docs/alignment.md.
"""
