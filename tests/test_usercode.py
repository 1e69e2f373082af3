"""trainrun/usercode.py: importing, calling and tracing user code named by `_target_`, and the resume trust rule.
User modules are real files written into tmp_path and put on sys.path."""
import hashlib
import importlib.metadata
import itertools
import sys
import textwrap

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from trainrun.errors import ConfigError, DataError
from trainrun.usercode import (as_datasets, call_factory, check_trusted, config_targets, factory_kwargs, import_targets,
                               load_target, source_provenance, target_of)

_ids = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Write `source` as a uniquely named module under tmp_path (on sys.path); returns (module name, file)."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(source: str, name: str = None):
        name = name or f"usermod_{next(_ids)}_{tmp_path.name.replace('-', '_')}"
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        monkeypatch.delitem(sys.modules, name, raising=False)
        return name, path

    return write


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# ---- target_of --------------------------------------------------------------------------------------------------

def test_target_of_dictconfig_dict_and_none():
    assert target_of(OmegaConf.create({"_target_": "a.b", "x": 1})) == "a.b"
    assert target_of({"_target_": "a.b"}) == "a.b"
    assert target_of(OmegaConf.create({"name": "mlp"})) is None
    assert target_of({"name": "mlp", "_target_": None}) is None
    assert target_of(3) is None


# ---- load_target ------------------------------------------------------------------------------------------------

def test_load_target_imports_a_function_and_a_class_attribute(user_module):
    mod, _ = user_module("""
        def make(): return 1
        class Net:
            @classmethod
            def small(cls): return 2
    """)
    assert load_target(f"{mod}.make", "model")() == 1
    assert load_target(f"{mod}.Net.small", "model._target_")() == 2
    assert load_target("torch.nn.Linear", "model") is torch.nn.Linear


def test_load_target_missing_package_is_one_line_naming_key_target_and_fix():
    with pytest.raises(ConfigError) as e:
        load_target("mypkg_not_installed.nets.UNet", "model")
    assert one_line(e) == ("model._target_=mypkg_not_installed.nets.UNet cannot be imported (ModuleNotFoundError: No "
                           "module named 'mypkg_not_installed'); install the package (pip install -e .) or fix the "
                           "dotted path")


def test_load_target_missing_submodule_and_missing_attribute(user_module):
    mod, _ = user_module("def make(): pass\n")
    with pytest.raises(ConfigError) as e:
        load_target("torch.nn.nope_module.Thing", "data")
    assert one_line(e) == ("data._target_=torch.nn.nope_module.Thing cannot be imported (AttributeError: module "
                           "'torch.nn' has no attribute 'nope_module'); fix the dotted path (is nope_module defined in "
                           "torch.nn?)")
    with pytest.raises(ConfigError) as e:
        load_target(f"{mod}.mkae", "model")
    assert one_line(e).startswith(f"model._target_={mod}.mkae cannot be imported (AttributeError: module '{mod}' has "
                                  "no attribute 'mkae'); fix the dotted path")


