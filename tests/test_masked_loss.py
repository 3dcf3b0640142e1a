"""Masked loss (#19 item 3): the mask weights the per-pixel loss, follows its image, is cached with the latents."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lora.config import DataConfig
from sd_lora.data.cache import LatentCache, item_mask, item_pixels
from sd_lora.data.dataset import scan_dataset
from sd_lora.data.masks import latent_mask, pixel_mask
from sd_lora.training.loss import diffusion_loss


@pytest.fixture(scope="module")
def tiny_sd1():
    """One tiny SD1 pipeline for the module, built on one thread (a busy 2-core machine)."""
    from sd_lora.testing import tiny_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_pipeline("sd1")
    finally:
        torch.set_num_threads(threads)


class _Sched:  # diffusion_loss reads only the prediction type (no SNR weighting here)
    class config:
        prediction_type = "epsilon"


def _pattern(w: int, h: int) -> np.ndarray:
    """An asymmetric 0..255 pattern: a bright block near the top left, a ramp, zeros at the right edge."""
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = np.linspace(60, 255, w // 2, dtype=np.uint8)[None]
    a[2 : h // 3, 3 : w // 4] = 255
    return a


def _dataset(tmp_path, size=(96, 64), **data):
    """One RGBA image whose alpha and red channel are the pattern, and a mask folder holding the same pattern."""
    pat = _pattern(*size)
    rgba = np.zeros((size[1], size[0], 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = pat, pat
    img = tmp_path / "data" / "1_a" / "x.png"
    img.parent.mkdir(parents=True)
    Image.fromarray(rgba, "RGBA").save(img)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(pat, "L").save(masks / "x.png")
    return DataConfig(path=str(tmp_path / "data"), resolution=64, **data), masks


def test_gradient_is_zero_outside_the_mask_and_the_loss_is_the_hand_formula():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 6, 8, generator=g, requires_grad=True)
    target = torch.randn(2, 4, 6, 8, generator=g)
    mask = torch.zeros(2, 1, 6, 8)
    mask[0, :, :, :3] = 1.0
    mask[1, :, 2:, 4:] = 0.5
    weights = torch.tensor([1.0, 0.25])
    loss = diffusion_loss(pred, target, torch.tensor([10, 500]), _Sched, weights, mask=mask)
    loss.backward()
    by_hand = (((pred.detach() - target) ** 2 * mask).mean(dim=(1, 2, 3)) * weights).mean()  # mean over ALL pixels
    torch.testing.assert_close(loss.detach(), by_hand)
    outside = (mask == 0).expand_as(pred)
    assert torch.all(pred.grad[outside] == 0)
    assert torch.all(pred.grad[~outside] != 0)
    # a change of the prediction or the target where the mask is 0 leaves the loss exactly as it was
    pred2, target2 = pred.detach().clone(), target.clone()
    pred2[outside] += 3.0
    target2[outside] -= 1.0
    assert diffusion_loss(pred2, target2, torch.tensor([10, 500]), _Sched, weights, mask=mask).item() == loss.item()
    # ... and without the mask it does not (the test can fail)
    assert diffusion_loss(pred2, target2, torch.tensor([10, 500]), _Sched, weights).item() != \
        diffusion_loss(pred.detach(), target, torch.tensor([10, 500]), _Sched, weights).item()


def test_alpha_and_folder_masks_give_the_same_mask(tmp_path):
    alpha_cfg, masks = _dataset(tmp_path, alpha_mask=True)
    folder_cfg = DataConfig(path=alpha_cfg.path, resolution=64, masked_loss=True, mask_path=str(masks))
    a, f = scan_dataset(alpha_cfg).items[0], scan_dataset(folder_cfg).items[0]
    assert a.mask.alpha and not f.mask.alpha and f.mask.path == masks / "x.png"
    for flipped in (False, True):
        pa, pf = pixel_mask(a.mask, a.placement, flipped), pixel_mask(f.mask, f.placement, flipped)
        assert pa.shape == (a.bucket[1], a.bucket[0])
        torch.testing.assert_close(pa, pf)
        torch.testing.assert_close(item_mask(a, flipped, (a.bucket[1] // 8, a.bucket[0] // 8)),
                                   item_mask(f, flipped, (f.bucket[1] // 8, f.bucket[0] // 8)))
    assert 0.05 < pa.mean() < 0.95  # a real mask, not all ones or zeros


def test_the_mask_is_cropped_and_flipped_with_its_image(tmp_path):
    # an opaque image whose red channel is the pattern, and the pattern as its mask: after the bucket
    # resize + crop (+ flip) the mask must still lie on the image's red channel
    pat = _pattern(120, 64)
    rgb = np.zeros((64, 120, 3), np.uint8)
    rgb[..., 0] = pat
    img = tmp_path / "data" / "x.png"
    img.parent.mkdir()
    Image.fromarray(rgb, "RGB").save(img)
    (tmp_path / "m").mkdir()
    Image.fromarray(pat, "L").save(tmp_path / "m" / "x.png")
    item = scan_dataset(DataConfig(path=str(tmp_path / "data"), resolution=64, bucket_step=16, masked_loss=True,
                                   mask_path=str(tmp_path / "m"))).items[0]
    assert item.placement.crop != (0, 0) and item.placement.resized != (120, 64)  # both a resize and a crop
    for flipped in (False, True):
        red = (item_pixels(item, flipped, 10**8)[0] + 1) / 2
        torch.testing.assert_close(pixel_mask(item.mask, item.placement, flipped), red, atol=1 / 255 + 1e-6, rtol=0)
    assert not torch.equal(pixel_mask(item.mask, item.placement, True), pixel_mask(item.mask, item.placement, False))
    # latent size: each latent pixel is the mean of the 8x8 pixels it covers (kohya's mode="area")
    px = pixel_mask(item.mask, item.placement, False)
    lat = latent_mask(px, (px.shape[0] // 8, px.shape[1] // 8))
    torch.testing.assert_close(lat[0, 1, 2], px[8:16, 16:24].mean())


def test_cache_keys_differ_with_and_without_a_mask_and_entries_hold_it(tmp_path, tiny_sd1):
    plain_cfg, masks = _dataset(tmp_path)
    plain = scan_dataset(plain_cfg).items
    masked = scan_dataset(DataConfig(path=plain_cfg.path, resolution=64, masked_loss=True, mask_path=str(masks))).items
    alpha = scan_dataset(DataConfig(path=plain_cfg.path, resolution=64, alpha_mask=True)).items
    keys = LatentCache(plain + masked + alpha, None, "ram", None, False, 10**8)
    assert len({keys.key(plain[0], False), keys.key(masked[0], False), keys.key(alpha[0], False)}) == 3
    assert plain[0].mask is None
    # another mask for the same image: another entry
    Image.fromarray(255 - _pattern(96, 64), "L").save(masks / "x.png")
    edited = scan_dataset(DataConfig(path=plain_cfg.path, resolution=64, masked_loss=True, mask_path=str(masks))).items
    assert keys.key(edited[0], False) != keys.key(masked[0], False)

    vae = tiny_sd1.vae
    disk = LatentCache(edited, vae, "disk", tmp_path / "cache", True, 10**8)
    assert disk.build(show_progress=False) == {"encoded": 2, "reused": 0}
    ram = LatentCache(edited, vae, "ram", None, True, 10**8)
    ram.build(show_progress=False)
    none = LatentCache(edited, vae, "none", None, True, 10**8)
    for flipped in (False, True):
        latent, mask = disk.get_with_mask(0, flipped)
        assert mask.shape == (1, *latent.shape[-2:])
        torch.testing.assert_close(mask, item_mask(edited[0], flipped, latent.shape[-2:]))
        torch.testing.assert_close(ram.get_with_mask(0, flipped)[1], mask)
        torch.testing.assert_close(none.get_with_mask(0, flipped)[1], mask)
    assert LatentCache(edited, vae, "disk", tmp_path / "cache", True, 10**8).build(show_progress=False)["reused"] == 2
    assert LatentCache(plain, vae, "none", None, False, 10**8).get_with_mask(0, False)[1] is None


def test_clear_errors_missing_mask_other_size_and_no_source(tmp_path):
    cfg, masks = _dataset(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "1_a" / "y.png")
    ds = scan_dataset(DataConfig(path=cfg.path, resolution=64, masked_loss=True, mask_path=str(masks)))
    with pytest.raises(ValueError, match=r"no mask for .*y\.png in .*masks"):
        ds.check()
    Image.new("L", (10, 8)).save(masks / "y.jpg")  # another extension is found, but the size is not the image's
    ds = scan_dataset(DataConfig(path=cfg.path, resolution=64, masked_loss=True, mask_path=str(masks)))
    with pytest.raises(ValueError, match=r"mask .*y\.jpg is 10x8 but its image .*y\.png is 8x8"):
        ds.check()
    with pytest.raises(ValueError, match="masked_loss = true but no mask source"):
        scan_dataset(DataConfig(path=cfg.path, resolution=64, masked_loss=True)).check()
    unused = scan_dataset(DataConfig(path=cfg.path, resolution=64, mask_path=str(masks)))
    assert any("mask_path" in w and "NOT used" in w for w in unused.report.warnings)
    assert all(i.mask is None for i in unused.items)


def test_kohya_dataset_config_and_subset_tables_read_the_mask_options(tmp_path):
    cfg, masks = _dataset(tmp_path)
    toml = tmp_path / "ds.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{cfg.path}/1_a"\n'
                    f'conditioning_data_dir = "{masks}"\n[[datasets.subsets]]\nimage_dir = "{cfg.path}/1_a"\nalpha_mask = true\n')
    items = scan_dataset(DataConfig(dataset_config_path=str(toml), masked_loss=True)).items
    assert [i.mask.alpha for i in items] == [False, True] and items[0].mask.path == masks / "x.png"
    tables = DataConfig(resolution=64, subsets=[{"path": f"{cfg.path}/1_a", "alpha_mask": True}, {"path": f"{cfg.path}/1_a"}])
    assert [i.mask is not None for i in scan_dataset(tables).items] == [True, False]


def test_training_weights_the_loss_by_the_cached_masks(tmp_path, monkeypatch, tiny_sd1):
    """One real step: the loop hands the loss each item's cached mask (ones for an image without alpha)."""
    from sd_lora.config import TrainConfig
    from sd_lora.testing import write_noise_images
    from sd_lora.training import loop, train

    seen = []
    real = loop.diffusion_loss

    def spy(pred, target, *args, **kwargs):
        seen.append(kwargs["mask"])
        return real(pred, target, *args, **kwargs)

    monkeypatch.setattr(loop, "diffusion_loss", spy)
    data = write_noise_images(tmp_path / "data" / "1_thing", 2)
    rgba = Image.open(data / "0.png").convert("RGBA")
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0  # the left half is ignored
    rgba.putalpha(Image.fromarray(alpha, "L"))
    rgba.save(data / "0.png")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny_sd1.save_pretrained(tmp_path / "base")
        train(TrainConfig(model=str(tmp_path / "base"), output=str(tmp_path / "out" / "lora.safetensors"), steps=1,
                          batch_size=2, data={"path": str(data.parent), "resolution": 64, "alpha_mask": True},
                          network={"rank": 2, "preset": "attention"}))
    finally:
        torch.set_num_threads(threads)
    (mask,) = seen
    assert mask is not None and mask.shape[:2] == (2, 1)
    half = mask.shape[-1] // 2
    by_mean = sorted(mask, key=lambda m: m.mean().item())
    assert torch.all(by_mean[0][..., :half] == 0) and torch.all(by_mean[0][..., half:] == 1)  # the alpha image
    assert torch.all(by_mean[1] == 1)  # the opaque one trains everywhere


def test_masks_follow_the_exif_rotation_of_their_image(tmp_path):
    """A phone photo stored sideways with an EXIF "rotate 90" tag: its alpha is rotated with it, and an upright
    mask (as a mask editor saves it) is the rotated image's size, so it is accepted and gives the same mask."""
    from PIL import ImageOps

    pat = _pattern(96, 64)
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = pat, pat
    img = tmp_path / "data" / "x.png"
    img.parent.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 clockwise to view
    Image.fromarray(rgba, "RGBA").save(img, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(img))
    assert upright.size == (64, 96)
    (tmp_path / "m").mkdir()
    upright.getchannel("A").save(tmp_path / "m" / "x.png")
    a = scan_dataset(DataConfig(path=str(tmp_path / "data"), resolution=64, alpha_mask=True)).items[0]
    f = scan_dataset(DataConfig(path=str(tmp_path / "data"), resolution=64, masked_loss=True, mask_path=str(tmp_path / "m")))
    f.check()
    torch.testing.assert_close(pixel_mask(a.mask, a.placement, False), pixel_mask(f.items[0].mask, f.items[0].placement, False))
    assert a.placement.resized[1] > a.placement.resized[0]  # placed as the upright (portrait) image
