"""The user's own config directory (`trainrun --config-dir DIR`, `hydra.searchpath`): its options compose, are
checked before compute like trainrun's own, and are listed. Through the real CLI, stopped before training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from trainrun.cli import (check_not_shadowed, searchpath_override, split_config_dir, user_search_path)
from trainrun.errors import ConfigError

QUIET = ["logger.progress=off", "logger.plots=false"]


@pytest.fixture
def user_dir(tmp_path):
    """tmp_path/myconfigs with a model option (a built-in model at other sizes), a recipe that selects it, and a
    model option holding a bad value."""
    root = tmp_path / "myconfigs"
    (root / "model").mkdir(parents=True)
    (root / "recipe").mkdir()
    (root / "model" / "wide.yaml").write_text("# One wide hidden layer\nname: mlp\nhidden_sizes: [512]\n")
    (root / "model" / "broken.yaml").write_text("name: mlp\nhidden_sizes: [64]\ndropout: 1.5\n")
    (root / "model" / "unet.yaml").write_text("# A U-Net of my own\n_target_: mypkg.nets.UNet\nwidth: 16\n")
    (root / "recipe" / "mine.yaml").write_text("# @package _global_\n# My recipe: the wide MLP with tanh\ndefaults:\n"
                                               "  - override /model: wide\n  - _self_\nmodel:\n  activation: tanh\n")
    return root


def one_error_line(p) -> str:
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainrun: error: "), p.stderr[-2000:]
    return lines[0][len("trainrun: error: "):]


def layer_types(run_root: Path):
    reports = list(run_root.glob("*/init_report.json"))
    assert len(reports) == 1, reports
    return [row["type"] for row in json.loads(reports[0].read_text())]


def list_command(cwd: Path, function: str, *args: str):
    code = f"from trainrun.cli import {function}; {function}()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250"})


# ---- through the CLI ---------------------------------------------------------------------------------------------

def test_user_model_option_composes_and_runs_init_report(tmp_path, user_dir):
    run_cli(tmp_path, "--config-dir", "myconfigs", "model=wide", "mode=init_report", *QUIET)
    assert layer_types(tmp_path / "runs") == ["Flatten", "Linear", "ReLU", "Linear"]  # one hidden layer: wide's


def test_user_recipe_from_the_config_dir(tmp_path, user_dir):
    run_cli(tmp_path, f"-cd={user_dir}", "+recipe=mine", "mode=init_report", *QUIET)
    assert layer_types(tmp_path / "runs") == ["Flatten", "Linear", "Tanh", "Linear"]


@pytest.mark.parametrize("how", [["--config-dir", "myconfigs"], ["hydra.searchpath=[file://myconfigs]", "-m"]])
def test_bad_value_in_a_user_option_fails_in_one_line_before_compute(tmp_path, user_dir, how):
    p = run_cli(tmp_path, *how, "model=broken", *QUIET, check=False)
    assert one_error_line(p) == "model.dropout=1.5: must be in [0, 1)"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "multirun").exists()


def test_a_user_target_that_cannot_be_imported_fails_before_the_run_directory(tmp_path, user_dir):
    p = run_cli(tmp_path, "--config-dir", "myconfigs", "model=unet", *QUIET, check=False)
    assert one_error_line(p) == ("model._target_=mypkg.nets.UNet cannot be imported (ModuleNotFoundError: No module "
                                 "named 'mypkg'); install the package (pip install -e .) or fix the dotted path")
    assert not (tmp_path / "runs").exists()


def test_missing_config_dir_is_one_line(tmp_path):
    p = run_cli(tmp_path, "--config-dir", "nope", "model=wide", check=False)
    assert one_error_line(p) == (f"--config-dir nope: {tmp_path / 'nope'} is not a directory; give the directory "
                                 "that holds your GROUP/OPTION.yaml files (e.g. myconfigs with "
                                 "myconfigs/model/unet.yaml)")
    p = list_command(tmp_path, "list_models_main", "--config-dir", "nope")
    assert one_error_line(p).startswith("--config-dir nope: ")


def test_help_and_listings_show_the_users_options(tmp_path, user_dir):
    p = run_cli(tmp_path, "--config-dir", "myconfigs", "--help")
    assert "model: broken, cnn, gpt, hf_causal_lm, mlp, resnet18, resnet50, timm, torchvision, unet, vit_tiny, wide" \
        in p.stdout
    assert "mine, mnist5k_student_kd" in p.stdout
    p = list_command(tmp_path, "list_models_main", "--config-dir", "myconfigs")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in p.stdout.splitlines()
            if line.startswith("│") and line.split("│")[1].strip()}
    assert {"cnn", "mlp", "wide", "unet", "broken"} <= set(rows), p.stdout
    assert rows["unet"] == "(yours: myconfigs/model/unet.yaml) _target_: mypkg.nets.UNet A U-Net of my own"
    assert rows["wide"].startswith("(yours: myconfigs/model/wide.yaml) MLP: ")
    assert rows["wide"].endswith("One wide hidden layer")
    assert "yours" not in rows["mlp"]
    p = list_command(tmp_path, "list_recipes_main", "-cd", "myconfigs")
    assert "(yours: myconfigs/recipe/mine.yaml) My recipe: the wide MLP with tanh" in p.stdout
    assert "digits_cnn" in p.stdout


def test_a_user_option_hidden_by_a_builtin_is_refused(tmp_path, user_dir):
    (user_dir / "model" / "mlp.yaml").write_text("name: mlp\nhidden_sizes: [7]\n")
    p = run_cli(tmp_path, "--config-dir", "myconfigs", "model=mlp", check=False)
    assert one_error_line(p) == (f"model=mlp names both trainrun's own model option and yours ({user_dir.absolute()}/"
                                 "model/mlp.yaml); trainrun's is found first and yours would be ignored: rename yours "
                                 "(e.g. model/my_mlp.yaml) and select model=my_mlp")


# ---- the argument handling, in-process ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (["--config-dir", "d", "model=x"], ("d", ["model=x"])),
    (["-cd", "d", "-m", "seed=1,2"], ("d", ["-m", "seed=1,2"])),
    (["--config-dir=d1", "x=1", "-cd=d2"], ("d2", ["x=1"])),
    (["seed=1"], (None, ["seed=1"])),
])
def test_split_config_dir(args, expected):
    assert split_config_dir(args) == expected


def test_split_config_dir_without_a_value():
    with pytest.raises(ConfigError, match=r"^--config-dir needs a directory: --config-dir DIR"):
        split_config_dir(["seed=1", "--config-dir"])


def test_user_search_path_and_its_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a b,c").mkdir()
    (tmp_path / "more").mkdir()
    entries = user_search_path("a b,c", ["hydra.searchpath=[file://more,pkg://mypkg.conf]", "seed=1"])
    assert entries == [f"file://{tmp_path}/a b,c", "file://more", "pkg://mypkg.conf"]
    assert searchpath_override(entries) == [f"hydra.searchpath=['file://{tmp_path}/a b,c','file://more',"
                                            "'pkg://mypkg.conf']"]
    assert searchpath_override([]) == []
    with pytest.raises(ConfigError) as e:
        user_search_path(None, ["hydra.searchpath=[file://gone]"])
    assert str(e.value) == (f"hydra.searchpath entry file://gone: {tmp_path}/gone is not a directory; give "
                            "file://DIR of a directory that holds your GROUP/OPTION.yaml files")
    with pytest.raises(ConfigError, match="hydra.searchpath takes a list of paths"):
        user_search_path(None, ["hydra.searchpath=file://more"])


def test_quoted_search_path_composes(tmp_path):
    """A directory with a space and a comma reaches Hydra's compose intact."""
    from hydra import compose, initialize_config_dir

    from trainrun.cli import CONFIGS_DIR, setup

    odd = tmp_path / "my conf, v2"
    (odd / "model").mkdir(parents=True)
    (odd / "model" / "tiny.yaml").write_text("name: mlp\nhidden_sizes: [3]\n")
    setup()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3", job_name="t"):
        cfg = compose("config", overrides=["model=tiny", *searchpath_override(user_search_path(str(odd), []))])
    assert list(cfg.model.hidden_sizes) == [3]


