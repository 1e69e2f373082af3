"""The input pipeline (issue #16 scope 5): scripts/make_imagefolder.py's generated JPEGs, trainrun's JPEG decode
(torchvision.io.decode_jpeg where it gives PIL's pixels, PIL otherwise), and scripts/bench_input.py's smoke run."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from make_imagefolder import SOURCES, main as make_main, make_imagefolder  # noqa: E402

from tests.conftest import structured  # noqa: E402
from trainrun.config import DataConfig  # noqa: E402
from trainrun.data import decode  # noqa: E402


def pil_reference(path) -> torch.Tensor:
    """torchvision.datasets.folder.default_loader's pixels (what trainrun decoded before), as uint8 [3, H, W]."""
    import torchvision
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(torchvision.datasets.folder.default_loader(str(path)))


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs") / "set"
    info = make_imagefolder(root, classes=4, per_class=6, size=500, seed=3, val_per_class=2)
    return root, info


# ------------------------------------------------------------------------------------------- make_imagefolder

def test_make_imagefolder_writes_an_imagenet_like_folder(jpegs):
    import torchvision

    root, info = jpegs
    train = torchvision.datasets.ImageFolder(str(root / "train"))
    val = torchvision.datasets.ImageFolder(str(root / "val"))
    assert train.classes == val.classes == sorted(SOURCES[:4]) and info["classes"] == SOURCES[:4]
    assert (len(train), len(val), info["train"], info["val"]) == (24, 8, 24, 8)
    sizes = set()
    for path, _ in train.samples + val.samples:
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            sizes.add(im.size)
            assert 300 <= max(im.size) <= 500 and min(im.size) >= 200
    assert (500, 375) in sizes and len(sizes) > 3  # mostly ImageNet's 500 x 375, with variations


