"""recipes/resnet50_bf16.yaml against torchvision's ResNet-50 V2 command, value by value: the command below is the
table's source (issue 16, from references/classification/train.py's README), the script's defaults fill in what it
does not name. Composed in-process, nothing trained; recipes/deit_tiny.yaml against DeiT's main.py defaults."""
import shlex

import pytest

from trainrun.optim import effective_lr
from trainrun.regularization import EMA, reference_ema_decay

COMMAND = """torchrun --nproc_per_node=8 train.py --model resnet50 --batch-size 128 --lr 0.5
--lr-scheduler cosineannealinglr --lr-warmup-epochs 5 --lr-warmup-method linear --auto-augment ta_wide --epochs 600
--random-erase 0.1 --weight-decay 0.00002 --norm-weight-decay 0.0 --label-smoothing 0.1 --mixup-alpha 0.2
--cutmix-alpha 1.0 --train-crop-size 176 --model-ema --val-resize-size 232 --ra-sampler --ra-reps 4"""

# train.py's argparse defaults for what the command leaves out (and presets.py's normalisation / crop / flip)
DEFAULTS = {"--momentum": "0.9", "--lr-warmup-decay": "0.01", "--model-ema-steps": "32",
            "--model-ema-decay": "0.99998", "--val-crop-size": "224", "--interpolation": "bilinear", "--opt": "sgd"}

# reference flag -> (trainrun key, how the flag's value reads as that key's value)
TABLE = {
    "--model": ("model.name", str),
    "--batch-size": ("data.batch_size", int),
    "--lr": ("optimizer.lr", float),
    "--lr-scheduler": ("schedule.name", {"cosineannealinglr": "warmup_cosine"}.get),
    "--lr-warmup-epochs": ("schedule.warmup_epochs", float),
    "--lr-warmup-decay": ("schedule.warmup_start_factor", float),
    "--auto-augment": ("data.policy", {"ta_wide": "trivialaugment"}.get),
    "--epochs": ("trainer.epochs", int),
    "--random-erase": ("regularization.random_erasing", float),
    "--weight-decay": ("optimizer.weight_decay", float),
    "--norm-weight-decay": ("optimizer.no_decay_norm_bias", lambda v: float(v) == 0.0),
    "--label-smoothing": ("regularization.label_smoothing", float),
    "--mixup-alpha": ("regularization.mixup_alpha", float),
    "--cutmix-alpha": ("regularization.cutmix_alpha", float),
    "--train-crop-size": ("data.train_crop_size", int),
    "--val-resize-size": ("data.val_resize_size", int),
    "--val-crop-size": ("data.val_crop_size", int),
    "--interpolation": ("data.interpolation", str),
    "--ra-reps": ("data.ra_reps", int),
    "--momentum": ("optimizer.momentum", float),
    "--model-ema-steps": ("regularization.ema_every", int),
    "--model-ema-decay": ("regularization.ema_decay", float),
    "--opt": ("optimizer.name", str),
}
SWITCHES = {"--model-ema": ("regularization.ema_adjust", "reference"), "--ra-sampler": ("data.ra_reps", 4),
            "--lr-warmup-method": ("schedule.warmup_start_factor", 0.01)}  # linear: trainrun's warmup is linear
# presets.py / train.py constants: the same in every torchvision classification recipe
FIXED = {"data.mean": [0.485, 0.456, 0.406], "data.std": [0.229, 0.224, 0.225], "data.crop_scale": [0.08, 1.0],
         "data.crop_ratio": [0.75, 4 / 3], "data.augment": True, "schedule.min_lr_ratio": 0.0,
         "regularization.mix_prob": 1.0, "regularization.switch_prob": 0.5, "optimizer.nesterov": False,
         "model.small_input": False, "regularization.ema_warmup": False, "optimizer.reference_batch_size": 1024,
         "optimizer.scale_lr_with_batch": True, "precision.name": "bf16"}


