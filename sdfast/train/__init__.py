"""sdfast's training module: fine-tuning (and, later, LoRA, textual inversion, DreamBooth and
ControlNet) on HF accelerate, with datasets described in kohya's TOML format.

    from sdfast.train import train_finetune
    result = train_finetune("model.safetensors", "data.toml", "out", "tuned",
                            max_train_steps=1000, learning_rate=1e-4)
    result.output      # out/tuned.safetensors

Command line: `sdfast train finetune ...` or `python -m sdfast.train finetune ...`.
"""
from .config import DataConfig, DatasetConfig, SubsetConfig, load_dataset_config
from .finetune import TrainResult, train_finetune

__all__ = ["train_finetune", "TrainResult", "load_dataset_config", "DataConfig", "DatasetConfig",
           "SubsetConfig"]
