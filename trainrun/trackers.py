"""Experiment trackers beside the console and metrics.jsonl: TensorBoard and MLflow (W&B stays in RunLogger).

`logger.backends=[tensorboard,mlflow]` (or `logger=tensorboard` / `logger=mlflow`) adds them; each is imported only
when chosen and is an optional extra. Every tracker gets the same rows metrics.jsonl gets, at trainrun's global
optimizer step, the final metrics, and the SHA256 of every checkpoint written. A resumed run continues the same
tracker run: TensorBoard appends to RUN/tensorboard (the event files of steps after the checkpoint are superseded
by the rows written again), MLflow reopens the run whose id the checkpoint's meta.json recorded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from trainrun.errors import ConfigError

BACKENDS = ("wandb", "tensorboard", "mlflow")
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # backend -> the pip extra that installs it


def active(cfg) -> List[str]:
    """The trackers a logger section asks for: logger.name (unless console) plus logger.backends, in that order."""
    chosen = ([cfg.name] if cfg.name != "console" else []) + list(cfg.get("backends") or [])
    return list(dict.fromkeys(chosen))


def _numbers(metrics: Dict[str, Any]) -> Dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardTracker:
    """Scalars into RUN/tensorboard through torch's SummaryWriter (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, run_dir: Path, config: Dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("logger.backends=[tensorboard] needs the tensorboard package: pip install "
                              "'trainrun[tensorboard]'") from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "```\n" + _yaml(config) + "\n```", 0)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(key, value, step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        self.writer.add_text("final", "\n".join(f"{k}: {v}" for k, v in metrics.items()), 0)
        self.writer.flush()

    def checkpoint(self, step: int, sha256: str) -> None:
        self.writer.add_text("checkpoint_sha256", f"step {step}: {sha256}", step)

    def close(self, exit_code: int) -> None:
        self.writer.close()


class MLflowTracker:
    """An MLflow run in a real local tracking store (default: sqlite at OUTPUT_ROOT/mlflow.db; `logger.mlflow_uri`
    for another): the resolved config as params, metrics by step, each checkpoint's SHA256 as a tag. `run_id` from a
    checkpoint's meta.json continues the same MLflow run."""

    def __init__(self, cfg, run_dir: Path, config: Dict[str, Any], run_id: Optional[str]):
        try:
            import mlflow
        except ImportError as e:
            raise ConfigError("logger.backends=[mlflow] needs mlflow: pip install 'trainrun[mlflow]'") from e
        self.mlflow = mlflow
        mlflow.set_tracking_uri(cfg.mlflow_uri or f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}")
        experiment = mlflow.set_experiment(cfg.mlflow_experiment)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else Path(run_dir).name,
                                    experiment_id=experiment.experiment_id)
        self.run_id = self.run.info.run_id
        if run_id is None:
            params = _flat(config)
            for start in range(0, len(params), 100):  # the store takes at most 100 params per call
                mlflow.log_params(dict(list(params.items())[start:start + 100]))
            mlflow.set_tag("trainrun.run_dir", str(Path(run_dir).resolve()))

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        values = _numbers(metrics)
        if values:
            self.mlflow.log_metrics(values, step=step)

    def summary(self, metrics: Dict[str, Any]) -> None:
        self.mlflow.set_tags({f"final.{k}": str(v) for k, v in metrics.items()})

    def checkpoint(self, step: int, sha256: str) -> None:
        self.mlflow.set_tags({"checkpoint_sha256": sha256, "checkpoint_step": str(step)})

    def close(self, exit_code: int) -> None:
        self.mlflow.end_run(status="FINISHED" if exit_code == 0 else "FAILED")


def open_trackers(cfg, run_dir: Path, config: Dict[str, Any], ids: Dict[str, Optional[str]]) -> List[Any]:
    """The TensorBoard / MLflow trackers the logger section chose (W&B is RunLogger's own)."""
    trackers: List[Any] = []
    for name in active(cfg):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir, config))
        elif name == "mlflow":
            trackers.append(MLflowTracker(cfg, run_dir, config, ids.get("mlflow_run_id")))
    return trackers


def _flat(config: Dict[str, Any]) -> Dict[str, str]:
    from trainrun.resume import _flatten

    return {k: str(v)[:500] for k, v in _flatten(config).items()}  # MLflow caps a param value's length


def _yaml(config: Dict[str, Any]) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(config))

