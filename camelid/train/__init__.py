"""Pretraining: the config schema, the paper's optimizer and schedule, the trainer."""

from camelid.train.config import TrainConfig, load_train_config
from camelid.train.trainer import Trainer

__all__ = ["TrainConfig", "Trainer", "load_train_config"]
