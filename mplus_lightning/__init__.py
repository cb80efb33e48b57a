"""mplus_lightning: train, evaluate and run M+ (MemoryLLM with long-term memory) with PyTorch Lightning."""
from .model import LongTermMemory, MemoryState, MPlus, MPlusConfig, tiny_config

__all__ = ["MPlus", "MPlusConfig", "MemoryState", "LongTermMemory", "tiny_config"]
__version__ = "0.1.0"
