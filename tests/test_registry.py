"""The open registry: unit tests, the validator's names derived from the registries, and an optimizer and a schedule
added by one registration each and trained in-process."""
import json
import math
import re

import pytest
import torch

from trainrun.errors import ConfigError
from trainrun.registry import Registry


def test_register_get_names_describe():
    registry = Registry("widget.name")
    registry.register("plain", int, doc="an int")

    @registry.register("decorated")
    def decorated():
        """First line of the doc.

        More detail."""

    assert registry.get("plain") is int and registry.get("decorated") is decorated
    assert registry.names() == ["plain", "decorated"]  # registration order
    assert registry.describe() == {"plain": "an int", "decorated": "First line of the doc."}
    assert "plain" in registry and "other" not in registry and list(registry) == ["plain", "decorated"]
    assert len(registry) == 2


def test_unknown_name_is_one_config_error_line_listing_the_names():
    registry = Registry("widget.name")
    registry.register("a", 1)
    registry.register("b", 2)
    with pytest.raises(ConfigError) as e:
        registry.get("c")
    assert str(e.value) == "widget.name='c': must be one of a, b"


def test_duplicate_name_is_refused_at_registration():
    registry = Registry("widget.name")
    registry.register("a", 1)
    with pytest.raises(ValueError, match=r"widget.name='a' is already registered"):
        registry.register("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(lambda: None)
    assert registry.get("a") == 1
    with pytest.raises(ValueError, match="non-empty string"):
        registry.register("", 3)


def test_builtin_registries_refuse_a_second_registration_of_a_builtin():
    from trainrun.models import MODELS
    from trainrun.optim import OPTIMIZERS
    from trainrun.schedule import SCHEDULES

    for registry, name in ((MODELS, "mlp"), (OPTIMIZERS, "adamw"), (SCHEDULES, "constant")):
        with pytest.raises(ValueError, match="already registered"):
            registry.register(name, object())


def _compose(overrides=()):
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="t"):
        return compose("config", overrides=list(overrides))


def _accepted_names(key):
    """The names `validate` lists when `key` holds a name no registry has."""
    from trainrun.config import validate

    with pytest.raises(ConfigError) as e:
        validate(_compose([f"{key}=no_such_name"]))
    match = re.fullmatch(rf"{re.escape(key)}='no_such_name': must be one of (.*)", str(e.value))
    assert match, str(e.value)
    return match.group(1).split(", ")


def test_the_validator_accepts_exactly_the_registered_names():
    from trainrun.data.datasets import DATASETS
    from trainrun.models import MODELS
    from trainrun.optim import OPTIMIZERS
    from trainrun.schedule import SCHEDULES

    assert _accepted_names("optimizer.name") == OPTIMIZERS.names()
    assert _accepted_names("schedule.name") == SCHEDULES.names()
    assert _accepted_names("data.name") == DATASETS.names()
    assert _accepted_names("model.name") == sorted(MODELS.names())
    # every YAML option of these groups selects a registered name
    from trainrun.cli import CONFIGS_DIR
    from omegaconf import OmegaConf

    for group, registry in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("data", DATASETS),
                            ("model", MODELS)):
        for path in (CONFIGS_DIR / group).glob("*.yaml"):
            assert OmegaConf.load(path).name in registry, path


class SignDescent(torch.optim.Optimizer):
    """p <- p - lr * sign(grad): a rule torch does not ship, to add through the registry."""

    steps = 0

    def __init__(self, params, lr, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        type(self).steps += 1
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


@pytest.fixture
def registries(monkeypatch):
    """The optimizer and schedule registries, restored after the test (registration is global)."""
    from trainrun.optim import OPTIMIZERS
    from trainrun.schedule import SCHEDULES

    for registry in (OPTIMIZERS, SCHEDULES):
        monkeypatch.setattr(registry, "_objects", dict(registry._objects))
        monkeypatch.setattr(registry, "_docs", dict(registry._docs))
    return OPTIMIZERS, SCHEDULES


def test_sign_descent_follows_its_formula(registries):
    from omegaconf import OmegaConf

    from trainrun.config import OptimizerConfig
    from trainrun.optim import build_optimizer, register_optimizer

    register_optimizer("sign_descent", SignDescent, lambda cfg: {}, "sign descent")
    layer = torch.nn.Linear(3, 1, bias=False)
    start = layer.weight.detach().clone()
    cfg = OmegaConf.structured(OptimizerConfig(name="sign_descent", lr=0.5))
    optimizer = build_optimizer(layer, cfg, global_batch=1)
    assert isinstance(optimizer, SignDescent) and optimizer.param_groups[0]["base_lr"] == 0.5
    layer(torch.tensor([[1.0, -2.0, 0.0]])).sum().backward()
    optimizer.step()
    assert torch.equal(layer.weight, start - 0.5 * torch.tensor([[1.0, -1.0, 0.0]]))


def test_an_optimizer_and_a_schedule_added_by_registration_train(registries, tmp_path):
    from trainrun.optim import register_optimizer
    from trainrun.runner import run
    from trainrun.schedule import SCHEDULES, after_linear_warmup

    optimizers, schedules = registries
    register_optimizer("sign_descent", SignDescent, lambda cfg: {}, "sign descent")
    seen_steps = []

    @SCHEDULES.register("halving")
    @after_linear_warmup
    def halving(schedule, t):
        """the LR halves every optimizer step"""
        seen_steps.append(t)
        return 0.5 ** t

    assert "sign_descent" in optimizers.names() and schedules.describe()["halving"] == "the LR halves every " \
                                                                                        "optimizer step"
    cfg = _compose(["optimizer.name=sign_descent", "optimizer.lr=0.01", "schedule.name=halving",
                    "schedule.warmup_steps=0", "data=synthetic", "data.num_samples=64", "data.batch_size=16",
                    "model=mlp", "trainer.max_steps=3", "trainer.device=cpu", "logger.progress=off",
                    "logger.plots=false", "logger.log_every=1", f"output_root={tmp_path}", "run_name=r"])
    SignDescent.steps = 0
    (tmp_path / "r").mkdir()
    run(cfg, tmp_path / "r")
    assert SignDescent.steps == 3
    assert {0, 1, 2} <= set(seen_steps)
    lines = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = {line["step"]: line["lr"] for line in lines if "lr" in line}
    assert sorted(lrs) == [1, 2, 3]  # the LR logged after step s is the one the halving schedule gives step s
    assert all(math.isclose(lr, 0.01 * 0.5 ** step) for step, lr in lrs.items()), lrs