def test_make_imagefolder_is_deterministic_from_its_seed(jpegs, tmp_path):
    root, _ = jpegs
    again = make_imagefolder(tmp_path / "again", classes=4, per_class=6, size=500, seed=3, val_per_class=2)
    other = make_imagefolder(tmp_path / "other", classes=1, per_class=2, size=500, seed=4, val_per_class=0)
    files = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*.jpg"))
    assert all((root / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    assert again["bytes"] == jpegs[1]["bytes"]
    name = "train/astronaut/astronaut_00000.jpg"
    assert (tmp_path / "other" / name).read_bytes() != (root / name).read_bytes() and other["val"] == 0
    # train and val are different draws
    assert (root / name).read_bytes() != (root / name.replace("train", "val")).read_bytes()


def test_generated_classes_are_learnable_and_samples_differ(jpegs):
    """Nearest class mean on 8x8 thumbnails separates the classes on val (learnable), while two samples of one
    class are different crops (not one image repeated)."""
    root, _ = jpegs

    def thumbs(split):
        xs, ys = [], []
        for c, name in enumerate(SOURCES[:4]):
            for p in sorted((root / split / name).glob("*.jpg")):
                with Image.open(p) as im:
                    xs.append(np.asarray(im.convert("RGB").resize((8, 8), Image.BILINEAR), np.float32).ravel())
                ys.append(c)
        return np.stack(xs), np.asarray(ys)

    xtr, ytr = thumbs("train")
    xva, yva = thumbs("val")
    means = np.stack([xtr[ytr == c].mean(0) for c in range(4)])
    pred = ((xva[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yva).mean() >= 0.75
    assert np.abs(xtr[0] - xtr[1]).mean() > 5  # two crops of the astronaut, not a copy


def test_make_imagefolder_refuses_bad_arguments_in_one_line(jpegs, tmp_path, capsys):
    root, _ = jpegs
    assert make_main([str(root), "--classes", "2", "--per-class", "1"]) == 2
    assert make_main([str(tmp_path / "x"), "--classes", str(len(SOURCES) + 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("make_imagefolder: error: ") and "is not empty" in err[0]
    assert f"use 1..{len(SOURCES)}" in err[1] and len(err) == 2
    with pytest.raises(ValueError, match="--per-class 0"):
        make_imagefolder(tmp_path / "y", classes=1, per_class=0)


# ------------------------------------------------------------------------------------------- decode

def test_decode_jpeg_gives_pils_pixels_on_the_generated_files(jpegs):
    root, _ = jpegs
    files = sorted(root.rglob("*.jpg"))
    for f in files:
        assert decode.is_jpeg(decode.read_bytes(f))
        assert torch.equal(decode.decode_jpeg_tv(decode.read_bytes(f)), pil_reference(f)), f
        assert torch.equal(decode.load_rgb(f), pil_reference(f))


@pytest.mark.parametrize("mode,options", [
    ("RGB", {"quality": 75, "subsampling": "4:4:4"}), ("RGB", {"quality": 90, "subsampling": "4:2:2"}),
    ("RGB", {"quality": 90, "progressive": True}), ("RGB", {"quality": 95, "optimize": True}),
    ("L", {"quality": 90}), ("CMYK", {"quality": 90})])
def test_decode_jpeg_gives_pils_pixels_on_other_jpeg_kinds(jpegs, tmp_path, mode, options):
    """Progressive, other chroma subsamplings, greyscale and CMYK files decode to PIL's RGB pixels too."""
    src = next((jpegs[0] / "train").rglob("*.jpg"))
    path = tmp_path / "kind.jpg"
    with Image.open(src) as im:
        im.convert(mode).crop((3, 5, 333, 217)).save(path, "JPEG", **options)
    assert torch.equal(decode.decode_jpeg_tv(decode.read_bytes(path)), pil_reference(path))
    assert torch.equal(decode.load_rgb(path), pil_reference(path))


def test_load_rgb_uses_decode_jpeg_for_jpegs_and_pil_for_the_rest(jpegs, tmp_path, monkeypatch):
    calls = []
    real = decode.decode_jpeg_tv
    monkeypatch.setattr(decode, "decode_jpeg_tv", lambda data: calls.append(1) or real(data))
    jpg = next((jpegs[0] / "train").rglob("*.jpg"))
    png = tmp_path / "a.png"
    Image.open(jpg).convert("P").save(png)  # palette PNG: convert("RGB") expands it
    decode.load_rgb(jpg)
    assert len(calls) == 1
    assert torch.equal(decode.load_rgb(png), pil_reference(png)) and len(calls) == 1


def test_a_truncated_jpeg_is_left_to_pil_and_reported_by_the_dataset(jpegs, tmp_path):
    """decode_jpeg refuses it with a RuntimeError; PIL then raises the OSError that FileSet reports in one line."""
    from trainrun.data.datasets import build_split
    from trainrun.errors import DataError

    src = next((jpegs[0] / "train").rglob("*.jpg"))
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / c / f"{i}.jpg").write_bytes(src.read_bytes())
    bad = tmp_path / "imgs" / "b" / "1.jpg"
    bad.write_bytes(src.read_bytes()[:3000])
    with pytest.raises(RuntimeError):
        decode.decode_jpeg_tv(bad.read_bytes())
    with pytest.raises(OSError, match="truncated"):
        decode.load_rgb(bad)
    split = build_split(structured(DataConfig, name="imagefolder", root=str(tmp_path / "imgs"), image_size=8,
                                   val_fraction=0.5))
    ds = split.train if any(split.train.base.samples[i][0] == str(bad) for i in split.train.indices) else split.val
    k = [ds.base.samples[i][0] for i in ds.indices].index(str(bad))
    with pytest.raises(DataError, match=r"cannot decode image .*1\.jpg \(OSError: image file is truncated"):
        ds.load(k, 0)


def test_imagefolder_batches_do_not_depend_on_the_decoder(jpegs):
    """trainrun's data=imagefolder decodes with load_rgb; the same FileSet read through PIL gives equal samples."""
    from trainrun.data.datasets import build_split

    split = build_split(structured(DataConfig, name="imagefolder", root=str(jpegs[0]), image_size=24, augment=True))
    assert split.train.base.loader is decode.load_rgb
    fast = [split.train.load(i, 1000 + i) for i in range(4)]
    split.train.base.loader = decode.load_rgb_pil
    slow = [split.train.load(i, 1000 + i) for i in range(4)]
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(fast, slow))


# ------------------------------------------------------------------------------------------- bench_input

def test_bench_input_smoke_run_records_every_pipeline(jpegs, tmp_path, capsys):
    import bench_input

    out = tmp_path / "bench.json"
    record = bench_input.main(["--quick", "--data", str(jpegs[0]), "--batch", "4", "--workers", "0", "--reps", "1",
                               "--out", str(out)])
    assert json.loads(out.read_text())["table"] == record["table"] and record["table"] in capsys.readouterr().out
    assert record["decoders_give_same_batch"] is True
    assert record["decode"]["images"] == 24 and record["decode"]["files_with_different_pixels"] == []
    assert record["decode"]["pil"]["median"] > 0 and record["decode"]["decode_jpeg"]["median"] > 0
    pipes = record["pipelines"]
    assert set(pipes) == {"trainrun decode_jpeg | w0", "trainrun PIL | w0", "reference | w0"}
    assert all(p["images_per_s"]["median"] > 0 and p["workers"] == 0 for p in pipes.values())
    assert "data.policy=trivialaugment" in record["trainrun_overrides"]
    assert "trainrun / reference" in record["table"] and "decode_jpeg / PIL" in record["table"]


def test_bench_input_transforms_are_the_recipes(jpegs):
    """Both sides crop to 176 with the recipe's TrivialAugmentWide; trainrun's output is its normalised crop."""
    import bench_input

    train = bench_input.trainrun_train_set(jpegs[0], "decode_jpeg")
    x, _ = train.load(0, 7)
    ref = bench_input.reference_train_set(jpegs[0])
    r, _ = ref[0]
    assert x.shape == r.shape == (3, 176, 176) and x.dtype == r.dtype == torch.float32
    names = [type(t).__name__ for t in train.transform.chain.transforms]
    assert "TrivialAugmentWide" in names and "RandomResizedCrop" in names
    assert [type(t).__name__ for t in ref.transform.transforms][:3] == ["RandomResizedCrop", "RandomHorizontalFlip",
                                                                        "TrivialAugmentWide"]


def test_imagefolder_run_on_generated_jpegs_resumes_bitwise(tmp_path):
    """Through the CLI: a run on make_imagefolder's JPEGs (decode_jpeg, the recipe's policy) stopped at step 3 and
    resumed ends with the checkpoint SHA256 of the uninterrupted run."""
    from tests.conftest import FAST, run_cli, sha_of

    make_imagefolder(tmp_path / "jpegs", classes=2, per_class=6, size=64, seed=1, val_per_class=2)
    common = ["data=imagefolder", "data.root=jpegs", "data.image_size=16", "data.augment=true",
              "data.policy=trivialaugment", "data.batch_size=4", "data.num_workers=0", "model=mlp",
              "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.eval_every=3", *FAST]
    run_cli(tmp_path, "run_name=whole", *common)
    run_cli(tmp_path, "run_name=cut", "trainer.stop_at_step=3", *common)
    run_cli(tmp_path, "run_name=cut", "resume=runs/cut", *common)
    assert sha_of(tmp_path / "runs/cut", 6) == sha_of(tmp_path / "runs/whole", 6)
