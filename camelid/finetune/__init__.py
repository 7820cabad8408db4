"""Adapting a model to instructions: finetuning, its data and its demo."""
