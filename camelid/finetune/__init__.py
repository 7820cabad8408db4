"""Adapting a trained model: instruction finetuning (issue 13)."""
