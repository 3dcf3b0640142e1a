"""The adapter-method registry (sd_lora.methods): one module per method, no method-name branches elsewhere.

Every reader method: file round trip and its delta against a formula written out here; OFT (added
through the registry) against a hand computation of the Cayley rotation; training-side facts
(metadata, size estimate, validation) per method.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sd_lora import methods
from sd_lora.formats import LoraFile, LoraModule, load_lora, save_lora
from sd_lora.network.naming import module_index
from sd_lora.testing import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 64 x 64 in the tiny SD1 UNet
K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # 64 x 32
CONV = "lora_unet_up_blocks_0_resnets_0_conv1"  # 64 x 128 x 3 x 3


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return tiny_pipeline("sd1")


def _weight(pipe, name):
    return module_index(pipe, "sd1")[name][2].weight


# ---- the registry ---------------------------------------------------------------------------------
def test_registry_names_and_lookup():
    assert methods.trainable_method_names() == ("lora", "dora", "loha", "lokr", "adalora")
    assert "oft" in methods.method_names() and "oft" not in methods.trainable_method_names()
    assert "full" not in methods.trainable_method_names()
    assert [m.name for m in methods.readers()] == ["lora", "loha", "lokr", "full", "oft"]
    assert methods.get("dora").kind == "lora" and methods.get("adalora").kind == "lora"
    with pytest.raises(ValueError, match="choose one of lora, dora"):
        methods.get("ia3")
    assert methods.for_keys({"hada_w1_a", "alpha"}).name == "loha"
    assert methods.for_keys({"oft_blocks", "alpha"}).name == "oft"
    assert methods.for_keys({"lora_down.weight", "dora_scale"}).name == "lora"
    from sd_lora.network.config import NetworkConfig

    errors = NetworkConfig(method="oft").validate()
    assert len(errors) == 1 and "unknown 'oft'" in errors[0] and "adalora" in errors[0]


def test_method_modules_and_registry_import_without_torch():
    # A stub parent package skips sd_lora/__init__.py (another module's business): what is measured
    # is the registry, every method module and NetworkConfig (with a method's own rules) on their own.
    code = f"""
import sys, types
pkg = types.ModuleType("sd_lora"); pkg.__path__ = [{str(ROOT / 'sd_lora')!r}]; sys.modules["sd_lora"] = pkg
import sd_lora.methods as m
for name in m.method_names():
    m.get(name)
from sd_lora.network.config import NetworkConfig
assert NetworkConfig(method="adalora", rank_dropout=0.1).validate()
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "peft", "diffusers", "transformers"))
assert not bad, bad
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# Names that identify a method; "full" is also a preset, so compares against a preset are allowed.
_NAMES = set(methods.method_names())


def _is_name_literal(node) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in _NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_name_literal(e) for e in node.elts)
    return False


def _mentions_preset(node) -> bool:
    return any(isinstance(n, (ast.Name, ast.Attribute)) and "preset" in (n.id if isinstance(n, ast.Name) else n.attr)
               for n in ast.walk(node))


