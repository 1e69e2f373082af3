"""torchrun / DDP / FSDP2 setup and teardown, rank-0 I/O, and the collectives the loop needs.

A run started by `torchrun --nproc_per_node=N -m trainrun ...` finds RANK/WORLD_SIZE/LOCAL_RANK in its
environment; everything else is automatic: the process group (nccl on GPU, gloo on CPU), the wrapper
(`trainer.parallel=ddp|fsdp2`), the data shard of each rank, rank-0 checkpoints and logs.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_slurm_env() -> None:
    """Under SLURM tasks launched by hydra-submitit-launcher (tasks_per_node > 1) there is no torchrun: submitit's
    helper turns the SLURM variables into RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in os.environ:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def env_info() -> DistInfo:
    """What torchrun (or SLURM via submitit) put in the environment (a plain process is rank 0 of 1)."""
    _export_slurm_env()
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init(device_type: str = "auto") -> DistInfo:
    """Join the process group once per process when launched by torchrun; returns this process's place."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_type != "cpu"
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any rank (all ranks agree to stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, parallel: str, info: DistInfo, device: torch.device, precision_dtype, sync_bn: bool):
    """DDP (default) or FSDP2 (`fully_shard`, with its mixed-precision policy) around the model."""
    if not info.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if parallel == "fsdp2":
        return _fully_shard(model, precision_dtype)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def _fully_shard(model: nn.Module, precision_dtype) -> nn.Module:
    """FSDP2: one unit per trainable child and one for the root, with the precision's MixedPrecisionPolicy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=precision_dtype, reduce_dtype=torch.float32) if precision_dtype \
        else MixedPrecisionPolicy()
    done = set()
    if precision_dtype is not None:
        # BatchNorm's CPU kernel refuses low-precision weights next to its fp32 running statistics
        # ("expected scalar type BFloat16 but found Float"), and the statistics want fp32 anyway: each norm layer
        # gets its own unit with fp32 parameters and inputs (the next unit casts its inputs back down).
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for norm in model.modules():
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and any(True for _ in norm.parameters()):
                fully_shard(norm, mp_policy=fp32)
                done.add(norm)
    for child in list(model.children()):
        if child not in done and any(p.requires_grad for p in child.parameters()):
            fully_shard(child, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def full_model_state(model: nn.Module, parallel: str) -> dict:
    """The whole model state dict without wrapper prefixes (FSDP2: gathered to full tensors on CPU)."""
    if parallel == "fsdp2" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def full_optimizer_state(model: nn.Module, optimizer, parallel: str) -> dict:
    if parallel == "fsdp2" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict, parallel: str) -> None:
    if parallel == "fsdp2" and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_sd, options=opts)
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
        return
    unwrap(model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def sharded_state(model: nn.Module, optimizer) -> tuple:
    """FSDP2: this rank's shards of the model and optimizer state (DTensors, parameter-name keys), nothing gathered:
    what checkpoint.format=sharded writes with torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))


def load_sharded_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    """The mirror of `sharded_state`: shards (as torch.distributed.checkpoint loaded them) into the FSDP2 model and
    its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=False))


def failure_line(error: BaseException, run_dir) -> str:
    """One line for an exception that ended this rank's run (rank 0 prints it; its traceback goes to a file).

    A rank that fails alone leaves its peers blocked in a collective until torchrun stops them, so each failing
    rank records its line in torchrun's key-value store and rank 0 reports the others' lines next to its own
    (its own error may only be the broken connection to a peer that failed first).
    """
    import time
    import traceback
    from pathlib import Path

    info = env_info()
    first = (str(error).strip().splitlines() or [""])[0][:300]
    line = f"rank {info.rank}: {type(error).__name__}: {first}"
    trace = Path(run_dir) / f"traceback_rank{info.rank}.txt"
    try:
        trace.write_text("".join(traceback.format_exception(error)))
        line += f" (traceback: {trace})"
    except OSError:
        pass
    store = _store()
    if store is None:
        return line
    if info.rank != 0:
        store.set(f"trainrun/failure/{info.rank}", line)
        for _ in range(30):  # up to 3 s for rank 0 to print it before torchrun stops everyone
            if store.check(["trainrun/failure/reported"]):
                break
            time.sleep(0.1)
        return line
    others = [store.get(k).decode() for r in range(1, info.world)
              if store.check([k := f"trainrun/failure/{r}"])]
    store.set("trainrun/failure/reported", "1")
    if others and (isinstance(error, dist.DistError) or "closed by peer" in first or "Connection reset" in first):
        return "; ".join(others)  # rank 0 only lost its connection to the rank that failed
    return "; ".join([line, *others])


def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except (RuntimeError, ValueError):
        return None


def teardown(exit_code: int = 0) -> None:
    """End a distributed process cleanly: barrier, destroy the group, flush, and exit without the atexit
    handlers that make gloo ranks abort at interpreter shutdown."""
    if dist.is_available() and dist.is_initialized():
        try:
            if exit_code == 0:
                dist.barrier()
        finally:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
