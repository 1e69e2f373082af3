"""Importing this module leaves a marker file: the trust test proves a stored config never imports it."""
import os
from pathlib import Path

Path(os.environ.get("TRAINRUN_TEST_MARKER", "imported.marker")).write_text("imported\n")


def net(input_shape, num_outputs):
    raise RuntimeError("never called")