def method_branches(source: str) -> list[str]:
    """Compares against a method name, dicts keyed by method names, and KIND_* constants."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_is_name_literal, operands)) and not any(map(_mentions_preset, operands)):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict) and sum(_is_name_literal(k) for k in node.keys if k is not None) >= 2:
            found.append(f"line {node.lineno}: dict keyed by method names")
        elif isinstance(node, ast.Name) and node.id.startswith("KIND_"):
            found.append(f"line {node.lineno}: {node.id}")
    return found


def test_the_branch_finder_finds_branches():
    assert method_branches('if cfg.method == "adalora": pass')
    assert method_branches('x = m.kind in ("lora", "dora")')
    assert method_branches('algo = {"dora": "lora", "loha": "loha"}[method]')
    assert method_branches('ok = module.kind != KIND_LORA')
    assert not method_branches('convs = preset == "full"')
    assert not method_branches('m = methods.get("lora")')


def test_no_method_name_branches_outside_the_methods_package():
    offenders = {}
    for folder in ("sd_lora", "webui"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if (ROOT / "sd_lora" / "methods") in path.parents:
                continue
            found = method_branches(path.read_text(encoding="utf-8"))
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, f"method-name branches belong in sd_lora/methods/: {offenders}"


# ---- every reader method: round trip and delta = formula ----------------------------------------
def _reference_delta(name: str, t: dict, base: torch.Tensor) -> torch.Tensor:
    """Each method's delta written out directly (no library code)."""
    if name == "lora":
        return (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(base.shape) * (
            float(t["alpha"]) / t["lora_down.weight"].shape[0])
    if name == "loha":
        r = t["hada_w1_b"].shape[0]
        return ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(base.shape) * (float(t["alpha"]) / r)
    if name == "lokr":
        r = t["lokr_w2_b"].shape[0]
        return torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(base.shape) * (float(t["alpha"]) / r)
    if name == "full":
        return t["diff"]
    assert name == "oft"
    return _oft_by_hand(t["oft_blocks"], base)


def _oft_by_hand(blocks: torch.Tensor, w: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """OFT with 2 x 2 blocks in closed form: Q = [[0, q], [-q, 0]] gives the Cayley rotation
    R = [[1 - q^2, 2q], [-2q, 1 - q^2]] / (1 + q^2), and each block of rows becomes R^T W_k."""
    assert blocks.shape[1:] == (2, 2)
    q = blocks[:, 0, 1] - blocks[:, 1, 0]
    norm = math.sqrt(2 * float((q ** 2).sum())) + 1e-8  # ||Q||_F over all blocks
    if constraint > 0 and norm > constraint:
        q = q * (constraint / norm)
    c, s = (1 - q ** 2) / (1 + q ** 2), 2 * q / (1 + q ** 2)
    w0, w1 = w[0::2], w[1::2]
    c, s = c.reshape(-1, *[1] * (w.dim() - 1)), s.reshape(-1, *[1] * (w.dim() - 1))
    out = torch.empty_like(w)
    out[0::2] = c * w0 - s * w1
    out[1::2] = s * w0 + c * w1
    return out - w


@pytest.mark.parametrize("name", ["lora", "loha", "lokr", "full", "oft"])
def test_reader_round_trip_and_delta_formula(pipe, tmp_path, name):
    method = methods.get(name)
    base = _weight(pipe, Q).detach()
    g = torch.Generator().manual_seed(3)
    rank = 32 if name == "oft" else 4  # OFT: 32 blocks of 2 x 2
    tensors = method.random_tensors(tuple(base.shape), rank, g)
    tensors.setdefault("alpha", torch.tensor(2.0))
    path = save_lora(tmp_path / f"{name}.safetensors", LoraFile({Q: LoraModule(Q, name, tensors)}), metadata={}, dtype="fp32")
    back = load_lora(path).modules[Q]
    assert back.kind == name and set(back.tensors) == set(tensors)
    assert all(torch.equal(back.tensors[k], v) for k, v in tensors.items())
    delta = back.delta(base.shape, base_weight=base)
    torch.testing.assert_close(delta, _reference_delta(name, tensors, base), atol=1e-5, rtol=1e-4)
    assert back.method.fits(back.tensors, tuple(base.shape)) and not back.method.fits(back.tensors, (32, 64))
    # The shape messages show: (out, in), not (out, numel); OFT fits any input width.
    assert back.method.shape(back.tensors) == ((64, None) if name == "oft" else tuple(base.shape))
    conv = tuple(_weight(pipe, CONV).shape)
    conv_tensors = method.random_tensors(conv, rank, g)
    shape = method.shape(conv_tensors)
    assert shape[0] == conv[0] and (shape[1] is None if name == "oft" else math.prod(shape) == math.prod(conv))
    if name in ("lora", "full"):  # their tensors carry the kernel size
        assert shape == conv


# ---- OFT --------------------------------------------------------------------------------------------
def test_oft_blocks_apply_as_a_rotation_and_restore_exactly(pipe):
    from sd_lora.stack import apply_loras, remove_loras

    w = _weight(pipe, Q)
    wc = _weight(pipe, CONV)
    base, base_conv = w.detach().clone(), wc.detach().clone()
    g = torch.Generator().manual_seed(5)
    blocks = torch.randn(32, 2, 2, generator=g) * 0.2
    conv_blocks = torch.randn(32, 2, 2, generator=g) * 0.2
    lora = LoraFile({
        Q: LoraModule(Q, "oft", {"oft_blocks": blocks, "alpha": torch.tensor(0.0)}),
        CONV: LoraModule(CONV, "oft", {"oft_blocks": conv_blocks}),  # no alpha: unconstrained
    })
    for strength in (1.0, 0.5):
        apply_loras(pipe, [(lora, strength)])
        torch.testing.assert_close(w.detach(), base + strength * _oft_by_hand(blocks, base), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(wc.detach(), base_conv + strength * _oft_by_hand(conv_blocks, base_conv), atol=1e-5, rtol=1e-5)
        # A rotation keeps every block's row norms at strength 1.
        if strength == 1.0:
            torch.testing.assert_close(w.detach().reshape(32, 2, -1).norm(dim=(1, 2)), base.reshape(32, 2, -1).norm(dim=(1, 2)))
    remove_loras(pipe)
    assert torch.equal(w.detach(), base) and torch.equal(wc.detach(), base_conv)


def test_oft_constraint_is_alpha_times_out_features(pipe):
    base = _weight(pipe, Q).detach()
    blocks = torch.randn(32, 2, 2, generator=torch.Generator().manual_seed(7)) * 0.2
    alpha = 1e-3  # constraint 0.064 for 64 rows, well below ||Q||: the rotation is scaled down
    module = LoraModule(Q, "oft", {"oft_blocks": blocks, "alpha": torch.tensor(alpha)})
    delta = module.delta(base.shape, base_weight=base)
    torch.testing.assert_close(delta, _oft_by_hand(blocks, base, constraint=alpha * 64), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(delta, _oft_by_hand(blocks, base), atol=1e-4)  # the constraint did act


def test_oft_diag_and_rescale(pipe):
    base = _weight(pipe, Q).detach()
    theta = torch.linspace(-0.5, 0.5, 32)
    # oft_diag stores R itself: a rotation by theta per block; W'_k = R_k^T W_k.
    r = torch.stack([torch.stack([theta.cos(), theta.sin()], -1), torch.stack([-theta.sin(), theta.cos()], -1)], 1)
    rescale = torch.linspace(0.5, 1.5, 64).reshape(64, 1)
    module = LoraModule(Q, "oft", {"oft_diag": r, "rescale": rescale})
    c, s = theta.cos()[:, None], theta.sin()[:, None]
    rotated = torch.empty_like(base)
    rotated[0::2] = c * base[0::2] - s * base[1::2]
    rotated[1::2] = s * base[0::2] + c * base[1::2]
    torch.testing.assert_close(module.delta(base.shape, base_weight=base), rescale * rotated - base, atol=1e-6, rtol=1e-5)


def test_kohya_oft_file_names_read_as_lora_unet(pipe, tmp_path):
    from safetensors.torch import save_file

    blocks = torch.randn(32, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.1
    path = tmp_path / "kohya_oft.safetensors"
    # kohya's networks/oft.py names UNet modules oft_unet_<path>.
    save_file({Q.replace("lora_unet_", "oft_unet_") + ".oft_blocks": blocks, Q.replace("lora_unet_", "oft_unet_") + ".alpha": torch.tensor(1e-3)},
              str(path))
    lora = load_lora(path)
    assert list(lora.modules) == [Q] and lora.modules[Q].kind == "oft" and lora.format == "lycoris"


def test_oft_is_refused_by_the_tools_that_need_a_linear_delta(pipe, tmp_path):
    from sd_lora.tools import merge_loras, resize_lora

    blocks = torch.randn(32, 2, 2, generator=torch.Generator().manual_seed(2)) * 0.1
    lora = LoraFile({Q: LoraModule(Q, "oft", {"oft_blocks": blocks})}, arch="sd1")
    with pytest.raises(ValueError, match="depends on the base weights.*--into-model"):
        merge_loras([(lora, 0.5)])
    with pytest.raises(ValueError, match="depends on the base weights"):
        resize_lora(lora, rank=2)
    with pytest.raises(ValueError, match="needs the base weight"):
        lora.modules[Q].delta((64, 64))


# ---- exact merge / resize through the registry ----------------------------------------------------
def test_exact_merge_and_resize_follow_each_method(pipe):
    from sd_lora.tools import merge_loras, resize_lora

    g = torch.Generator().manual_seed(11)
    base = _weight(pipe, K).detach()
    loha = methods.get("loha").random_tensors(tuple(base.shape), 4, g) | {"alpha": torch.tensor(2.0)}
    lora = methods.get("lora").random_tensors(tuple(base.shape), 3, g) | {"alpha": torch.tensor(3.0)}
    a = LoraFile({K: LoraModule(K, "loha", loha)}, arch="sd1")
    b = LoraFile({K: LoraModule(K, "lora", lora)}, arch="sd1")
    # A module only one file has keeps its method, the weight folded into the tensor it is linear in.
    single = merge_loras([(a, 0.5)]).lora.modules[K]
    assert single.kind == "loha"
    torch.testing.assert_close(single.delta(base.shape), 0.5 * _reference_delta("loha", loha, base))
    # Two plain LoRAs merge exactly by concatenation (ranks add up).
    both = merge_loras([(b, 0.5), (b, 2.0)]).lora.modules[K]
    assert both.rank == 6
    torch.testing.assert_close(both.delta(base.shape), 2.5 * _reference_delta("lora", lora, base), atol=1e-5, rtol=1e-5)
    # Resizing a LoRA to a rank it already has is exact; a LoHa becomes a plain LoRA of that rank.
    same = resize_lora(b, rank=3)
    assert same.rel_error < 1e-6 and same.lora.modules[K].kind == "lora"
    assert resize_lora(a, rank=2).lora.modules[K].kind == "lora"


# ---- training-side facts per method ---------------------------------------------------------------
def test_metadata_names_each_trained_method():
    from sd_lora.formats import build_training_metadata
    import json

    expected = {
        "lora": ("networks.lora", {"conv_dim": "2", "conv_alpha": "1.0"}),
        "adalora": ("networks.lora", {"conv_dim": "2", "conv_alpha": "1.0"}),
        "dora": ("lycoris.kohya", {"algo": "lora", "dora_wd": "True", "conv_dim": "2", "conv_alpha": "1.0"}),
        "loha": ("lycoris.kohya", {"algo": "loha", "conv_dim": "2", "conv_alpha": "1.0"}),
        "lokr": ("lycoris.kohya", {"algo": "lokr", "conv_dim": "2", "conv_alpha": "1.0"}),
    }
    for name in methods.trainable_method_names():
        md = build_training_metadata("sd1", method=name, rank=4, alpha=2, conv_rank=2, conv_alpha=1.0, timestamp=0)
        module, args = expected[name]
        assert md["ss_network_module"] == module and json.loads(md["ss_network_args"]) == args, name
    assert "ss_network_args" not in build_training_metadata("sd1", method="lora", rank=4, alpha=2, timestamp=0)


def test_size_estimate_per_method():
    from sd_lora.network import NetworkConfig, inject_network
    from sd_lora.network.presets import estimate_file_bytes

    pipe = tiny_pipeline("sd1")
    for name in ("lora", "dora", "loha"):
        net = inject_network(pipe, NetworkConfig(method=name, preset="attention", rank=4, alpha=2))
        n = sum(v.numel() for v in net.kohya_state_dict().values())
        assert estimate_file_bytes(net.targets, net.config) == 2 * n, name
        net.remove()
    net = inject_network(pipe, NetworkConfig(method="lokr", preset="attention", rank=4, alpha=2))
    assert estimate_file_bytes(net.targets, net.config) is None  # factorisation-dependent: not guessed


def test_a_module_mixing_two_methods_keys_is_reported_not_guessed(tmp_path):
    from safetensors.torch import save_file

    from sd_lora.formats import LoraFormatError

    g = torch.Generator().manual_seed(4)
    sd = {f"{Q}.{k}": v for k, v in methods.get("lora").random_tensors((64, 64), 2, g).items()}
    sd[f"{Q}.hada_w1_a"] = torch.randn(64, 2, generator=g)
    sd[f"{K}.lora_down.weight"], sd[f"{K}.lora_up.weight"] = torch.randn(2, 32, generator=g), torch.randn(64, 2, generator=g)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(LoraFormatError, match="hada_w1_a"):
        load_lora(tmp_path / "mixed.safetensors")
    assert list(load_lora(tmp_path / "mixed.safetensors", strict=False).modules) == [K]
