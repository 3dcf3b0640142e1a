"""Fixtures shared by several test files."""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def tiny_training_root(tmp_path_factory):
    """A saved tiny SD1 model (`root/model`) and a two-image dataset (`root/data/1_thing`)."""
    from sd_lora.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_training")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    folder = root / "data" / "1_thing"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root
