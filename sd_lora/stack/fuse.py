"""Put a weighted stack of LoRA files into a diffusers pipeline's weights, and take it out exactly.

How (the A1111 approach, made declarative):
  * Each base weight a stack touches is copied once ("backup") before it is first changed.
  * A module's new weight is computed from its backup: W = backup + sum_i w_i * delta_i, accumulated
    in fp32 and rounded once to the weight's dtype. Plain LoRA/LoCon factors of all files that touch
    a module are concatenated so the whole stack is one `addmm` per module (no dense delta is kept).
  * `apply_loras(pipe, stack)` describes the target state. Modules whose contribution (which files,
    which weights) is unchanged are not touched; the others are recomputed from their backup, so the
    previous stack never leaks into the next one, and `remove_loras` copies backups back: the base
    weights come back bit for bit (never by subtracting, which would leave rounding residue).
  * Everything that can fail on the user's input (reading, matching names, shapes, architecture) is
    checked before the first weight is written: an error leaves the pipeline exactly as it was.

Generating with a fused stack costs nothing extra: the UNet runs its ordinary Linear/Conv layers.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch

from ..formats.lora_file import LoraFile, LoraModule
from ..models import architecture_of
from ..network.naming import module_index, unet_diffusers_to_sgm, unet_layout
from .cache import LoraCache, default_cache
from .block_weights import OTHER, unet_block_id
from .spec import LoraSpec, normalize_stack

logger = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_STATE_ATTR = "_sd_lora_stack_state"

# A target is one base parameter: (component, module path, "weight" | "bias").
TargetKey = tuple[str, str, str]
# One contribution to a target: (file key, kohya module name, multiplier).
Contribution = tuple[tuple, str, float]


@dataclass
class _Target:
    module: torch.nn.Module
    param: str  # "weight" or "bias"
    backup: torch.Tensor  # the original bits, on the CPU (a view into a block shared with other targets)
    fused: bool = False  # the weight differs from its backup

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.param)


@dataclass
class _State:
    """What is fused into one set of pipeline components (kept on the UNet, so txt2img, img2img and
    inpaint pipelines built from the same components share it)."""

    models: dict[str, int] = field(default_factory=dict)  # component -> id(model) the state refers to
    targets: dict[TargetKey, _Target] = field(default_factory=dict)
    # Backup memory of weights that went back to the base, kept to back them up into again: fresh
    # memory is slow to fault in on small VMs, and a server applies and removes stacks all day.
    spare: dict[TargetKey, torch.Tensor] = field(default_factory=dict)
    applied: dict[TargetKey, tuple[Contribution, ...]] = field(default_factory=dict)
    files: dict[tuple, LoraFile] = field(default_factory=dict)  # files of the applied stack (kept alive)
    specs: list[LoraSpec] = field(default_factory=list)
    index: dict | None = None  # kohya name -> (component, path, module), both UNet layouts
    modules: dict[tuple[str, str], torch.nn.Module] = field(default_factory=dict)  # (component, path) -> module
    arch: str | None = None
    resolved: dict[tuple, dict[str, TargetKey]] = field(default_factory=dict)  # (file key, strict) -> name -> target
    block_of: dict[str, str | None] = field(default_factory=dict)  # unet module path -> block id


@dataclass
class AppliedStack:
    """What `apply_loras` did: the stack now in the pipeline and how much it had to change."""

    specs: list[LoraSpec]
    files: list[LoraFile]
    modules: int  # base weights that now differ from the base
    changed: int  # base weights written by this call

    @property
    def trigger_words(self) -> list[str]:
        """Trigger words of the applied LoRAs (from `ss_tag_frequency`), in stack order, without repeats."""
        seen: list[str] = []
        for lora, spec in zip(self.files, self.specs):
            if spec.unet_weight == 0 and spec.text_encoder_weight == 0:
                continue
            for w in lora.trigger_words[:3]:
                if w not in seen:
                    seen.append(w)
        return seen


def _components(pipe) -> dict[str, torch.nn.Module]:
    comps = {name: getattr(pipe, name, None) for name in COMPONENTS}
    comps = {k: v for k, v in comps.items() if v is not None}
    if "unet" not in comps:
        raise TypeError(f"{type(pipe).__name__} has no `unet`; apply_loras needs a Stable Diffusion (SD1/SD2/SDXL) pipeline.")
    return comps


def _state(pipe, create: bool = False) -> _State | None:
    unet = pipe.unet
    st = unet.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = _State()
        unet.__dict__[_STATE_ATTR] = st  # plain attribute: not a parameter, buffer or submodule
    return st


def _sync_state(pipe, st: _State) -> None:
    """Forget targets of components that were replaced on the pipeline since the last call."""
    comps = _components(pipe)
    ids = {k: id(v) for k, v in comps.items()}
    if st.models and st.models != ids:
        stale = {k for k in set(st.models) | set(ids) if st.models.get(k) != ids.get(k)}
        dropped = [t for t in st.targets if t[0] in stale]
        if dropped:
            logger.warning("Pipeline components %s were replaced; forgetting %d LoRA backups of the old ones.", sorted(stale), len(dropped))
        for t in dropped:
            st.targets.pop(t, None)
            st.applied.pop(t, None)
        st.spare = {t: b for t, b in st.spare.items() if t[0] not in stale}
        st.index, st.resolved, st.block_of = None, {}, {}
    st.models = ids
    if st.index is None:
        st.arch = architecture_of(pipe).arch
        st.index = module_index(comps, st.arch)
        st.modules = {(c, p): m for c, p, m in st.index.values()}


def _load(spec: LoraSpec, cache: LoraCache) -> tuple[tuple, LoraFile]:
    if isinstance(spec.path, LoraFile):
        return ("memory", id(spec.path)), spec.path
    return cache.get(spec.path)


def _resolve(pipe, st: _State, key: tuple, lora: LoraFile, label: str, strict: bool) -> dict[str, TargetKey]:
    """kohya module name -> target key, for every module of `lora` (checked against the pipeline)."""
    if (key, strict) in st.resolved:
        return st.resolved[(key, strict)]
    from ..formats.read import match_lora

    try:
        # Architecture, names (both UNet layouts, `text_model_` prefixes) and delta sizes.
        matched = match_lora(lora, pipe, strict=strict)
    except ValueError as e:
        if label in str(e):
            raise
        raise ValueError(f"{label}: {e}") from e
    out: dict[str, TargetKey] = {}
    for name, (component, path, module) in matched.items():
        # Exact shapes too (a conv kernel of the wrong size can have the right number of elements).
        _check_shapes(label, name, lora.modules[name], module)
        out[name] = (component, path, "weight")
    if key[0] != "memory":  # in-memory LoraFiles may be edited between calls: match them each time
        if len(st.resolved) > 256:
            st.resolved.pop(next(iter(st.resolved)))
        st.resolved[(key, strict)] = out
    return out


def _check_shapes(label: str, name: str, mod: LoraModule, module: torch.nn.Module) -> None:
    """Raise a ValueError naming file and module unless `mod`'s delta fits `module`'s weight."""
    shape = tuple(module.weight.shape)
    try:
        # The method checks (by arithmetic, or its delta formula on meta tensors: shapes only).
        if not mod.method.fits(mod.tensors, shape):
            raise RuntimeError(f"{mod.kind} factors {', '.join(f'{k} {tuple(v.shape)}' for k, v in mod.tensors.items() if v.dim())}")
        b = mod.bias_delta()
        if b is not None and (module.bias is None or tuple(b.shape) != tuple(module.bias.shape)):
            raise RuntimeError(f"bias delta {tuple(b.shape)}")
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise ValueError(
            f"{label}: module {name} does not fit the pipeline's layer (weight {shape}): {e}. "
            "The LoRA was made for a different model (architecture or size)."
        ) from None


def _block_multiplier(st: _State, pipe, spec_blocks: dict[str, float], component: str, path: str) -> float:
    if not spec_blocks or component != "unet":
        return 1.0
    if path not in st.block_of:
        try:
            sgm = unet_diffusers_to_sgm(path, **unet_layout(pipe.unet))
        except KeyError:
            sgm = ""
        st.block_of[path] = unet_block_id(sgm)
    block = st.block_of[path]
    return spec_blocks.get(OTHER if block is None else block, 1.0)


def apply_loras(pipe, stack, *, strict: bool = True, cache: LoraCache | None = None) -> AppliedStack:
    """Make `pipe`'s weights equal the base plus exactly `stack` (declarative: replaces any previous stack).

    Args:
        pipe: a diffusers SD1/SD2/SDXL pipeline (txt2img, img2img, inpaint, ...).
        stack: a list of LoraSpec, paths, or tuples `(path, unet_weight[, te_weight])`; empty = base.
        strict: refuse files with modules that match no layer (default). False applies the rest.
        cache: where parsed files are kept between calls (default: the shared cache, see
            `sd_lora.stack.set_cache_limit`).

    Returns an `AppliedStack` (applied files, their trigger words, how many weights changed).
    Raises ValueError / FileNotFoundError naming the file (and module) at fault; the pipeline is then
    unchanged.
    """
    specs = normalize_stack(stack)
    cache = default_cache() if cache is None else cache
    st = _state(pipe, create=True)
    _sync_state(pipe, st)

    # 1. Read, match and check everything; nothing is written yet.
    files: dict[tuple, LoraFile] = {}
    wanted: dict[TargetKey, list[Contribution]] = {}
    loaded: list[LoraFile] = []
    for spec in specs:
        key, lora = _load(spec, cache)
        loaded.append(lora)
        resolved = _resolve(pipe, st, key, lora, spec.label, strict)
        blocks = spec.block_multipliers(st.arch)
        files[key] = lora
        for name, target in resolved.items():
            component, path, _ = target
            w = spec.unet_weight * _block_multiplier(st, pipe, blocks, component, path) if component == "unet" else spec.text_encoder_weight
            if w == 0:
                continue  # weight 0 is the base, exactly
            wanted.setdefault(target, []).append((key, name, float(w)))
            if lora.modules[name].bias_delta() is not None:
                wanted.setdefault((component, path, "bias"), []).append((key, name, float(w)))
    new = {t: tuple(c) for t, c in wanted.items()}
    changed = sorted(t for t in set(new) | set(st.applied) if new.get(t, ()) != st.applied.get(t, ()))
    for t in changed:
        if t not in st.targets:
            module = st.modules[t[:2]]
            if getattr(module, t[2]).device.type == "meta":
                raise ValueError(
                    f"{t[0]}.{t[1]} has no weights in memory (meta device), as with enable_sequential_cpu_offload. "
                    "Apply LoRAs before enabling sequential offload, or use enable_model_cpu_offload."
                )

    # 2. Back up the weights changed for the first time (an allocation failure here changes nothing),
    #    then write. Any failure while writing (e.g. out of memory) puts back what this call changed.
    all_files = {**st.files, **files}
    done: list[TargetKey] = []
    try:
        with torch.no_grad():
            _back_up(st, [t for t in changed if t not in st.targets and new.get(t)])
            for t in changed:
                done.append(t)  # before writing: a write that fails half-way is put back too
                _write(st, t, new.get(t, ()), all_files, cache)
    except BaseException:
        with torch.no_grad():
            for t in done:
                try:
                    _write(st, t, st.applied.get(t, ()), all_files, cache)
                except BaseException:  # pragma: no cover - last resort: back to the base weight
                    _write(st, t, (), all_files)
                    st.applied.pop(t, None)
        for t in [t for t in st.targets if t not in st.applied]:
            _release(st, t)  # backed up by this call, never written or written back: holds the base
        raise
    for t in changed:
        if new.get(t):
            st.applied[t] = new[t]
        else:
            st.applied.pop(t, None)
    st.files, st.specs = files, specs
    logger.debug("apply_loras: %d LoRA(s), %d weights changed, %d fused", len(specs), len(changed), len(st.applied))
    return AppliedStack(specs=specs, files=loaded, modules=len(st.applied), changed=len(changed))


def _back_up(st: _State, keys: list[TargetKey]) -> None:
    """Copy the exact original bits of these weights into CPU memory (on a GPU this keeps VRAM free,
    as A1111 does), one block per dtype for all of them.

    One block rather than a tensor per weight: on small VMs each fresh allocation above glibc's mmap
    threshold is mapped, page-faulted and unmapped on its own, which made a cold apply of an SD1.5
    attention stack (176 weights, 490 MB) 3x slower, and the holes the backups left in the heap
    slowed every later image by up to 30 % (bench/bench_stack.py, bench/malloc.py). A block is
    faulted in one sweep and given back whole when the last of its weights returns to the base.
    """
    by_dtype: dict[torch.dtype, list[TargetKey]] = {}
    for t in keys:
        param = getattr(st.modules[t[:2]], t[2])
        spare = st.spare.pop(t, None)
        if spare is not None and spare.shape == param.shape and spare.dtype == param.dtype:
            spare.copy_(param.detach())  # the weight as it is now: the base may have been changed since
            st.targets[t] = _Target(module=st.modules[t[:2]], param=t[2], backup=spare)
        else:
            by_dtype.setdefault(param.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        params = [getattr(st.modules[t[:2]], t[2]).detach() for t in group]
        block = torch.empty(sum(p.numel() for p in params), dtype=dtype, device="cpu")
        offset = 0
        for t, p in zip(group, params):
            backup = block[offset : offset + p.numel()].view(p.shape)
            backup.copy_(p)
            offset += p.numel()
            st.targets[t] = _Target(module=st.modules[t[:2]], param=t[2], backup=backup)


def _release(st: _State, t: TargetKey) -> None:
    """Forget the backup of a weight that holds the base again, keeping its memory as a spare."""
    st.spare[t] = st.targets.pop(t).backup


def _write(st: _State, t: TargetKey, contributions: tuple[Contribution, ...], files: dict[tuple, LoraFile],
           cache: LoraCache | None = None) -> None:
    """Set target `t` to backup + its contributions (or back to the backup when there are none)."""
    target = st.targets.get(t)
    if target is None:
        return  # not backed up, so never changed: it holds the base already
    param = target.tensor
    if not contributions:
        param.copy_(target.backup)
        _release(st, t)  # back to the base
        return

    device = param.device
    backup = target.backup
    ups, downs, dense = [], [], []
    for key, name, w in contributions:
        mod = files[key].modules[name]
        if t[2] == "bias":
            dense.append(mod.bias_delta().to(device) * w)
        elif (factors := mod.factors()) is not None:  # plain LoRA/LoCon: joins this layer's one low-rank update
            up, down = factors
            ups.append(up.to(device) * (mod.scale * w))
            downs.append(down.to(device))
        elif mod.needs_base or cache is None or key[0] == "memory":  # (in-memory files may change between calls)
            dense.append(mod.delta(param.shape, base_weight=backup, device=device).mul_(w))
        else:
            d = cache.dense_delta((key, name, tuple(param.shape), str(device)),
                                  lambda mod=mod: mod.delta(param.shape, device=device))
            dense.append(d * w)  # (not in place: d may be the cache's)

    rows = param.shape[0]
    if param.dtype == torch.float32 and device.type == "cpu" and param.is_contiguous():
        # fp32 on the CPU: backup + U @ D straight into the weight (no copy when it holds the backup).
        out2d = param.view(rows, -1)
        if target.fused:  # (a weight that still holds its backup's bits needs no copy)
            out2d.copy_(backup.view(rows, -1))
        target.fused = True  # from here on the weight may differ from the backup
        if ups:  # all plain LoRA factors on this layer as one rank-(sum of ranks) update
            out2d.addmm_(torch.cat(ups, 1), torch.cat(downs, 0))
        for d in dense:
            param.add_(d.reshape(param.shape))
        return
    # Low precision or an accelerator: accumulate in fp32, round once.
    acc = backup.to(device=device, dtype=torch.float32, copy=True)
    if ups:
        acc.view(rows, -1).addmm_(torch.cat(ups, 1), torch.cat(downs, 0))
    for d in dense:
        acc.add_(d.reshape(acc.shape))
    target.fused = True
    param.copy_(acc)


def remove_loras(pipe, *, free_memory: bool = False) -> None:
    """Restore every weight a stack changed to its original bits, and forget the stack.

    The backup memory (the size of the weights the stack touched, on the CPU) is kept for the next
    `apply_loras`, which then backs up into memory that is already mapped; `free_memory=True`
    gives it back.
    """
    st = _state(pipe)
    if st is None:
        return
    with torch.no_grad():
        for t, target in list(st.targets.items()):
            target.tensor.copy_(target.backup)
            _release(st, t)
    st.applied.clear()
    st.files, st.specs = {}, []
    if free_memory:
        st.spare.clear()


def applied_stack(pipe) -> list[LoraSpec]:
    """The stack currently fused into `pipe` (empty for the base)."""
    st = _state(pipe)
    return list(st.specs) if st is not None else []


@contextlib.contextmanager
def loras(pipe, stack, **kwargs):
    """`with loras(pipe, stack):` applies `stack` for the block and puts back the previous state after,
    bit for bit (the previous stack, or the base)."""
    previous = applied_stack(pipe)
    info = apply_loras(pipe, stack, **kwargs)
    try:
        yield info
    finally:
        if previous:
            apply_loras(pipe, previous, **kwargs)
        else:
            remove_loras(pipe)
