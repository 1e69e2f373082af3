"""Decoding image files to RGB uint8 tensors [3, H, W] for the image-file datasets.

JPEGs go through torchvision.io.decode_jpeg (torchvision's own libjpeg-turbo), everything else through PIL. On
this machine decode_jpeg gives the same pixels as PIL's `Image.open(p).convert("RGB")` (torchvision's
default_loader) bit for bit - baseline and progressive, 4:2:0 / 4:2:2 / 4:4:4, greyscale and CMYK files, tested in
tests/test_input_bench.py - and decodes an ImageNet-size JPEG in about two thirds of PIL's time (docs/performance.md,
"Input pipeline"). A JPEG that decode_jpeg refuses (truncated, corrupt, a libjpeg feature it lacks) is handed to
PIL, which either reads it or raises the OSError that FileSet.load reports as `cannot decode image ...`.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Union

import torch

JPEG_MAGIC = b"\xff\xd8\xff"  # SOI marker + the first byte of the next marker


def read_bytes(path: Union[str, Path]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def is_jpeg(data: bytes) -> bool:
    return data[:3] == JPEG_MAGIC


def decode_pil(data: bytes) -> torch.Tensor:
    """PIL's decode, converted to RGB exactly as torchvision.datasets.folder.default_loader does."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(io.BytesIO(data)) as im:
        return pil_to_tensor(im.convert("RGB"))


def decode_jpeg_tv(data: bytes) -> torch.Tensor:
    """torchvision.io.decode_jpeg to RGB; raises RuntimeError where libjpeg refuses the file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # a corrupt-data warning precedes the error that sends the file to PIL
        warnings.simplefilter("ignore")
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def load_rgb(path: Union[str, Path]) -> torch.Tensor:
    """The image file at `path` as RGB uint8 [3, H, W]: decode_jpeg for JPEGs, PIL otherwise or where it refuses."""
    data = read_bytes(path)
    if is_jpeg(data):
        try:
            return decode_jpeg_tv(data)
        except RuntimeError:
            pass  # PIL decides: it reads what this libjpeg build refuses, or raises the error FileSet reports
    return decode_pil(data)


def load_rgb_pil(path: Union[str, Path]) -> torch.Tensor:
    """PIL only (the benchmark's baseline and the reference the pixel-equality test compares with)."""
    return decode_pil(read_bytes(path))
