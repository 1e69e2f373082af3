"""Seeding every RNG, the determinism switch, and RNG state capture/restore.

RNG states are stored as plain ints and tensors so that checkpoints load with
`torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
import random
import warnings
from typing import Any, Dict

import numpy as np
import torch


def rank_seed(seed: int, rank: int = 0) -> int:
    return seed + rank


def seed_everything(seed: int, rank: int = 0) -> int:
    s = rank_seed(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)  # also seeds every CUDA device
    return s


def set_determinism(mode: str) -> None:
    """off: fastest kernels; warn: deterministic kernels, warn where none exists; error: raise there."""
    if mode == "off":
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True
        return
    # cuBLAS needs a fixed workspace to be deterministic; it must be set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    # The switch matters for CUDA kernels; setting it also imports torch._inductor (~1 s), so a CPU-only
    # process in `warn` mode skips it (CPU kernels are deterministic for a fixed thread count).
    if mode == "error" or torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=(mode == "warn"))
    if mode == "warn":
        warnings.filterwarnings("once", message=".*does not have a deterministic implementation.*")


def capture_rng_state() -> Dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"checkpoint has CUDA RNG state for {len(cuda_states)} devices, this machine has "
                          f"{torch.cuda.device_count()}: CUDA RNG restored only where devices match")
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


def data_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The shuffling order of an epoch is a pure function of (seed, epoch): resumable anywhere."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))
    return g
