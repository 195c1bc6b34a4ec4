"""The one training loop for surrogates, SEP checkpoints, MTL and STL victims (SPEC section 3)."""

from .config import TrainConfig
from .tasks import TaskView, select_tasks, victim_crop
from .victim import TrainResult, evaluate, train, train_stl

__all__ = ["TaskView", "TrainConfig", "TrainResult", "evaluate", "select_tasks", "train", "train_stl", "victim_crop"]
