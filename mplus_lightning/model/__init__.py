"""The M+ model in plain torch + transformers + peft (never imports lightning)."""
from .configuration import MPlusConfig, tiny_config
from .memory import LongTermMemory, MemoryState
from .mplus import MPlus

__all__ = ["MPlus", "MPlusConfig", "MemoryState", "LongTermMemory", "tiny_config"]
