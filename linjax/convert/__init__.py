"""Llama weights: HF / PyTorch / safetensors / GGUF / linjax checkpoints <-> Flax NNX."""
from linjax.convert.checkpoint import (CheckpointMismatchError, UnsupportedExportError,
                                       from_pretrained, hf_state_dict, load_from_source,
                                       load_linjax, save_linjax, save_peft_adapter,
                                       save_pretrained)
from linjax.convert.sources import UnsupportedFormatError
from linjax.models.llama import UnsupportedConfigError

__all__ = ["from_pretrained", "save_pretrained", "save_peft_adapter", "save_linjax", "load_linjax",
           "hf_state_dict", "load_from_source", "CheckpointMismatchError",
           "UnsupportedExportError", "UnsupportedFormatError", "UnsupportedConfigError"]
