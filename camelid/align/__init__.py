"""Learning from feedback: preference data, reward models, DPO (and, beside them, RLHF).

    camelid finetune recipes/quickstart-reward.toml      # model.objective = "reward"
    camelid finetune recipes/quickstart-dpo.toml         # model.objective = "dpo"

camelid.align.preference reads and renders preference pairs; camelid.align.losses holds the
losses as pure functions; camelid.align.pairwise (RewardTrainer) and camelid.align.dpo
(DPOTrainer) train on the finetuning trainer. See docs/alignment.md.
"""
