"""Learning from feedback on the finetuning trainer: reward models, DPO, and RL (PPO, GRPO)."""
