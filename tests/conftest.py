"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures(...)`):
    on a busy 2-core machine OpenMP threads only wait on each other, making steps several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Saved tiny pipelines, arch -> folder: sd1, sd2-v and sdxl (seeded random weights)."""
    from sd_lora.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for arch in ("sd1", "sd2-v", "sdxl"):
        tiny_pipeline(arch).save_pretrained(root / arch)
        out[arch] = str(root / arch)
    return out


@pytest.fixture(scope="module")
def tiny_training_root(tmp_path_factory):
    """A saved tiny SD1 model (`root/model`) and a two-image dataset (`root/data/1_thing`)."""
    from sd_lora.testing import tiny_pipeline, write_noise_images

    root = tmp_path_factory.mktemp("tiny_training")
    tiny_pipeline("sd1").save_pretrained(root / "model")
    write_noise_images(root / "data" / "1_thing", 2)
    return root
