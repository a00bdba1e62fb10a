"""Fine-tuning: `config` (what to do), `trainer` (the loop: setup, train, checkpoints, validation, export),
`checkpoint` (the resumable files).

    from minidalle.training import TrainConfig, train
    result = train(TrainConfig(dataset_dir="my_images", output_dir="adapters/zorb"), on_progress=print)
"""

from minidalle.training.config import TrainConfig
from minidalle.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
