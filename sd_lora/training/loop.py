"""The training loop: one readable function on top of accelerate.

    config.check()            every config error at once, before anything heavy
    scan_dataset()            images, captions, buckets; broken images listed and skipped
    plan                      images x repeats x epochs / batch / accumulation / processes = steps
    load_base + inject        base model frozen, LoRA adapters trainable (fp32)
    caches                    latents (VAE once per image) and text-encoder outputs (if frozen)
    loop                      noise -> UNet -> loss -> backward -> clip -> step, with events,
                              samples, saves, checkpoints and the validation loss every N steps
    finish                    the LoRA file and a last checkpoint (so a finished run can be
                              extended), then the final samples, a loss-curve PNG and a sample grid

Each setup phase returns what it makes (Model, Caches, Optimization, History below); `run` keeps
them, so where a value comes from is in its type. File names come from sd_lora.artifacts, event
kinds and fields from events.EVENTS.

Exact resume: the batches of an epoch are a function of (seed, epoch), and each step reseeds its
random draws (noise, timesteps, flips, random crops, colours, caption wildcards and dropouts, adapter
dropout) from (seed, step, micro batch, process). A checkpoint therefore needs only the step, the
weights and the optimizer state (and the EMA weights, training/ema.py, when ema_decay is set; the loss and validation-loss history), and a resumed run repeats the uninterrupted one bit for bit on the same machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import artifacts
from ..config import TrainConfig, dump_config
from ..data.augment import draw_view
from ..data.cache import LatentCache, TextCache, cache_folder
from ..data.captions import step_caption, tag_frequency
from ..data.dataset import Dataset, scan_dataset
from ..io import atomic_write
from ..models import ArchInfo
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_trainer_state, save_checkpoint
from .conditioning import TextConditioner, sdxl_time_ids
from .events import EventLog, rate_text
from .loss import (diffusion_loss, huber_threshold, noise_scheduler_for_training, noisy_latents, sample_noise,
                   sample_timesteps, training_target)
from .optim import applied_lr, applied_lrs, averaged_weights, choose_optimizer, network_param_groups, run_scheduler

logger = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """The run was stopped (stop flag, stop file or Ctrl-C) after saving a resumable checkpoint."""

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped at step {step}; checkpoint saved to {checkpoint}. Continue with --resume (or resume='latest').")


class TrainingOutOfMemory(ValueError):
    """Out of memory, with the settings that would lower the need named in the message."""


@dataclass
class Plan:
    images: int
    samples_per_epoch: int  # images x repeats
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int

    def describe(self, cfg: TrainConfig, world: int) -> str:
        return (
            f"{self.images} images x repeats = {self.samples_per_epoch} samples per epoch; "
            f"/ batch {cfg.batch_size} = {self.batches_per_epoch} batches (bucketed); "
            f"/ accumulation {cfg.gradient_accumulation} / {world} process(es) = {self.steps_per_epoch} steps per epoch; "
            f"x {self.epochs} epoch(s) = {self.total_steps} steps"
        )


def make_plan(cfg: TrainConfig, dataset: Dataset, world: int) -> Plan:
    batches = len(dataset.epoch_batches(0, cfg.batch_size, cfg.seed))
    per_step = cfg.gradient_accumulation * world
    steps_per_epoch = max(1, math.ceil(batches / per_step))
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    return Plan(len(dataset.items), dataset.num_repeated, batches, steps_per_epoch, total, math.ceil(total / steps_per_epoch))


@dataclass
class Model:
    """What _load_model makes: the base pipeline with the adapters injected, and how to train it."""

    pipe: object
    arch: ArchInfo
    network: object  # network.inject.LoraNetwork
    weight_dtype: torch.dtype  # of the frozen weights (the mixed-precision dtype); adapters stay fp32
    train_unet: bool
    train_te: bool
    noise_scheduler: object  # DDPMScheduler for the forward process
    conditioner: TextConditioner


@dataclass
class Caches:
    """What _build_caches makes: latents of every item (or the VAE to encode them), text outputs."""

    latents: LatentCache
    text: TextCache | None  # None when the text encoders run each step (trained, or shuffled captions)
    validation: object = None  # validation.ValidationSet of the held-out images, else None


@dataclass
class Optimization:
    """What _prepare_optimization makes: optimizer, schedule, and the modules as the loop calls them."""

    params: list[torch.nn.Parameter]
    optimizer: object
    scheduler: object
    choice: object  # optim.OptimizerChoice: which class, with which arguments (ss_optimizer)
    models: dict  # name -> module whose trainable parameters a checkpoint holds
    unet: torch.nn.Module  # wrapped by accelerate when it is trained
    text_encoders: list
    wrapped: list  # the DDP-wrapped modules (no gradient sync inside an accumulation window)
    ema: object = None  # ema.AdapterEMA of the adapter weights (ema_decay), else None


@dataclass
class History:
    """What a run carries across a resume: the loss per step and the sample images so far."""

    losses: list[tuple[int, float]]
    sample_paths: list[Path]
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # per validated step (validation.py)


def _seed_for(*parts) -> int:
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def train(config: TrainConfig, on_event=None, stop_event: threading.Event | None = None) -> Path:
    """Train a LoRA as `config` says; returns the path of the written LoRA file.

    on_event(dict) is called with every event (schema: training/events.py); the same events go to
    the run's events file (artifacts.events_file). Setting `stop_event` (or creating
    `config.stop_file`, or Ctrl-C) stops after the current step with a resumable checkpoint and
    raises TrainingStopped.
    """
    config.check()  # every config error at once, before loading anything
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    import os

    # Several processes but no GPU (`accelerate launch --multi_gpu` / `torchrun` on CPUs): accelerate
    # only picks the gloo CPU backend when told it is on the CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with other
    # settings (e.g. a bf16 run after an fp32 run in the same Python session): start from a clean
    # state each run. The PartialState (process group of a distributed launch) is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=multi_cpu,
        mixed_precision=config.mixed_precision,
        # SDXL's te1 last layer and adapter module dropout leave parameters unused in some steps.
        kwargs_handlers=[DistributedDataParallelKwargs(
            find_unused_parameters=config.network.train_text_encoder or config.network.module_dropout > 0)],
    )
    main = accelerator.is_main_process
    events = EventLog(config.events_path if main else None, on_event if main else None, sinks=_trackers(config) if main else None)
    threads = torch.get_num_threads()
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    try:
        return _Trainer(config, accelerator, events, stop_event).run()
    except TrainingStopped as e:
        events.emit("stopped", step=e.step, checkpoint=str(e.checkpoint))
        raise
    except Exception as e:
        events.emit("error", message=str(e))
        raise
    finally:
        events.close()
        torch.set_num_threads(threads)


def _trackers(config: TrainConfig) -> list:
    """The event sinks of config.trackers (log_with / tensorboard): TensorBoard and W&B logs beside the output."""
    from .events import TensorBoardSink, WandbSink

    sinks = []
    if "tensorboard" in config.trackers:
        folder = artifacts.tensorboard_dir(config.output_path)
        sinks.append(TensorBoardSink(folder))
        logger.info(f"TensorBoard: logging to {folder} (view it with: tensorboard --logdir {folder})")
    if "wandb" in config.trackers:
        # a resumed run continues the W&B run it started; a new run (no resume) starts a new one
        id_file = artifacts.wandb_run_id_file(config.output_path)
        run_id = None
        if config.resume and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        sink = WandbSink(artifacts.wandb_dir(config.output_path), config.log_tracker_name or "sd-lora",
                         config.wandb_run_name or config.output_path.stem, config=config.to_dict(), run_id=run_id)
        with atomic_write(id_file, "w", encoding="utf-8") as f:
            f.write(sink.run_id + "\n")
        sinks.append(sink)
        what = f"W&B: {'continuing' if run_id else 'new'} {sink.mode} run {sink.run_id}"
        logger.info(what + (f" in {sink.dir}; upload it with: wandb sync {sink.dir / 'wandb'}/offline-run-*"
                            if sink.mode == "offline" else ""))
    return sinks


class _Trainer:
    def __init__(self, cfg: TrainConfig, accelerator, events: EventLog, stop_event):
        self.cfg, self.acc, self.events, self.stop_event = cfg, accelerator, events, stop_event
        self.main = accelerator.is_main_process
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self._sigint = False
        # Progress bars on a terminal only: redrawn with \r they are noise in a log file (a web UI
        # job's log.txt, a redirected CLI), which gets a log line per logged step instead.
        self.bars = self.main and sys.stderr.isatty()

    def log(self, msg: str) -> None:
        if self.main:
            logger.info(msg)

    def warn(self, msg: str) -> None:
        """A warning for the user: in the log (CLI, job log) and as a "warning" event (web UI)."""
        if self.main:
            logger.warning("warning: %s", msg)
        self.events.emit("warning", message=msg)

    # ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.cfg
        if self.main:
            cfg.stop_file.unlink(missing_ok=True)  # a STOP left from an earlier run must not end this one
        # 1. data (before the model: a bad dataset fails in seconds), after rendering the class images it lacks
        if cfg.data.num_class_images:
            self._class_images()
        self.dataset = scan_dataset(cfg.data, seed=cfg.seed)
        for line in self.dataset.report.lines():
            self.log(line)
        self.events.emit("dataset", **self.dataset.report.to_dict())
        for message in self.dataset.report.warnings:  # in the log already (lines()); an event for the web UI
            self.events.emit("warning", message=message)
        self.dataset.check()  # refuses a folder one level too high, an empty N_name folder, no usable image
        self.plan = make_plan(cfg, self.dataset, self.world)
        self.log("steps: " + self.plan.describe(cfg, self.world))
        self.events.emit("start", **self.plan.__dict__, arithmetic=self.plan.describe(cfg, self.world),
                         batch_size=cfg.batch_size, gradient_accumulation=cfg.gradient_accumulation, processes=self.world)

        # Each phase returns what it makes; the loop and the saves read it from these attributes,
        # which are set here and nowhere else.
        # 2. model + network
        self.model = self._load_model()
        for message in cpu_warnings(cfg, self.acc.device.type, sum(p.numel() for p in self.model.pipe.unet.parameters())):
            self.warn(message)
        # 3. caches
        self.caches = self._build_caches(self.model)
        # 4. optimizer, schedule, accelerate
        self.opt = self._prepare_optimization(self.model)
        # 5. resume
        start, self.history = self._resume(self.opt)
        # 6. loop
        with self._sigint_handler():
            try:
                self._loop(start)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e) or "can't allocate memory" in str(e):
                    raise TrainingOutOfMemory(oom_advice(cfg, self.model.train_te)) from e
                raise
            # 7. finish (Ctrl-C here skips what is left of the final samples; the files are saved first)
            return self._finish()

    def _class_images(self) -> None:
        """Prior preservation's missing class images (data/class_images.py), rendered by the main process."""
        from ..data.class_images import ensure_class_images

        if self.main:
            progress = lambda done, total: self.events.emit("cache", stage="class_images", done=done, total=total)  # noqa: E731
            ensure_class_images(self.cfg, on_progress=progress, show_progress=self.bars, warn=self.warn)
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------------------------------
    def _load_model(self) -> Model:
        from ..models import (WeightReader, architecture_of, default_cpu_threads, load_base, load_vae, reload_in_dtype,
                              zero_terminal_snr_scheduler)
        from ..network.inject import inject_network

        cfg, acc = self.cfg, self.acc
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
        pipe = load_base(cfg.model, prediction_type=cfg.prediction_type)
        arch = architecture_of(pipe)
        self.log(f"model: {arch.description}, {arch.prediction_type}")
        if not cfg.cpu_threads and (threads := default_cpu_threads(pipe.unet, acc.device)):
            torch.set_num_threads(threads)  # train() puts torch's count back when the run ends
            self.log(f"cpu threads: {threads} (a small UNet on the CPU; set cpu_threads to choose)")
        if cfg.clip_skip and cfg.clip_skip > 1 and arch.is_sdxl:
            self.warn(f"clip_skip {cfg.clip_skip}: SDXL ignores clip skip (it reads both text encoders' penultimate layers, "
                      "as kohya and A1111 do); leave clip_skip unset for SDXL")
        if cfg.zero_terminal_snr:
            if arch.prediction_type != "v_prediction":
                raise ValueError(
                    f"zero_terminal_snr: {cfg.model} is an epsilon-prediction model, and zero terminal SNR needs "
                    "v-prediction. Use a v-prediction model (e.g. SD 2.x 768-v), or set prediction_type = "
                    "\"v_prediction\" to train this one into v-prediction, or set zero_terminal_snr = false."
                )
            if cfg.sample_prompts:
                zero_terminal_snr_scheduler(pipe.scheduler)  # a sampler that cannot do it fails now, not at the first sample
        if cfg.vae:
            pipe.vae = load_vae(cfg.vae, pipe)
            self.log(f"vae: {cfg.vae} (replaces the base model's)")
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is not None:
                m.requires_grad_(False)
        # Read frozen weights from the files in the dtype they will be kept in: converting the loaded
        # fp32 ones would first page in the whole fp32 file (SD1.5 bf16: 5.3 -> 3.0 GiB peak). A
        # smaller base precision converts layer by layer from the files (readers, below) instead.
        from .base_precision import STORAGE_DTYPES, apply_base_precision

        stored_small = cfg.base_precision is not None and STORAGE_DTYPES.get(cfg.base_precision) != weight_dtype
        readers = {}
        for name in ("unet", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is None:
                continue
            if stored_small:
                readers[name] = WeightReader.for_model(m)
            elif weight_dtype != torch.float32:
                reload_in_dtype(m, weight_dtype)
        torch.manual_seed(cfg.seed)  # adapter initialisation
        network = inject_network(pipe, cfg.network, total_steps=self.plan.total_steps, clip_skip=cfg.clip_skip)
        train_te = bool(network.text_encoder_parameters()) and cfg.te_lr > 0
        # base_precision (fp8/nf4/...): frozen Linear/Conv weights stored small, upcast per layer.
        applied = apply_base_precision(pipe, cfg.base_precision, weight_dtype, readers)
        if applied["layers"]:
            self.log(f"base_precision {cfg.base_precision}: {applied['layers']} frozen layers stored small")
        # Frozen base weights in the mixed-precision dtype (half the memory); adapters stay fp32.
        device = acc.device
        for name in ("unet", "text_encoder", "text_encoder_2"):
            m = getattr(pipe, name, None)
            if m is None:
                continue
            for p in m.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(weight_dtype)
            m.to(device)
        # The VAE stays fp32 for fp16 runs (the SD VAE overflows in fp16); bf16 is safe.
        pipe.vae.to(device, torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32)
        if cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if train_te:
                for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
                    if te is not None:
                        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        noise_scheduler = noise_scheduler_for_training(pipe.scheduler.config, cfg.zero_terminal_snr)
        return Model(pipe, arch, network, weight_dtype, train_unet=bool(network.unet_parameters()), train_te=train_te,
                     noise_scheduler=noise_scheduler,
                     conditioner=TextConditioner(pipe, arch.is_sdxl, max_token_length=cfg.max_token_length,
                                                 clip_skip=cfg.clip_skip, warn=self.warn))

    def _build_caches(self, model: Model) -> Caches:
        cfg, d = self.cfg, self.cfg.data
        items = self.dataset.items
        cache_dir = cache_folder(d, items)
        latents = LatentCache(items, model.pipe.vae, d.cache_latents, cache_dir, None, d.max_image_pixels)  # flip: per subset
        if d.cache_latents == "disk" and not self.main:
            self.acc.wait_for_everyone()  # the main process writes the disk cache, the others read it
        t0 = time.time()
        counts = latents.build(
            on_progress=lambda done, total: self.events.emit("cache", stage="latents", done=done, total=total) if self.main else None,
            show_progress=self.bars,
        )
        if d.cache_latents == "disk" and self.main:
            self.acc.wait_for_everyone()
        if d.cache_latents != "none":
            self.log(f"latents: {counts['encoded']} encoded, {counts['reused']} reused from {cache_dir if d.cache_latents == 'disk' else 'RAM'} "
                     f"({time.time() - t0:.1f} s)")
        if self.main:  # long captions: one warning per caption cut, with its file (conditioning.py)
            model.conditioner.check_captions((line, str(i.path)) for i in items for line in i.caption.split("\n"))
        text = None
        captions = self.dataset.cacheable_captions()  # None when a subset shuffles its captions
        if not model.train_te and d.cache_text and captions is not None:
            text = TextCache(cache_dir if d.cache_text_to_disk else None)
            counts = text.build(captions, model.conditioner, self.acc.device, show_progress=self.bars)
            if d.cache_text_to_disk:
                self.log(f"text: {counts['encoded']} encoded, {counts['reused']} reused from {cache_dir}")
            self.events.emit("cache", stage="text", done=len(text.hidden), total=len(text.hidden))
        validation = None
        if self.dataset.validation:  # encoded now: the VAE encoder is freed below
            from .validation import ValidationSet

            seed = cfg.seed if d.validation_seed is None else d.validation_seed
            validation = ValidationSet.build(self.dataset.validation, model.pipe.vae, d, cache_dir, text, model.conditioner,
                                             self.acc.device, seed, show_progress=self.bars)
        if d.cache_latents != "none":
            # Every latent is cached: the VAE encoder is never needed again, and the decoder only
            # for sample images. Freeing them lowers the peak memory of the training steps.
            model.pipe.vae.encoder = None
            if not cfg.sample_prompts:
                model.pipe.vae.decoder = None
        return Caches(latents, text, validation)

    def _prepare_optimization(self, model: Model) -> Optimization:
        cfg, acc, pipe = self.cfg, self.acc, model.pipe
        groups = network_param_groups(model.network, model.train_te, cfg)
        choice = choose_optimizer(cfg, self.plan.total_steps, acc.device.type)
        for message in choice.warnings:
            self.warn(message)
        optimizer = choice.build(groups)
        self.log(f"optimizer: {choice.label}; groups: " + ", ".join(f"{g['name']} lr {g['lr']:g}" for g in groups))
        # The scheduler is stepped by us once per optimizer step (not prepared: accelerate would
        # step it once per process).
        scheduler = run_scheduler(cfg, optimizer, choice, self.plan.total_steps)
        unet = acc.prepare(pipe.unet) if model.train_unet else pipe.unet
        text_encoders = [
            acc.prepare(te) if (model.train_te and any(p.requires_grad for p in te.parameters())) else te
            for te in model.conditioner.encoders
        ]
        params = [p for g in groups for p in g["params"]]
        ema = None
        if cfg.ema_decay:
            from .ema import AdapterEMA

            ema = AdapterEMA(params, cfg.ema_decay, cfg.ema_update_every, cfg.ema_warmup)
        return Optimization(
            params=params,
            optimizer=acc.prepare(optimizer),
            scheduler=scheduler,
            choice=choice,
            models={name: getattr(pipe, name, None) for name in ("unet", "text_encoder", "text_encoder_2")},
            unet=unet,
            text_encoders=text_encoders,
            wrapped=[m for m in [unet, *text_encoders] if m is not None and m is not getattr(m, "module", m)],
            ema=ema,
        )

    def _resume(self, opt: Optimization) -> tuple[int, History]:
        """(the step to start from, the history so far): (0, empty) without resume."""
        cfg = self.cfg
        if not cfg.resume:
            return 0, History([], [])
        folder = latest_checkpoint(cfg.checkpoint_root) if cfg.resume == "latest" else Path(cfg.resume)
        if folder is None:
            raise ValueError(f"resume: no checkpoint found in {cfg.checkpoint_root}; train without --resume first")
        saved = read_trainer_state(folder)
        if saved.get("processes", 1) != self.world:
            self.warn(f"the checkpoint was written by {saved.get('processes')} process(es), this run has "
                      f"{self.world}: training continues, but the data order differs from the original run")
        if int(saved["step"]) > self.plan.total_steps:
            raise ValueError(f"resume: {folder} is at step {saved['step']}, past this run's {self.plan.total_steps} steps; "
                             f"set steps to more than {saved['step']} to train on from it")
        state = load_checkpoint(folder, opt.models, opt.optimizer, opt.scheduler, getattr(self.acc, "scaler", None), opt.ema)
        if state.get("ema_loaded") is False:
            self.warn(f"ema_decay: {folder} was saved without EMA weights; the EMA starts from the resumed weights")
        # A run extended past the one that wrote the checkpoint has a longer schedule: the learning
        # rate of the next step comes from this run's schedule, not the saved one.
        follow_schedule(opt.scheduler)
        step = int(state["step"])
        history = History(losses=[(int(s), float(v)) for s, v in state.get("losses", [])],
                          sample_paths=[Path(p) for p in state.get("samples", []) if Path(p).is_file()],
                          val_losses=[(int(s), float(v)) for s, v in state.get("val_losses", [])])
        self.log(f"resumed from {folder} at step {step} of {self.plan.total_steps}")
        self.events.emit("resumed", step=step, checkpoint=str(folder), losses=[list(x) for x in history.losses],
                         val_losses=[list(x) for x in history.val_losses])
        return step, history

    # ------------------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """This process's own view (no collective: the sampler asks it on the main process only)."""
        return self._sigint or (self.stop_event is not None and self.stop_event.is_set()) or self.cfg.stop_file.exists()

    def _should_stop(self) -> bool:
        local = self._stop_requested()
        if self.world > 1:  # every process must agree, or the others would wait for it forever
            flag = torch.tensor([1.0 if local else 0.0], device=self.acc.device)
            local = bool(self.acc.reduce(flag, reduction="sum").item() > 0)
        return local

    @contextlib.contextmanager
    def _sigint_handler(self):
        """First Ctrl-C: finish the step, save a checkpoint, stop. Second Ctrl-C: stop at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._sigint:
                raise KeyboardInterrupt
            self._sigint = True
            if self.main:
                print("\nstopping after this step (Ctrl-C again to abort without saving) ...", flush=True)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _batch(self, idxs: list[int], rng: random.Random, epoch: int):
        d, device = self.cfg.data, self.acc.device
        items = [self.dataset.items[i] for i in idxs]
        flips = [it.flip and rng.random() < 0.5 for it in items]
        captions = [step_caption(it.caption, it.subset, rng, epoch) for it in items]  # the subset's caption options
        views = [draw_view(it.placement, it.subset, f, rng) for it, f in zip(items, flips)]  # random crop, colour (#19)
        entries = [self.caches.latents.get_with_mask(i, v.flipped, v) for i, v in zip(idxs, views)]
        latents = torch.stack([lat for lat, _ in entries]).to(device, torch.float32)
        masks = None
        if any(m is not None for _, m in entries):  # masked loss: an item without a mask trains everywhere (kohya: ones)
            masks = torch.stack([m if m is not None else torch.ones_like(lat[:1]) for lat, m in entries]).to(device, torch.float32)
        weights = torch.tensor([d.prior_loss_weight if it.is_reg else 1.0 for it in items], device=device)
        placements = [v.conditioned for v in views]  # SDXL's time ids: the crop really used, mirrored with the image
        return latents, captions, weights, placements, masks

    def _loss(self, idxs: list[int], step: int, micro: int) -> torch.Tensor:
        cfg = self.cfg
        key = (cfg.seed, step, micro, self.rank)
        rng = random.Random(_seed_for("aug", *key))
        generator = torch.Generator().manual_seed(_seed_for("noise", *key))
        torch.manual_seed(_seed_for("torch", *key))  # adapter dropout draws from the global RNG
        latents, captions, weights, placements, masks = self._batch(idxs, rng, step // self.plan.steps_per_epoch)
        device, model, text_cache = self.acc.device, self.model, self.caches.text
        with self.acc.autocast():
            if text_cache is not None:
                hidden, pooled = text_cache.get(captions)
                hidden = hidden.to(device, model.weight_dtype)
                pooled = pooled.to(device, model.weight_dtype) if pooled is not None else None
            elif model.train_te:
                hidden, pooled = model.conditioner.encode(captions, device, encoders=self.opt.text_encoders)
            else:
                with torch.no_grad():
                    hidden, pooled = model.conditioner.encode(captions, device)
        loss = compute_loss(cfg, model, self.opt.unet, latents, hidden, pooled, placements, weights, generator, self.acc.autocast,
                            masks=masks)
        reg = model.network.regularization_loss()
        return loss + reg if isinstance(reg, torch.Tensor) else loss

    def _loop(self, start: int) -> None:
        cfg, acc, plan = self.cfg, self.acc, self.plan
        accum = cfg.gradient_accumulation
        for m in [self.opt.unet, *self.opt.text_encoders]:
            m.train()
        from tqdm.auto import tqdm

        # smoothing=0: the bar prints the average since the start, the number the step events carry (it_per_s)
        bar = tqdm(total=plan.total_steps, initial=start, desc="training", unit="step", disable=not self.bars, dynamic_ncols=True,
                   smoothing=0)
        epoch_cache: tuple[int, list] = (-1, [])
        t_start, n_done, nan_streak = time.time(), 0, 0
        step = start

        def logged(n: int) -> bool:  # a step event follows step n (counted from 1)
            return n % cfg.log_every == 0 or n == plan.total_steps

        while step < plan.total_steps:
            grad_norm = None
            if self._should_stop():
                path = self._save_checkpoint(step)
                bar.close()
                raise TrainingStopped(step, path)
            epoch, pos = divmod(step, plan.steps_per_epoch)
            if epoch_cache[0] != epoch:
                epoch_cache = (epoch, self.dataset.epoch_batches(epoch, cfg.batch_size, cfg.seed))
            batches = epoch_cache[1]
            total = torch.zeros((), device=acc.device)
            for micro in range(accum):
                idxs = batches[((pos * accum + micro) * self.world + self.rank) % len(batches)]
                sync = micro == accum - 1
                ctx = contextlib.ExitStack()
                if not sync:
                    for m in self.opt.wrapped:
                        ctx.enter_context(acc.no_sync(m))
                with ctx:
                    loss = self._loss(idxs, step, micro)
                    acc.backward(loss / accum)
                total += loss.detach().float() / accum
            mean_loss = acc.reduce(total, reduction="mean").item() if self.world > 1 else total.item()
            if not math.isfinite(mean_loss):
                # NaN guard: skip the update (the fp16 grad scaler lowers its scale on its own).
                nan_streak += 1
                self.opt.optimizer.zero_grad(set_to_none=True)
                self.warn(f"step {step + 1}: loss is {mean_loss}; update skipped")
                if nan_streak >= 5:
                    # The last checkpoint saved before the streak began (steps are counted from 1 here).
                    good = [c for c in list_checkpoints(cfg.checkpoint_root) if artifacts.checkpoint_step(c) < step - 3]
                    last = good[-1] if good else None
                    raise ValueError(
                        f"step {step + 1}: the loss was NaN/inf 5 steps in a row (since step {step - 3}). Lower lr, use "
                        "bf16 instead of fp16, set max_grad_norm = 1.0, or check the base model for NaN weights. "
                        + (f"The last good checkpoint is {last}: continue from it with resume = \"{last}\"."
                           if last else "No checkpoint was saved before this; start again with the changes.")
                    )
            else:
                nan_streak = 0
                if cfg.max_grad_norm or logged(step + 1):
                    # the norm before clipping, for the step event; infinity as the bound only measures it
                    # (accelerate unscales fp16 gradients first either way)
                    grad_norm = float(acc.clip_grad_norm_(self.opt.params, cfg.max_grad_norm or math.inf))
                self.opt.optimizer.step()
                self.model.network.update_ranks(step)
                if self.opt.ema is not None:
                    self.opt.ema.after_step(step + 1)
                self.opt.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                # After a skipped (NaN) update torch warns that the schedule steps before the optimizer;
                # the schedule follows the step count on purpose.
                warnings.simplefilter("ignore", UserWarning)
                self.opt.scheduler.step()
            step += 1
            n_done += 1
            self.history.losses.append((step, mean_loss))
            elapsed = time.time() - t_start
            it_s = n_done / elapsed if elapsed > 0 else 0.0
            eta = (plan.total_steps - step) / it_s if it_s > 0 else None
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            bar.update()
            if logged(step):
                self.events.emit("step", step=step, total_steps=plan.total_steps, epoch=epoch + 1, loss=mean_loss,
                                 lr=applied_lr(self.opt.optimizer, self.opt.scheduler),
                                 lrs=applied_lrs(self.opt.optimizer, self.opt.scheduler),
                                 grad_norm=grad_norm if math.isfinite(mean_loss) else None, it_per_s=round(it_s, 4),
                                 eta_s=None if eta is None else round(eta, 1))
                if not self.bars:
                    self.log(f"step {step}/{plan.total_steps}: loss {mean_loss:.4f}, {rate_text(it_s)}"
                             + (f", ETA {eta:.0f} s" if eta is not None else ""))
            if self.caches.validation is not None and self._validation_due(step):
                self._validate(step)
            end_of_epoch = step % plan.steps_per_epoch == 0
            if step < plan.total_steps and (
                (cfg.save_every and step % cfg.save_every == 0)
                or (cfg.save_every_epochs and end_of_epoch and (step // plan.steps_per_epoch) % cfg.save_every_epochs == 0)
            ):
                self._save_lora(artifacts.intermediate_lora(cfg.output_path, step), step)
                self._save_checkpoint(step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                self._samples(step)  # a stop while sampling ends it; the check above then saves the checkpoint
        bar.close()

    def _validation_due(self, step: int) -> bool:
        from .validation import validation_due

        return validation_due(step, self.plan.total_steps, self.plan.steps_per_epoch, self.cfg.validate_every_n_steps,
                              self.cfg.validate_every_n_epochs)

    def _validate(self, step: int) -> None:
        """The validation loss of the weights after `step` (training/validation.py), as a "val" event. Every process
        scores its share of the images; the modules go back to training mode after."""
        from .validation import evaluating

        v = self.caches.validation
        modules = [self.model.pipe.unet, *self.model.conditioner.encoders]
        with self._eval_weights(), evaluating(modules):
            total, count = v.loss_sum(self.cfg, self.model, self.acc.device, self.acc.autocast, self.rank, self.world)
        if self.world > 1:
            both = self.acc.reduce(torch.tensor([total, float(count)], dtype=torch.float64, device=self.acc.device), reduction="sum")
            total, count = float(both[0]), int(both[1])
        loss = total / max(count, 1)
        self.history.val_losses.append((step, loss))
        images = min(len(v.items), self.cfg.max_validation_steps or len(v.items))
        self.events.emit("val", step=step, loss=loss, images=images)
        if not self.bars:
            self.log(f"step {step}/{self.plan.total_steps}: validation loss {loss:.4f} ({images} image(s))")

    # ------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict:
        return {
            "losses": self.history.losses,
            "samples": [str(p) for p in self.history.sample_paths],
            "val_losses": self.history.val_losses,
            "processes": self.world,
            "config": dump_config(self.cfg),
        }

    def _save_checkpoint(self, step: int) -> Path:
        path = self.cfg.checkpoint_root / artifacts.checkpoint_name(step)
        if self.main:
            path = save_checkpoint(self.cfg.checkpoint_root, step, self.opt.models, self.opt.optimizer, self.opt.scheduler,
                                   getattr(self.acc, "scaler", None), self._trainer_state(), self.cfg.keep_checkpoints,
                                   ema=self.opt.ema)
            self.cfg.stop_file.unlink(missing_ok=True)  # handled: a resume must not stop again at once
            self.events.emit("checkpoint", step=step, path=str(path))
        self.acc.wait_for_everyone()
        return path

    def _metadata(self, step: int) -> dict[str, str]:
        """The settings' metadata (each field says where it goes: sd_lora/fields.py settings_metadata), then
        what this run did, which only the trainer knows (steps, images, the learning rates really used)."""
        from ..config import config_metadata
        from ..formats.metadata import build_training_metadata

        cfg, rep = self.cfg, self.dataset.report
        captions: dict[str, list[str]] = {}
        for it in self.dataset.items:
            if not it.is_reg:
                captions.setdefault(it.folder, []).append(it.caption)
        run = build_training_metadata(
            arch=self.model.arch.arch,
            prediction_type=self.model.arch.prediction_type,  # what was trained (cfg or the base's scheduler)
            **self.model.network.metadata_fields(),
            resolution=cfg.data.resolution,
            tag_frequency=tag_frequency(captions),
            dataset_dirs={k: {"n_repeats": v, "img_count": sum(1 for i in self.dataset.items if i.folder == k)}
                          for k, v in rep.folders.items()},
            output_name=cfg.output_path.stem,
            steps=step,
            max_train_steps=self.plan.total_steps,
            epoch=math.ceil(step / self.plan.steps_per_epoch),
            num_epochs=self.plan.epochs,
            num_train_images=rep.images,
            num_reg_images=rep.reg_images,
            num_batches_per_epoch=self.plan.batches_per_epoch,
            learning_rate=cfg.unet_lr,  # the rate used: lr, or the optimizer's default when lr is unset
            unet_lr=cfg.unet_lr if self.model.train_unet else 0.0,
            text_encoder_lr=cfg.te_lr if self.model.train_te else 0.0,
            cache_latents=cfg.data.cache_latents != "none",  # kohya writes a bool
            clip_skip=cfg.clip_skip,  # also modelspec.encoder_layer, as kohya's sai_model_spec writes it
            optimizer=self.opt.choice.label,  # the class that ran and its arguments, kohya's "module.Class(args)"
        )
        return {**config_metadata(cfg), **run}

    def _eval_weights(self):
        """Schedule-free optimizers: the averaged weights while sampling and saving (training ones restored after)."""
        return averaged_weights(self.opt.optimizer, self.opt.choice.spec, self.opt.params)

    def _save_lora(self, path: Path, step: int) -> Path:
        if self.main:
            from ..formats.kohya import save_lora

            metadata = self._metadata(step)
            with self._eval_weights():
                path = save_lora(path, self.model.network, metadata)
            self.log(f"saved {path}")
            self.events.emit("saved", step=step, path=str(path))
            if self.opt.ema is not None:
                # The EMA of the training weights (with schedule-free ones: of y, not the averaged x)
                from .ema import EMA_METADATA_KEY

                with self.opt.ema.swapped_in():
                    ema_path = save_lora(artifacts.ema_lora(path), self.model.network, {**metadata, EMA_METADATA_KEY: "true"})
                self.log(f"saved {ema_path} (EMA weights)")
        self.acc.wait_for_everyone()
        return path

    def _samples(self, step: int) -> bool:
        """Render the sample prompts with the weights of `step`; False when a stop (Ctrl-C, stop flag
        or file) interrupted them (the images finished before it are kept)."""
        complete = True
        if self.main:
            from tqdm.auto import tqdm

            from .sampling import SamplingInterrupted, load_prompts, render_samples

            prompts = load_prompts(self.cfg.sample_prompts)
            steps = [sp.steps or self.cfg.sample_steps for sp in prompts]
            total, t0, last = sum(steps), time.time(), [0.0]
            self.log(f"samples for step {step}: {len(prompts)} prompt(s), {total} sampler steps")
            bar = tqdm(total=total, desc=f"samples (step {step})", unit="step", leave=False, dynamic_ncols=True,
                       disable=not self.bars)

            def progress(i: int, n: int, s: int, of: int) -> None:
                bar.update()
                done = sum(steps[:i]) + s
                now = time.time()
                if s == 1 or s == of or now - last[0] >= 1.0:  # at most about one event a second
                    last[0] = now
                    eta = (now - t0) / done * (total - done)
                    self.events.emit("sampling", step=step, prompt=i + 1, prompts=n, sampler_step=s, sampler_steps=of,
                                     eta_s=round(eta, 1))
                    if s == of and bar.disable:  # no bar (a log file): one line per finished image
                        self.log(f"samples for step {step}: prompt {i + 1}/{n} done, ETA {eta:.0f} s")

            try:
                use_ema = self.cfg.ema_samples and self.opt.ema is not None
                with (self.opt.ema.swapped_in() if use_ema else self._eval_weights()):
                    paths = render_samples(self.model.pipe, prompts, self.cfg.output_path, step, self.cfg.data.resolution,
                                           self.cfg.sample_steps, self.cfg.seed, autocast=self.acc.autocast,
                                           guidance_rescale=self.cfg.guidance_rescale,
                                           zero_terminal_snr=self.cfg.zero_terminal_snr,
                                           on_progress=progress, should_stop=self._stop_requested, clip_skip=self.cfg.clip_skip,
                                           sampler=self.cfg.sample_sampler, model=self.cfg.model, vae=self.cfg.vae)
            except (SamplingInterrupted, KeyboardInterrupt) as e:
                paths, complete = getattr(e, "paths", []), False
                self.log(f"samples for step {step} interrupted after {len(paths)} of {len(prompts)} image(s)")
            finally:
                bar.close()
            self.history.sample_paths += paths
            if paths:
                self.events.emit("sample", step=step, paths=[str(p) for p in paths])
        self.acc.wait_for_everyone()
        return complete

    def _finish(self) -> Path:
        """The files first (LoRA, then a checkpoint of the last step so `--resume --steps MORE` can
        extend the run), the final samples after: a Ctrl-C while they render (minutes at 512 px on a
        CPU) keeps the saved files, skips the rest of the samples and still ends with "done"."""
        from .report import draw_loss_curve, draw_sample_grid

        cfg, losses = self.cfg, self.history.losses
        step = self.plan.total_steps
        path = self._save_lora(cfg.output_path, step)
        self._save_checkpoint(step)
        if cfg.sample_prompts and not any((artifacts.sample_step(p) or (None,))[0] == step for p in self.history.sample_paths):
            if not self._samples(step):  # always finish with samples of the final weights, unless stopped
                self.warn(f"final samples interrupted; {path} and the checkpoint of step {step} are saved")
        if self.main:
            out = cfg.output_path
            curve = draw_loss_curve([s for s, _ in losses], [v for _, v in losses], artifacts.loss_curve(out),
                                    validation=self.history.val_losses) if losses else None
            grid = draw_sample_grid(self.history.sample_paths, artifacts.sample_grid(out))
            self.events.emit("done", step=step, path=str(path), loss_curve=str(curve) if curve else None,
                             sample_grid=str(grid) if grid else None)
        return path


def compute_loss(cfg: TrainConfig, model: Model, unet, latents: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                 placements: list, weights: torch.Tensor, generator: torch.Generator, autocast=contextlib.nullcontext,
                 masks: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-batch's diffusion loss from its latents and text conditioning (training/loss.py has
    the formulas): noise, timesteps and perturbations drawn from `generator`, the UNet's prediction,
    the target, the weighted loss. tests/test_reference_math.py checks it against the reference scripts."""
    noise_scheduler, device = model.noise_scheduler, latents.device
    # the noise in fp32, outside autocast (the pyramid's interpolation must not run in half precision)
    noise = sample_noise(latents, generator, cfg)
    timesteps = sample_timesteps(latents.shape[0], noise_scheduler.config.num_train_timesteps, generator, device,
                                 cfg.min_timestep, cfg.max_timestep)
    noisy = noisy_latents(noise_scheduler, latents, noise, timesteps, generator, cfg)
    with autocast():
        extra = {}
        if model.arch.is_sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": sdxl_time_ids(placements, device, hidden.dtype)}
        pred = unet(noisy.to(model.weight_dtype), timesteps, hidden, **extra).sample
    target = training_target(noise_scheduler, latents, noise, timesteps)
    return diffusion_loss(pred, target, timesteps, noise_scheduler, weights, cfg.min_snr_gamma, loss_type=cfg.loss_type,
                          huber_c=huber_threshold(timesteps, noise_scheduler, cfg), debiased_estimation=cfg.debiased_estimation_loss,
                          mask=masks)


def follow_schedule(scheduler) -> None:
    """Set the optimizer's learning rates to what `scheduler`'s own schedule gives at its current step.

    diffusers' schedules are torch LambdaLRs, whose state_dict keeps the step but not the schedule
    (a closure): after loading a checkpoint of a shorter run, the optimizer holds that run's rate.
    The same formula LambdaLR.step uses, so an unchanged schedule gives bit-identical rates.
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    lrs = [base * lam(scheduler.last_epoch) for lam, base in zip(lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


# bf16 against fp32 on the 2-core AVX2 dev VM (no AVX512-BF16/AMX), one torch thread, 12 steps at
# 64 px, batch 1, rank 4 (2026-12-01): the tiny base (UNet 2.6M parameters) trained at 2.98 it/s in
# fp32 and 0.45 it/s in bf16 (0.15x; 1.04 vs 0.16 it/s, 0.15x, with another run beside it): on small
# layers the casts cost more than the bf16 math saves. Full-size SD1.5 is the other way round on the
# same VM (bench/README.md: 2.49 s/step fp32, 1.58 s/step bf16), so only small UNets
# (models.SMALL_UNET_PARAMS) get the warning.
def cpu_warnings(cfg: TrainConfig, device_type: str, unet_parameters: int) -> list[str]:
    """Settings that make a CPU run much slower than it needs to be, said before training starts."""
    if device_type != "cpu":
        return []
    out = []
    if cfg.sample_prompts:
        from ..sample_prompts import load_prompts
        from .sampling import sample_size

        sizes = [sample_size(sp, cfg.data.resolution) for sp in load_prompts(cfg.sample_prompts)]
        w, h = max(sizes, key=lambda wh: wh[0] * wh[1])
        ratio = w * h / cfg.data.resolution ** 2
        if ratio >= 4:
            out.append(
                f"sample images of {w}x{h} on the CPU: each sampler step costs about {ratio:.0f}x a training step at "
                f"{cfg.data.resolution} px (x {cfg.sample_steps} steps x {len(sizes)} prompts, twice with guidance). "
                "Set --w/--h in the prompt lines near the training resolution, or sample less often")
    from ..models import SMALL_UNET_PARAMS

    if cfg.mixed_precision == "bf16" and unet_parameters < SMALL_UNET_PARAMS:
        out.append(
            f"mixed_precision = \"bf16\" on the CPU with a small UNet ({unet_parameters / 1e6:.1f}M parameters) is slower "
            "than fp32 (the tiny base trained at 0.15x of fp32's speed): use mixed_precision = \"no\" for this model")
    return out


def oom_advice(cfg: TrainConfig, train_te: bool) -> str:
    """What to change after running out of memory, most effective first, for this config."""
    tips = []
    if cfg.batch_size > 1:
        tips.append(f"batch_size = 1 with gradient_accumulation = {cfg.batch_size * cfg.gradient_accumulation} (same effective batch)")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing = true (much less activation memory, ~30 % slower)")
    if cfg.mixed_precision == "no":
        tips.append("mixed_precision = \"bf16\" (or \"fp16\" on older GPUs): half-size base weights")
    if cfg.base_precision not in ("fp8", "nf4", "int8"):
        tips.append("base_precision = \"fp8\" (frozen base weights in 8 bits, about half of bf16; any device), "
                    "or \"nf4\" on CUDA (4 bits)")
    if cfg.optimizer == "adamw":
        tips.append("optimizer = \"adamw8bit\" (optimizer state in 8 bits)")
    if cfg.data.cache_latents == "none":
        tips.append("data.cache_latents = \"ram\" or \"disk\" (no VAE encoding during training; without random_crop / "
                    "color_aug, which need it off)")
    if train_te:
        tips.append("network.train_text_encoder = false (frees the text-encoder activations; its outputs are then cached)")
    if cfg.data.resolution > 512:
        tips.append(f"data.resolution = {cfg.data.resolution - 128} (memory grows with the pixel count)")
    tips.append(f"network.rank lower than {cfg.network.rank}")
    return "out of memory. Settings that lower the memory needed, most effective first:\n  - " + "\n  - ".join(tips)
