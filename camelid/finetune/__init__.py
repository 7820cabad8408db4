"""Adapting a pretrained model (`camelid finetune`): instruction data, full finetuning, LoRA and
QLoRA adapters, on the pretraining trainer."""