def parse(command: str):
    """--flag value pairs and bare --switches of the reference command."""
    words = shlex.split(command)[3:]
    flags, switches = {}, set()
    for i, word in enumerate(words):
        if not word.startswith("--"):
            continue
        if i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[word] = words[i + 1]
        else:
            switches.add(word)
    return flags, switches


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="recipe_reference"):
        return hydra_compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def recipe(monkeypatch_module):
    monkeypatch_module.setenv("WORLD_SIZE", "8")  # the reference's 8 GPUs: trainer.accumulation_steps resolves to 1
    cfg = compose(["+recipe=resnet50_bf16"])
    from trainrun.config import validate

    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_every_flag_of_the_command_has_a_row_and_the_recipe_holds_its_value(recipe):
    from omegaconf import OmegaConf

    flags, switches = parse(COMMAND)
    assert set(flags) | set(DEFAULTS) <= set(TABLE) | {"--lr-warmup-method"}, "a flag without a row"
    assert switches <= set(SWITCHES)
    for flag, value in {**DEFAULTS, **flags}.items():
        if flag == "--lr-warmup-method":
            assert value == "linear"
            continue
        key, read = TABLE[flag]
        assert OmegaConf.select(recipe, key) == read(value), (flag, key)
    for flag in switches | {"--lr-warmup-method"}:
        key, value = SWITCHES[flag]
        assert OmegaConf.select(recipe, key) == value, (flag, key)
    for key, value in FIXED.items():
        assert OmegaConf.select(recipe, key) == pytest.approx(value), key


def test_global_batch_is_1024_via_accumulation_and_the_lr_scales_otherwise(recipe, monkeypatch):
    """The resolver reads the world size when the key is read (torchrun sets WORLD_SIZE before trainrun composes)."""
    for world, accumulation in ((8, 1), (1, 8), (2, 4), (3, 3)):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        assert recipe.trainer.accumulation_steps == accumulation
        global_batch = world * recipe.data.batch_size * recipe.trainer.accumulation_steps
        if world != 3:
            assert global_batch == 1024 and effective_lr(recipe.optimizer, global_batch) == 0.5
        else:  # 3 x 128 x 3 = 1152: the LR follows linearly
            assert effective_lr(recipe.optimizer, global_batch) == pytest.approx(0.5 * 1152 / 1024)


def test_the_ema_and_warmup_are_the_references(recipe):
    """EMA decay after the reference's adjustment (8 x 128 x 32 / 600) and the warmup's first LR factor."""
    import torch

    from trainrun.schedule import Schedule

    flags, _ = parse(COMMAND)
    adjust = 8 * int(flags["--batch-size"]) * int(DEFAULTS["--model-ema-steps"]) / int(flags["--epochs"])
    expected = 1.0 - min(1.0, (1.0 - float(DEFAULTS["--model-ema-decay"])) * adjust)
    assert reference_ema_decay(0.99998, 1024, 32, 600.0) == expected
    ema = EMA.from_config(torch.nn.Linear(2, 2), recipe.regularization, 1024, 600.0, warmup_steps=5 * 1251)
    assert ema.decay == expected and ema.every == 32 and ema.reference_warmup_steps == 5 * 1251
    schedule = Schedule(recipe.schedule, total_steps=600 * 1251, steps_per_epoch=1251)
    assert schedule.warmup == 5 * 1251 and schedule.multiplier(0) == 0.01 and schedule.multiplier(5 * 1251) == 1.0
    assert schedule.multiplier(600 * 1251) == 0.0


DEIT = {  # facebookresearch/deit main.py defaults and its README's deit_tiny command (4 x --batch-size 256)
    "optimizer.name": "adamw", "optimizer.lr": 5e-4, "optimizer.reference_batch_size": 512,
    "optimizer.weight_decay": 0.05, "trainer.epochs": 300, "schedule.warmup_epochs": 5,
    "schedule.name": "warmup_cosine", "schedule.warmup_start_factor": 1e-6 / 1e-3, "schedule.min_lr_ratio": 1e-5 / 1e-3,
    "regularization.label_smoothing": 0.1, "data.policy": "randaugment", "data.randaugment_magnitude": 9,
    "data.randaugment_num_ops": 2, "regularization.mixup_alpha": 0.8, "regularization.cutmix_alpha": 1.0,
    "regularization.switch_prob": 0.5, "regularization.random_erasing": 0.25, "regularization.stochastic_depth": 0.1,
    "data.ra_reps": 3, "regularization.ema_decay": 0.99996, "regularization.ema_warmup": False,
    "data.interpolation": "bicubic", "data.val_resize_size": 256, "data.val_crop_size": 224,
    "data.train_crop_size": 224, "model.patch_size": 16, "model.width": 192, "model.layers": 12, "model.heads": 3,
    "model.mlp_ratio": 4.0, "data.batch_size": 256,
}


def test_deit_tiny_holds_deits_settings(monkeypatch):
    from omegaconf import OmegaConf

    from trainrun.config import validate

    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = compose(["+recipe=deit_tiny"])
    validate(cfg)
    for key, value in DEIT.items():
        assert OmegaConf.select(cfg, key) == pytest.approx(value), key
    assert cfg.trainer.accumulation_steps == 1
    assert effective_lr(cfg.optimizer, 4 * 256) == pytest.approx(1e-3)
