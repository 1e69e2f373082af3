"""A run's report: one page (RUN/report.md and RUN/report.html) a person can look at instead of reading JSON.

The command's overrides, the final metrics (and the test split's, when `mode=test` measured it),
every plot of the run (curves, confusion matrix, reliability diagram), and the provenance of the newest checkpoint
(SHA256, commit, data fingerprint, starting weights). Written at the end of every training run with plots on, and by
`trainrun-report RUN`. Everything is read from the run's files, which are untrusted input: values are escaped into
the HTML and a missing or malformed file leaves its section out rather than failing.
"""
from __future__ import annotations

import html
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPORT_MD, REPORT_HTML = "report.md", "report.html"


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _newest_meta(run_dir: Path) -> Tuple[Optional[Path], Dict[str, Any]]:
    from trainrun import checkpoint

    for ckpt in reversed(checkpoint.list_checkpoints(run_dir)):
        meta = _read_json(ckpt / checkpoint.META)
        if meta is not None:
            return ckpt, meta
    return None, {}


def _overrides(meta: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(key, value) of what the command set on top of the defaults (recipes and groups included); the whole
    resolved config is RUN/config.yaml."""
    overrides = meta.get("overrides") if isinstance(meta.get("overrides"), list) else []
    return [tuple(str(o).partition("=")[::2]) for o in overrides if isinstance(o, str)]


def _metric_rows(meta: Dict[str, Any], test: Optional[Dict[str, Any]]) -> List[Tuple[str, str]]:
    rows = [(k, _fmt(v)) for k, v in (meta.get("metrics") or {}).items() if isinstance(k, str)]
    metrics = test.get("metrics") if test else None
    if isinstance(metrics, dict):
        rows += [(k if k.startswith("test") else f"test {k}", _fmt(v)) for k, v in metrics.items()]
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _provenance_rows(ckpt: Optional[Path], meta: Dict[str, Any]) -> List[Tuple[str, str]]:
    git = meta.get("git") if isinstance(meta.get("git"), dict) else {}
    data = meta.get("data") if isinstance(meta.get("data"), dict) else {}
    weights = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    rows = [("checkpoint", str(ckpt) if ckpt else "none"), ("step", str(meta.get("step", ""))),
            ("sha256 (state.pt)", str(meta.get("sha256", ""))),
            ("trainrun commit", f"{git.get('commit')}{' (dirty)' if git.get('dirty') else ''}"),
            ("data", str(data.get("description", ""))), ("data fingerprint", str(data.get("fingerprint", ""))),
            ("command", str(meta.get("command", ""))), ("torch", str(versions.get("torch", "")))]
    if weights:
        rows.append(("starting weights", f"{weights.get('source')} (sha256 {weights.get('sha256')})"))
    return rows


def collect(run_dir: Path) -> Dict[str, Any]:
    """Everything the report shows, read from the run directory."""
    run_dir = Path(run_dir)
    ckpt, meta = _newest_meta(run_dir)
    return {"run": run_dir.name, "config": _overrides(meta),
            "metrics": _metric_rows(meta, _read_json(run_dir / "test.json")),
            "plots": sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "plots").glob("*.png")),
            "provenance": _provenance_rows(ckpt, meta)}


def _md_table(rows: List[Tuple[str, str]], head: Tuple[str, str]) -> str:
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return "\n".join([f"| {head[0]} | {head[1]} |", "|---|---|", *(f"| {cell(k)} | {cell(v)} |" for k, v in rows)])


def markdown(report: Dict[str, Any]) -> str:
    parts = [f"# trainrun report: {report['run']}", "", "## Final metrics", "",
             _md_table(report["metrics"], ("metric", "value")) if report["metrics"] else "(no evaluation yet)", "",
             "## Config (the command's overrides; the whole config is config.yaml)", "",
             _md_table(report["config"], ("key", "value")) if report["config"] else "(the defaults)", "",
             "## Plots", ""]
    parts += [f"![{Path(p).stem}]({p})" for p in report["plots"]] or ["(no plots: logger.plots=false)"]
    parts += ["", "## Provenance", "", _md_table(report["provenance"], ("what", "value")), ""]
    return "\n".join(parts)


def _html_table(rows: List[Tuple[str, str]], head: Tuple[str, str]) -> str:
    e = html.escape
    body = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows)
    return f"<table><tr><th>{e(head[0])}</th><th>{e(head[1])}</th></tr>{body}</table>"


def to_html(report: Dict[str, Any]) -> str:
    e = html.escape
    plots = "".join(f'<figure><img src="{e(p)}" alt="{e(p)}"><figcaption>{e(Path(p).stem)}</figcaption></figure>'
                    for p in report["plots"]) or "<p>(no plots: logger.plots=false)</p>"
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:"
             "collapse;margin-bottom:1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
             "figure{display:inline-block;margin:0 1em 1em 0}img{max-width:520px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>trainrun report: {e(report['run'])}</title>"
            f"<style>{style}</style></head><body><h1>trainrun report: {e(report['run'])}</h1>"
            f"<h2>Final metrics</h2>{_html_table(report['metrics'], ('metric', 'value'))}"
            f"<h2>Config (the command's overrides; the whole config is config.yaml)</h2>{_html_table(report['config'], ('key', 'value'))}"
            f"<h2>Plots</h2>{plots}<h2>Provenance</h2>{_html_table(report['provenance'], ('what', 'value'))}"
            "</body></html>\n")


def write_report(run_dir: Path) -> List[Path]:
    """RUN/report.md and RUN/report.html, each written atomically."""
    run_dir = Path(run_dir)
    report = collect(run_dir)
    written = []
    for name, text in ((REPORT_MD, markdown(report)), (REPORT_HTML, to_html(report))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)
        written.append(run_dir / name)
    return written


def main(argv: Optional[List[str]] = None) -> None:
    """`trainrun-report RUN [RUN ...]`: write (or rewrite) each run's report."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: trainrun-report RUN_DIR [RUN_DIR ...]  (writes RUN_DIR/report.md and report.html)")
        raise SystemExit(0 if args else 2)
    for arg in args:
        run_dir = Path(arg)
        if not (run_dir / "checkpoints").is_dir():
            print(f"trainrun-report: error: {run_dir} is not a trainrun run directory (no checkpoints/); pass the "
                  "run's directory, e.g. runs/NAME", file=sys.stderr)
            raise SystemExit(2)
        for path in write_report(run_dir):
            print(path)


if __name__ == "__main__":
    main()