def test_check_not_shadowed_only_for_a_selected_clash(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "cnn.yaml").write_text("name: cnn\n")
    search = [f"file://{tmp_path}"]
    check_not_shadowed(search, ["model=mlp", "model.dropout=0.1", "seed=1"])
    check_not_shadowed([], ["model=cnn"])
    with pytest.raises(ConfigError, match=r"^model=cnn names both trainrun's own model option and yours"):
        check_not_shadowed(search, ["model=mlp,cnn"])


@pytest.mark.parametrize("args,expected", [
    (["--config-dir", "x", "+recipe=faces", "-m", "seed=0,1"], ["--config-dir", "x", "-m", "+recipe=faces", "seed=0,1"]),
    (["a=1", "--cfg", "job", "b=2", "--info", "c=3"], ["--cfg", "job", "--info", "a=1", "b=2", "c=3"]),
    (["a=1", "--info", "searchpath", "~b", "-cd=y"], ["--info", "searchpath", "-cd=y", "a=1", "~b"]),
])
def test_hydra_options_go_before_the_overrides(args, expected):
    from trainrun.cli import flags_first

    assert flags_first(args) == expected


def test_an_option_between_overrides_is_not_a_usage_error(tmp_path):
    """Hydra's argparse stops at overrides after an option (`trainrun +recipe=x -m seed=0,1` was a usage error)."""

    from conftest import trainrun_process

    p = trainrun_process(["model=mlp", "--cfg", "job", "optimizer=sgd"], tmp_path, dict(os.environ), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "name: sgd" in p.stdout and "name: mlp" in p.stdout
