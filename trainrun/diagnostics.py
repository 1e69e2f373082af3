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
