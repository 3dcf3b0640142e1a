"""Low-memory frozen base: keep the UNet / text-encoder weights in a small dtype and train the LoRA on top.

The QLoRA idea applied to Stable Diffusion. The base model is frozen, so its weights only need to be
*read* at full precision, one layer at a time, inside that layer's forward (and again in backward,
to pass the gradient on to the adapters of earlier layers). Stored small, they take:

    fp32  4 bytes/weight    bf16 / fp16  2 bytes    fp8  1 byte (+ one fp32 scale per output channel)
    nf4   ~0.5 byte (bitsandbytes, CUDA only)        int8  1 byte (bitsandbytes, CUDA only)

How (`apply_base_precision`, called after the adapters are injected, so they stay fp32):

- fp8 / fp16 / bf16 storage that differs from the compute dtype: every frozen `nn.Linear` and
  `nn.Conv2d` of the UNet and text encoders - including the `base_layer` that a PEFT adapter wraps -
  is replaced by `UpcastLinear` / `UpcastConv2d`. They store the weight as a buffer in the small dtype
  and upcast it inside forward. PEFT calls `base_layer(x)`, so adapters work on top unchanged; DoRA
  and LoHa/LoKr read `base_layer.weight`, which is a property returning the upcast weight.
  fp8 (torch.float8_e4m3fn, largest value 448) keeps one fp32 scale per output channel: below ~1e-2
  unscaled e4m3 turns subnormal and loses bits (relative weight error, Gaussian weights: std 0.02
  3.3 %, std 0.005 11 %, std 0.001 56 %); scaled it is 2.6 % at any magnitude (bf16: 0.17 %).
- The upcast copy is not kept for backward: a small autograd Function saves the stored weight and
  upcasts again in backward (what bitsandbytes does for 4-bit). Otherwise autograd would hold a
  full-precision copy of every layer from forward to backward and the saving would be gone.
- nf4 / int8: frozen `nn.Linear` layers become bitsandbytes `Linear4bit` / `Linear8bitLt`, which
  quantize when moved to the GPU (`model.to("cuda")`). Convs stay in the compute dtype (bitsandbytes
  has no conv layer). CUDA only: bitsandbytes' quantized matmuls have no CPU path we rely on.

Why not diffusers' `ModelMixin.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn)`: it casts
the whole module with `module.to(dtype)` before and after every forward, with no scale (so small
weights lose most of their bits), and it covers diffusers models only (not the transformers text
encoders). One mechanism here serves the UNet and the text encoders, on any device.

Norms, embeddings and biases are small; they stay in the compute dtype. The LoRA file saved at the
end is an ordinary LoRA for the unquantized base (only adapter weights are saved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import BASE_PRECISIONS, config_key, quantized_base_problems

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def precision_problems(precision: str | None, cuda: bool | None = None) -> list[str]:
    """Why `precision` cannot be used here ([] when it can), as 'base_precision: ...; do ...' strings.

    The choices and the nf4/int8 requirements are the config's (checked there before anything loads).
    """
    if precision is None:
        return []
    if precision not in BASE_PRECISIONS:
        return [config_key("base_precision").problem(precision)]
    if precision in ("nf4", "int8"):
        return quantized_base_problems(precision, torch.cuda.is_available() if cuda is None else cuda)
    return []


# ---- quantization ---------------------------------------------------------------------------------

def quantize(weight: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored weight, scale or None). fp8 gets one fp32 scale per output channel (dim 0)."""
    if storage != torch.float8_e4m3fn:
        return weight.detach().to(storage), None
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(-1, *([1] * (w.dim() - 1)))
    return (w / scale).to(torch.float8_e4m3fn), scale


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale).to(dtype)  # the product in fp32: a bf16 scale would add its own error


class _UpcastLinearFn(torch.autograd.Function):
    """y = x W^T + b with W upcast from storage; backward upcasts W again instead of saving the copy."""

    @staticmethod
    def forward(ctx, x, stored, scale, bias, dtype):
        ctx.save_for_backward(stored, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), dequantize(stored, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        stored, scale = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ dequantize(stored, scale, ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


class _UpcastConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, stored, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(stored, scale)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.conv = (stride, padding, dilation, groups)
        w = dequantize(stored, scale, dtype)
        return F.conv2d(x.to(dtype), w, None if bias is None else bias.to(dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        stored, scale = ctx.saved_tensors
        w = dequantize(stored, scale, ctx.dtype)
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad.to(ctx.dtype), *ctx.conv)
        return (grad_x.to(ctx.x_dtype),) + (None,) * 8


class _Upcast:
    """Shared parts of UpcastLinear / UpcastConv2d: the stored weight, its scale and `.weight`."""

    @classmethod
    def convert(cls, layer: nn.Module, storage: torch.dtype, compute: torch.dtype):
        """Turn `layer` (an nn.Linear / nn.Conv2d) into this class in place and return it.

        In place, not a new module: other holders of the layer (the network's target list, PEFT's
        wrapper) then see the small weight, and the full-precision one is really freed.
        """
        weight, bias = layer.weight, layer.bias
        del layer._parameters["weight"]
        layer._parameters.pop("bias", None)
        layer.__class__ = cls  # what torch.nn.utils.parametrize does too; all other attributes stay
        layer._store(weight, bias, storage, compute)
        return layer

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None, storage: torch.dtype, compute: torch.dtype):
        stored, scale = quantize(weight, storage)
        self.register_buffer("stored_weight", stored)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute), requires_grad=False)
        self.compute_dtype = compute

    @property
    def weight(self) -> torch.Tensor:
        """The upcast weight (a fresh tensor; assigning to it changes nothing). For DoRA, LoHa, LoKr."""
        return dequantize(self.stored_weight, self.weight_scale, self.compute_dtype)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.stored_weight.dtype


