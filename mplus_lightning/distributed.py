"""Sharding: FSDP2 through Lightning's ModelParallelStrategy.

`fully_shard` goes on each decoder layer (its LoRA adapters, BOS vector and retriever live inside it, so they are
gathered together when the layer runs, memory K/V and retrieval included) and then on the root. The same code runs
on CPU with gloo (tests) and on multi-A100 nodes with NCCL. Memory state is per rank and never sharded.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

from .config import RunConfig


def build_strategy(cfg: RunConfig):
    t = cfg.trainer
    if t.strategy == "auto":
        return "auto"
    if t.strategy == "ddp":
        # Step kinds use different parts (a single-chunk step never runs the read adapter or the retriever).
        return DDPStrategy(find_unused_parameters=True)
    return ModelParallelStrategy(data_parallel_size=t.devices * t.num_nodes, tensor_parallel_size=1,
                                 save_distributed_checkpoint=True)


def checkpoint_layers(model) -> None:
    """Wrap each decoder layer for activation checkpointing (non-reentrant; state-dict keys are unchanged)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.llama.model.layers
    for i in range(len(layers)):
        layers[i] = checkpoint_wrapper(layers[i])


def shard_backbone(model, mesh, *, param_dtype: torch.dtype | None = None,
                   reduce_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False) -> int:
    """fully_shard every decoder layer, then the root, whose training entry points (`MPlus.TRAINING_ENTRY_POINTS`)
    then gather and free the root's shards like a forward. Returns the number of layers sharded; raises if none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from .model.mplus import MemoryDecoderLayer

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if activation_checkpointing:
        checkpoint_layers(model)
    sharded = 0
    for layer in model.llama.model.layers:
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        if isinstance(inner, MemoryDecoderLayer):
            fully_shard(layer, mesh=mesh, mp_policy=mp)
            sharded += 1
    if sharded == 0:
        raise RuntimeError("shard_backbone: no MemoryDecoderLayer found to shard")
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for name in model.TRAINING_ENTRY_POINTS:
        register_fsdp_forward_method(model, name)
    return sharded


def full_state_dict(trainer, model) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on CPU, on rank 0 (other ranks get an empty dict under FSDP2)."""
    if isinstance(trainer.strategy, ModelParallelStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.replace("._checkpoint_wrapped_module", ""): v for k, v in state.items()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
