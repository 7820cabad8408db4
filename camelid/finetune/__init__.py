"""Adapting a model to instructions: finetuning and its data."""