class UpcastLinear(_Upcast, nn.Linear):
    """A frozen nn.Linear whose weight is stored in fp8/fp16/bf16 and upcast to `compute` in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastLinearFn.apply(x, self.stored_weight, self.weight_scale, self.bias, self.compute_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage_dtype}, compute={self.compute_dtype}"


class UpcastConv2d(_Upcast, nn.Conv2d):
    """A frozen nn.Conv2d (zero padding) whose weight is stored small and upcast in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _UpcastConv2dFn.apply(x, self.stored_weight, self.weight_scale, self.bias, self.compute_dtype,
                                     self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"storage={self.storage_dtype}, compute={self.compute_dtype}")


# ---- applying it to a pipeline --------------------------------------------------------------------

def _frozen_layers(model: nn.Module, classes: tuple[type, ...]):
    """(parent, attribute, layer) for every frozen layer of exactly these classes (adapters excluded)."""
    found = []
    for parent in model.modules():
        for attr, child in parent.named_children():
            if type(child) in classes and not child.weight.requires_grad:
                found.append((parent, attr, child))
    return found


def _bnb_layer(linear: nn.Linear, precision: str, compute: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    has_bias = linear.bias is not None
    if precision == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.detach().to(compute), requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.detach().to(compute), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute), requires_grad=False)
    return layer  # quantized by bitsandbytes when moved to the GPU


def apply_base_precision(pipe, precision: str | None, compute_dtype: torch.dtype, readers: dict | None = None) -> dict[str, int]:
    """Store the frozen Linear/Conv2d weights of pipe's UNet and text encoders in `precision`, in place.

    Call after the adapters are injected (they stay trainable and fp32) and before moving the models
    to the device (nf4/int8 quantize on that move). `compute_dtype` is what each layer upcasts to.
    precision None, or a dtype equal to compute_dtype, changes nothing (plain casting is the caller's).
    `readers` ({component: sd_lora.models.WeightReader}) give each layer's weight read from the file
    just before it is converted, so the loaded (memory-mapped) full-precision weights are never paged
    in: peak memory is the small weights plus one layer, not the whole full-precision model.
    Returns {"layers": replaced layers, "bytes": weight bytes of the UNet + text encoders afterwards}.
    """
    problems = precision_problems(precision)
    if problems:
        raise ValueError("; ".join(problems))
    replaced = 0
    if precision is not None and STORAGE_DTYPES.get(precision, None) != compute_dtype:
        classes = (nn.Linear,) if precision in ("nf4", "int8") else (nn.Linear, nn.Conv2d)
        for name in COMPONENTS:
            model = getattr(pipe, name, None)
            if model is None:
                continue
            reader = (readers or {}).get(name)
            path_of = {id(m): p for p, m in model.named_modules()} if reader is not None else {}
            for parent, attr, layer in _frozen_layers(model, classes):
                key = path_of.get(id(layer), "").replace(".base_layer", "") + ".weight"  # PEFT wraps the layer
                if reader is not None and key in reader:
                    layer.weight.data = reader.read(key)
                if precision in ("nf4", "int8"):
                    setattr(parent, attr, _bnb_layer(layer, precision, compute_dtype))
                    # The replaced layer may still be referenced (the network's target list): drop
                    # its weight so the full-precision copy is freed; its shape attributes stay.
                    layer.weight = nn.Parameter(layer.weight.new_empty(0), requires_grad=False)
                elif isinstance(layer, nn.Conv2d):
                    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                        continue  # not in SD models; left as it is rather than guessed at
                    UpcastConv2d.convert(layer, STORAGE_DTYPES[precision], compute_dtype)
                else:
                    UpcastLinear.convert(layer, STORAGE_DTYPES[precision], compute_dtype)
                replaced += 1
            _ddp_skip_stored_weights(model)
    return {"layers": replaced, "bytes": sum(model_bytes(getattr(pipe, n)) for n in COMPONENTS if getattr(pipe, n, None) is not None)}


def _ddp_skip_stored_weights(model: nn.Module) -> None:
    """Keep DistributedDataParallel from broadcasting the stored weights at every forward.

    DDP syncs buffers (broadcast_buffers=True) at the start of each forward: that would send the whole
    frozen base every step. Every process quantizes the same weights the same way, so there is
    nothing to sync; this is what DistributedDataParallel._set_params_and_buffers_to_ignore_for_model
    records, set directly so that no process group is needed here.
    """
    names = [n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in ("stored_weight", "weight_scale")]
    model._ddp_params_and_buffers_to_ignore = sorted(set(getattr(model, "_ddp_params_and_buffers_to_ignore", [])) | set(names))


def model_bytes(model: nn.Module) -> int:
    """Bytes held by a model's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
