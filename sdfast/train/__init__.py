"""sdfast's training module: fine-tuning, LoRA, textual inversion, DreamBooth and ControlNet on
HF accelerate, with datasets described in kohya's TOML format.

    from sdfast.train import train_finetune, train_lora
    result = train_lora("model.safetensors", "data.toml", "out", "style",
                        max_train_steps=1000, network_dim=8, network_alpha=4)
    result.output      # out/style.safetensors (a kohya LoRA)

Command line: `sdfast train METHOD ...` or `python -m sdfast.train METHOD ...`, METHOD one of
finetune, lora, textual-inversion, dreambooth, controlnet.
"""
from .config import DataConfig, DatasetConfig, SubsetConfig, load_dataset_config
from .engine import TrainResult
from .controlnet import train_controlnet
from .dreambooth import train_dreambooth
from .finetune import train_finetune
from .lora import train_lora
from .textual_inversion import train_textual_inversion

__all__ = ["train_finetune", "train_lora", "train_textual_inversion", "train_dreambooth",
           "train_controlnet", "TrainResult", "load_dataset_config", "DataConfig",
           "DatasetConfig", "SubsetConfig"]
