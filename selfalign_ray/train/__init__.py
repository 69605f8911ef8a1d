"""SimPO (and SFT) training on Ray Train with DeepSpeed ZeRO-3."""

from selfalign_ray.train.config import TrainConfig
from selfalign_ray.train.simpo import simpo_loss
from selfalign_ray.train.trainer import TrainResult, remove_checkpoints, train_model

__all__ = ["TrainConfig", "TrainResult", "remove_checkpoints", "simpo_loss", "train_model"]
