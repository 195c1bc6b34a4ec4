"""The one training loop for surrogates, SEP checkpoints, MTL and STL victims (docs/method.md section 3)."""

from .settings import TrainConfig
from .tasks import TaskView, select_tasks, victim_crop
from .victim import TrainResult, TrainStep, Training, build_training, evaluate, load_model, make_batches, train, train_epoch, train_stl

__all__ = [
    "TaskView", "TrainConfig", "TrainResult", "TrainStep", "Training", "build_training", "evaluate", "load_model",
    "make_batches",
    "select_tasks", "train", "train_epoch", "train_stl", "victim_crop",
]  # fmt: skip
