"""Diagnostics: activation statistics (init report); the training doctor's checks grow here."""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn as nn


def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def activation_report(model: nn.Module, x: torch.Tensor) -> List[Dict]:
    """One row per call of a leaf module that returns a tensor, in forward order:
    {"layer": qualified name, "type": class name, "mean", "var" (population variance), "dead_frac" (share of
    exactly-zero outputs)}. Runs in eval mode under no_grad; every module's train/eval flag is restored and the
    hooks are removed afterwards. A module called more than once gets "#2", "#3", ... after its name."""
    rows: List[Dict] = []
    calls: Dict[str, int] = {}

    def make_hook(name: str):
        def hook(mod, inp, out):
            if not isinstance(out, torch.Tensor) or out.numel() == 0:
                return
            calls[name] = calls.get(name, 0) + 1
            o = out.detach()
            o = o.abs().double() if o.is_complex() else o.double()
            rows.append({
                "layer": name if calls[name] == 1 else f"{name}#{calls[name]}",
                "type": type(mod).__name__,
                "mean": float(o.mean()),
                "var": float(o.var(unbiased=False)),
                "dead_frac": float((o == 0).double().mean()),
            })
        return hook

    flags = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(make_hook(name or type(m).__name__))
               for name, m in model.named_modules() if _is_leaf(m)]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return rows


def _num(v: float) -> str:
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if v == 0:
        return "0"
    return f"{v:.3e}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}"


def render_activation_report(rows: List[Dict], console, title: str) -> None:
    """Print the rows as a rich table (every row, however deep the model)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("layer")
    table.add_column("type")
    table.add_column("mean", justify="right")
    table.add_column("var", justify="right")
    table.add_column("dead %", justify="right")
    for r in rows:
        table.add_row(r["layer"], r["type"], _num(r["mean"]), _num(r["var"]), f"{100 * r['dead_frac']:.1f}")
    console.print(table)


def lr_find(model: nn.Module, optimizer: torch.optim.Optimizer, batches, loss_fn: nn.Module, precision, device,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, smooth: float = 0.98,
            diverge: float = 4.0) -> Dict:
    """LR range test (Smith 2017): raise the LR exponentially from start_lr to end_lr, one optimizer step per
    batch, tracking an exponentially smoothed (bias-corrected) loss; stop once it exceeds `diverge` x its best.

    The model's and the optimizer's state are restored afterwards. Returns the curve and the suggested LR: the
    point of steepest descent of the smoothed loss against log(lr), taken before the minimum.
    """
    import copy
    import math

    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    ratio = (end_lr / start_lr) ** (1.0 / max(1, num_steps - 1))
    lrs, losses, avg, best = [], [], 0.0, math.inf
    was_training = model.training
    model.train()
    try:
        for i in range(num_steps):
            lr = start_lr * ratio ** i
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            x, y = next(batches)[:2]
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast():
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            precision.backward(loss)
            precision.step(optimizer, model.parameters(), clip_norm=None, clip_value=None, want_norm=False)
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            avg = smooth * avg + (1 - smooth) * value
            smoothed = avg / (1 - smooth ** (i + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                break
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        model.train(was_training)
    suggestion = None
    if len(losses) >= 3:
        stop = min(range(len(losses)), key=losses.__getitem__)
        logs = [math.log10(v) for v in lrs]
        slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(1, max(2, stop))]
        if slopes:
            suggestion = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    return {"lrs": lrs, "losses": losses, "suggested_lr": suggestion,
            "min_loss_lr": lrs[min(range(len(losses)), key=losses.__getitem__)] if losses else None}


def plot_lr_find(result: Dict, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result["lrs"], result["losses"], label="smoothed training loss")
    if result["suggested_lr"]:
        ax.axvline(result["suggested_lr"], color="tab:red", linestyle="--",
                   label=f"suggested lr {result['suggested_lr']:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("LR range test")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


# bytes of optimizer state per parameter element, for fp32 state (Adafactor is handled separately: factored)
_OPTIM_STATE_BYTES = {"adam": 8, "adamw": 8, "nadam": 8, "radam": 8, "adagrad": 4}


def optimizer_state_bytes(name: str, params, momentum: float = 0.0) -> int:
    """Optimizer state the step will allocate: Adam-family 2 fp32 moments (8 B/param), SGD a momentum buffer
    (4 B/param when momentum > 0), RMSprop the square average (4) plus a momentum buffer (4) when momentum > 0,
    AdaGrad the sum of squares (4), Adafactor a row and a column factor per matrix (4 * (rows + cols))."""
    total = 0
    for p in params:
        n = p.numel()
        if name in _OPTIM_STATE_BYTES:
            total += _OPTIM_STATE_BYTES[name] * n
        elif name == "sgd":
            total += 4 * n if momentum > 0 else 0
        elif name == "rmsprop":
            total += 4 * n + (4 * n if momentum > 0 else 0)
        elif name == "adafactor":
            total += 4 * (p.shape[-2] + p.shape[-1]) if p.ndim >= 2 else 4 * n
    return total


def memory_plan(model: nn.Module, optimizer_name: str, momentum: float, precision: str, shards: int = 1) -> Dict:
    """Bytes for weights, gradients, optimizer state and master copies before training starts, per rank.

    `shards`: the world size under FSDP2, which keeps 1/shards of the weights, gradients and optimizer state on
    each rank (the unsharded weights of one unit at a time are gathered for its forward/backward, on top).

    torch autocast (fp16/bf16) keeps the weights - the master copy - and their gradients in fp32 and casts to the
    low precision per operation, so weights 4 + grads 4 + optimizer state stay what fp32 needs: 16 B/param with
    Adam either way (the classic mixed-precision accounting, 2 + 2 + 4 master + 8, also gives 16, not 12).
    Activations come on top and depend on the batch; the measured peak after the first steps shows them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in params)
    state = optimizer_state_bytes(optimizer_name, params, momentum)
    weights, grads, state = weights / shards, grads / shards, state / shards
    total = weights + grads + state
    return {"params": n, "weights": weights, "grads": grads, "optimizer_state": state,
            "master_copy": "the fp32 weights themselves" if precision != "fp32" else "none (fp32)",
            "total": total, "bytes_per_param": total / max(1, n), "shards": shards}


def measured_peak_bytes(device: torch.device) -> Dict:
    """CUDA: max allocated since the start; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    import resource

    return {"kind": "cpu_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
