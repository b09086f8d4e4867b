"""
Sharded data parallelism (FSDP2): each of n processes keeps 1/n of the weights, gradients and optimizer state.

Under DDP every process holds the whole model and its AdamW state (3x the weights), so the largest model is what
fits one device. With `Trainer(parallel='fsdp')` under torchrun, PyTorch's `fully_shard` splits every parameter
across the processes, as torchtitan and nanochat do: each repeated block (every module of an nn.ModuleList) is
one unit, gathered just before it runs and freed after, and the root holds the rest (embeddings, head, final norm).
The gradient of a step is reduce-scattered: averaged over processes, as DDP's all-reduce averages, so the update is
the same.

Checkpoints do not change: rank 0 gathers the whole weights and the optimizer state into the plain form a
single process writes (optimizer state keyed by the parameter's index, as optimizer.state_dict() gives it), so a
file resumes under DDP, FSDP or one process, at any world size, and GPT.from_checkpoint reads it as ever.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")


def shard(model):
    """Make model's processes agree on rank 0's weights, then shard it in place: each block, then the root."""
    from torch.distributed.fsdp import fully_shard
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)  # fully_shard keeps each process's own slice: start from one model
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


@contextmanager
def no_gradient_sync(model):
    """Accumulate this micro-batch's gradient locally (FSDP's counterpart of DDP's no_sync)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


def full_state(model, optimizer):
    """(model state dict, optimizer state dict) whole, on rank 0 ({} elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    weights = get_model_state_dict(model, options=_full())
    by_name = get_optimizer_state_dict(model, optimizer, options=_full())
    if not by_name:
        return weights, {}
    index = _indices(by_name["param_groups"])
    return weights, {"state": {index[name]: state for name, state in by_name["state"].items()},
                     "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in by_name["param_groups"]]}


def load_full_state(model, optimizer, weights, optimizer_state):
    """Load whole state dicts (as full_state or a single process writes them) into the sharded model and optimizer;
    every process must call it with the same dicts."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=options)
    # the names of the optimizer's parameters in its order, which the saved indices count (rank 0 alone
    # receives the whole dict: it tells the others)
    groups = get_optimizer_state_dict(model, optimizer, options=_full()).get("param_groups", [])
    shared = [[n for g in groups for n in g["params"]]]
    dist.broadcast_object_list(shared, src=0)
    names = shared[0]
    by_name = {"state": {names[i]: state for i, state in optimizer_state["state"].items()},
               "param_groups": [dict(g, params=[names[i] for i in g["params"]]) for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def _indices(groups):
    """{parameter name: its index} in the order optimizer.state_dict() numbers parameters: group by group."""
    return {name: i for i, name in enumerate(n for g in groups for n in g["params"])}


def local_numel(tensors):
    """Elements this process stores of the given parameters or state tensors (a shard's, for sharded ones)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() for t in tensors if torch.is_tensor(t))