def test_load_target_error_inside_the_module_is_named(user_module):
    broken, _ = user_module("import not_a_real_dependency_xyz\ndef make(): pass\n")
    with pytest.raises(ConfigError) as e:
        load_target(f"{broken}.make", "model")
    assert one_line(e) == (f"model._target_={broken}.make cannot be imported (ModuleNotFoundError: No module named "
                           "'not_a_real_dependency_xyz'); install the missing package or fix the module's imports")
    raising, _ = user_module("raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigError) as e:
        load_target(f"{raising}.make", "task")
    assert one_line(e) == (f"task._target_={raising}.make cannot be imported: importing {raising} raised RuntimeError: "
                           "boom at import; fix the module")
    syntax, _ = user_module("def make(:\n")
    with pytest.raises(ConfigError) as e:
        load_target(f"{syntax}.make", "model")
    assert f"importing {syntax} raised SyntaxError" in one_line(e)


@pytest.mark.parametrize("target", ["", "UNet", "mypkg..UNet", "mypkg.nets.", "my-pkg.UNet", "os.system()", 42])
def test_load_target_malformed_path(target):
    with pytest.raises(ConfigError) as e:
        load_target(target, "model")
    assert one_line(e) == (f"model._target_={target} is not a dotted path: name a class or function as "
                           "package.module.name (e.g. mypkg.nets.UNet)")


def test_load_target_not_callable(user_module):
    mod, _ = user_module("WIDTH = 3\n")
    with pytest.raises(ConfigError) as e:
        load_target(f"{mod}.WIDTH", "model")
    assert one_line(e) == f"model._target_={mod}.WIDTH is not callable (type int); name a class or a function that " \
                          "builds the object"
    with pytest.raises(ConfigError) as e:
        load_target("os.path", "model")
    assert "is not callable (type module)" in one_line(e)


# ---- call_factory -----------------------------------------------------------------------------------------------

SCHEMA = ["name", "hidden_sizes", "dropout"]


def test_call_factory_passes_own_keys_and_only_the_schema_and_offered_keys_it_names(user_module):
    mod, _ = user_module("""
        def net(width, input_shape, hidden_sizes=None):
            return dict(width=width, input_shape=input_shape, hidden_sizes=hidden_sizes)
        def anything(**kw):
            return kw
    """)
    node = OmegaConf.create({"_target_": f"{mod}.net", "name": "mlp", "hidden_sizes": [8], "dropout": 0.1,
                             "width": "${.hidden_sizes[0]}"})
    got = call_factory(node, "model", SCHEMA, {"input_shape": [1, 8, 8], "num_classes": 10})
    assert got == {"width": 8, "input_shape": [1, 8, 8], "hidden_sizes": [8]}
    assert isinstance(got["input_shape"], list)  # plain Python, not a ListConfig
    node.update({"_target_": f"{mod}.anything"})
    got = call_factory(node, "model", SCHEMA, {"num_classes": 10})
    assert got == {"name": "mlp", "hidden_sizes": [8], "dropout": 0.1, "width": 8, "num_classes": 10}
    assert type(got["hidden_sizes"]) is list


def test_factory_kwargs_precedence_user_key_over_offered_over_schema_default():
    import inspect

    sig = inspect.signature(lambda num_classes, input_shape, name: None)
    values = {"_target_": "x.y", "name": "mlp", "num_classes": 3, "input_shape": [9]}
    kw = factory_kwargs(values, ["name", "input_shape"], {"num_classes": 10, "input_shape": [1, 8, 8]}, sig)
    assert kw == {"name": "mlp", "num_classes": 3, "input_shape": [1, 8, 8]}


def test_call_factory_class_target_with_dict_node(user_module):
    mod, _ = user_module("""
        import torch.nn as nn
        class Net(nn.Module):
            def __init__(self, num_classes, width=4):
                super().__init__()
                self.fc = nn.Linear(width, num_classes)
    """)
    net = call_factory({"_target_": f"{mod}.Net", "width": 5}, "model._target_", [], {"num_classes": 3})
    assert net.fc.weight.shape == (3, 5)


def test_call_factory_binding_errors_name_the_argument(user_module):
    mod, _ = user_module("""
        def net(depth, width=2): return depth
        def pos_only(depth, /): return depth
    """)
    with pytest.raises(ConfigError) as e:
        call_factory({"_target_": f"{mod}.net", "wdth": 3}, "model", SCHEMA, {})
    assert one_line(e) == (f"model._target_={mod}.net does not take argument 'wdth' (it takes depth, width); remove "
                           "model.wdth from the config")
    with pytest.raises(ConfigError) as e:
        call_factory({"_target_": f"{mod}.net", "width": 3}, "model", SCHEMA, {"num_classes": 10})
    assert one_line(e) == (f"model._target_={mod}.net cannot be called with ['width']: missing a required argument: "
                           "'depth'; add depth: VALUE to the model option (or +model.depth=VALUE on the command line)")
    with pytest.raises(ConfigError) as e:
        call_factory({"_target_": f"{mod}.pos_only", "depth": 3}, "model", SCHEMA, {})
    assert "does not take argument 'depth'" in one_line(e)


def test_call_factory_exception_inside_is_one_line(user_module):
    mod, _ = user_module("""
        from trainrun.errors import ConfigError
        def net(width):
            raise ValueError(f"width {width} must be even\\nsecond line")
        def own(width):
            raise ConfigError("model.width=3: must be even")
    """)
    with pytest.raises(ConfigError) as e:
        call_factory({"_target_": f"{mod}.net", "width": 3}, "model", SCHEMA, {})
    assert one_line(e) == f"model._target_={mod}.net failed: ValueError: width 3 must be even"
    assert isinstance(e.value.__cause__, ValueError)
    with pytest.raises(ConfigError) as e:
        call_factory({"_target_": f"{mod}.own", "width": 3}, "model", SCHEMA, {})
    assert str(e.value) == "model.width=3: must be even"


def test_call_factory_import_failure_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        call_factory({"_target_": "no_such_pkg_abc.make"}, "data", ["name"], {})
    assert one_line(e).startswith("data._target_=no_such_pkg_abc.make cannot be imported (ModuleNotFoundError")


# ---- source_provenance ------------------------------------------------------------------------------------------

def test_source_provenance_of_a_user_module_matches_the_file(user_module):
    mod, path = user_module("def make(): return 1\n")
    prov = source_provenance(f"{mod}.make")
    assert prov == {"target": f"{mod}.make", "module": mod, "file": str(path.resolve()),
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "package": None, "version": None}


def test_source_provenance_of_an_installed_package_and_a_builtin():
    import torch.nn.modules.linear as linear

    prov = source_provenance("torch.nn.Linear")
    assert prov["module"] == "torch.nn.modules.linear" and prov["file"] == str(
        __import__("pathlib").Path(linear.__file__).resolve())
    assert prov["sha256"] == hashlib.sha256(open(linear.__file__, "rb").read()).hexdigest()
    assert prov["package"] == "torch" and prov["version"] == importlib.metadata.version("torch")
    prov = source_provenance("os.system")
    assert prov["file"] is None and prov["sha256"] is None and prov["target"] == "os.system"


# ---- config_targets and the trust rule --------------------------------------------------------------------------

def test_config_targets_finds_every_target_but_hydras():
    cfg = {"model": {"_target_": "pkg.nets.UNet", "backbone": {"_target_": "pkg.nets.Backbone"}},
           "data": {"_target_": None, "name": "digits"}, "task": {"_target_": "pkg.losses.focal"},
           "callbacks": {"counter": {"_target_": "pkg.cb.Counter", "every": 2}},
           "extra": [{"_target_": "pkg.a.b"}],
           "hydra": {"callbacks": {"sweep_lock": {"_target_": "trainrun.rundir.SweepLock"}}}}
    expected = {"model": "pkg.nets.UNet", "model.backbone": "pkg.nets.Backbone", "task": "pkg.losses.focal",
                "callbacks.counter": "pkg.cb.Counter", "extra.0": "pkg.a.b"}
    assert config_targets(cfg) == expected
    assert config_targets(OmegaConf.create(cfg)) == expected


def test_check_trusted_refuses_a_target_only_the_checkpoint_names():
    stored = {"model": "os.system", "task": "pkg.losses.focal"}
    with pytest.raises(ConfigError) as e:
        check_trusted(stored, {"task": "pkg.losses.focal"})
    assert one_line(e) == ("resume refused: the checkpoint's config names model._target_=os.system, which this command "
                           "does not; trainrun never imports code only a stored config names: pass "
                           "model._target_=os.system yourself if you trust it")
    check_trusted(stored, {"model": "os.system", "task": "pkg.losses.focal"})  # named by this command: accepted
    check_trusted(stored, {"callbacks.x": "os.system", "task": "pkg.losses.focal"})  # named under any key
    check_trusted({}, {"model": "pkg.nets.UNet"})  # a new target in this command is not the checkpoint's


def test_import_targets_imports_each_or_fails_in_one_line():
    got = import_targets({"model": "torch.nn.Linear"})
    assert got == {"model": torch.nn.Linear}
    with pytest.raises(ConfigError) as e:
        import_targets({"callbacks.counter": "no_pkg_zz.Counter"})
    assert one_line(e).startswith("callbacks.counter._target_=no_pkg_zz.Counter cannot be imported")


# ---- as_datasets ------------------------------------------------------------------------------------------------

class Pairs(Dataset):
    def __init__(self, n, sample=None):
        self.n, self.sample = n, sample

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.sample if self.sample is not None else (torch.zeros(3), i % 2)


def xy(n, m=None):
    return torch.randn(n, 3), torch.arange(n if m is None else m)


def test_as_datasets_accepts_dicts_tuples_datasets_and_tensor_pairs():
    train = Pairs(4)
    out = as_datasets({"train": train, "val": xy(3)})
    assert out["train"] is train and isinstance(out["val"], TensorDataset) and len(out["val"]) == 3
    out = as_datasets((xy(5), Pairs(2), xy(2)))
    assert set(out) == {"train", "val", "test"} and len(out["train"]) == 5
    out = as_datasets([Pairs(2), Pairs(2, (torch.zeros(2), 0.5))])
    assert set(out) == {"train", "val"}
    out = as_datasets({"train": Pairs(2, (torch.zeros(2), torch.tensor([1.0, 0.0]))), "val": Pairs(1), "test": None})
    assert set(out) == {"train", "val"}


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


@pytest.mark.parametrize("result, message", [
    ({"train": Pairs(2)}, 'data._target_=pkg.make returns no "val" dataset; return a dict {"train": ..., "val": ...[, '
                          '"test": ...]} or a tuple (train, val[, test])'),
    ({"train": Pairs(2), "validation": Pairs(2)}, "data._target_=pkg.make returns a dict with key 'validation': its "
                                                  "keys are train, val and optionally test"),
    ((Pairs(2),), "data._target_=pkg.make returns a tuple; return a dict"),
    (xy(4), "data._target_=pkg.make returns one (x, y) pair of tensors, not splits"),
    ({"train": Pairs(2), "val": Pairs(0)}, 'data._target_=pkg.make returns an empty dataset for "val"; every split '
                                           'needs at least one sample'),
    ({"train": Stream(), "val": Pairs(2)}, 'data._target_=pkg.make returns an IterableDataset for "train": trainrun '
                                           "batches and orders map-style datasets itself so that a resumed run "
                                           "continues exactly; return a map-style Dataset (__len__ and __getitem__)"),
    ({"train": Pairs(2, torch.zeros(3)), "val": Pairs(2)}, 'data._target_=pkg.make: "train"[0] is a Tensor, not a '
                                                           'pair (x, y)'),
    ({"train": Pairs(2), "val": Pairs(2, ([0.0, 1.0], 1))}, 'data._target_=pkg.make: "val"[0] has x of type list; x '
                                                            'must be a tensor'),
    ({"train": Pairs(2, (torch.zeros(2), "cat")), "val": Pairs(2)}, 'data._target_=pkg.make: "train"[0] has y of '
                                                                     'type str; y must be a tensor, int or float'),
    ({"train": xy(4, 3), "val": Pairs(2)}, 'data._target_=pkg.make returns tensors of unequal length for "train": x '
                                           'has 4 samples, y has 3; give one label per sample'),
    ({"train": (torch.zeros(4, 2), [0, 1, 0, 1]), "val": Pairs(2)}, 'data._target_=pkg.make returns (x, y) for "train" '
                                                                     'with y a list: an (x, y) pair needs two tensors'),
    ({"train": torch.zeros(4, 2), "val": Pairs(2)}, 'data._target_=pkg.make returns a Tensor for "train": return a '
                                                    'map-style Dataset'),
])
def test_as_datasets_refuses_in_one_line(result, message):
    with pytest.raises(DataError) as e:
        as_datasets(result, target="pkg.make")
    assert message in one_line(e)


def test_as_datasets_sample_that_raises_is_one_line():
    class Broken(Pairs):
        def __getitem__(self, i):
            raise KeyError(i)

    with pytest.raises(DataError) as e:
        as_datasets({"train": Pairs(1), "val": Broken(3)}, key="data")
    assert one_line(e) == 'data._target_: "val"[0] raised KeyError: 0; fix the dataset\'s __getitem__'


def test_a_schema_key_left_at_its_default_does_not_override_the_factory_default():
    """model.width is also the built-in ViT's key (default 192): a user factory's own `width=64` default must win
    unless the config sets width."""
    import inspect

    from trainrun.config import ModelConfig
    from trainrun.usercode import factory_kwargs, schema_defaults

    def net(input_shape, width=64):
        return width

    sig, defaults = inspect.signature(net), schema_defaults(ModelConfig)
    untouched = {"_target_": "m.net", **{k: v for k, v in defaults.items() if k != "_target_"}}
    assert factory_kwargs(untouched, defaults, {"input_shape": (1, 8, 8)}, sig) == {"input_shape": (1, 8, 8)}
    assert factory_kwargs({**untouched, "width": 32}, defaults, {}, sig) == {"width": 32}
