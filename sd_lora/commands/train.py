"""`sd-lora train [CONFIG.toml] [--flags]`: train a LoRA. A thin layer over `sd_lora.train`.

Every config key is also a flag, derived from its field (sd_lora/fields.py): `lr` -> `--lr`,
`[data] resolution` -> `--resolution`, `[network] rank` -> `--rank`, `[data] path` -> `--data`;
flags override the TOML file. kohya sd-scripts spellings that mean the same thing (`--network_dim`,
`--learning_rate`, `--max_train_steps`, `--output_dir` + `--output_name`, ...) are accepted too, and
the ones with no equivalent are answered with what to use instead. Importing this is torch-free, so
`sd-lora train --help` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

# kohya sd-scripts flags (train_network.py, library/train_util.py at 48d368f) that have no equivalent
# here, and what to do instead. The ones that do are declared on the fields (`kohya=`).
KOHYA_HINTS = {
    "unet_lr": "--lr is the UNet learning rate here (--text-encoder-lr the text encoder's)",
    "network_module": "choose the adapter with --method (networks.lora is --method lora; LyCORIS algos are --method loha / lokr)",
    "network_args": "conv layers: --preset full with --conv-rank / --conv-alpha; dropouts: --rank-dropout, --module-dropout; "
                    "block-wise: --block-dims, --block-alphas, --conv-block-dims, --down-lr-weight, ... (kohya's names as flags)",
    "save_model_as": "LoRA files are always written as .safetensors (kohya keys)",
    "xformers": "attention uses PyTorch's scaled-dot-product kernels; nothing to set",
    "sdpa": "attention uses PyTorch's scaled-dot-product kernels; nothing to set",
    "v2": "the architecture is read from the model; nothing to set",
}
# kohya's --output_dir + --output_name give --output; its output name defaults to "last"
# (library/train_util.py DEFAULT_LAST_OUTPUT_NAME)
KOHYA_OUTPUT = ("output_dir", "output_name")
KOHYA_DEFAULT_OUTPUT_NAME = "last"
_CFG = "cfg:"  # dest prefix of the flags that set a config key
_KOHYA = "kohya:"  # dest prefix of kohya switches that set a constant


class _TrainParser(argparse.ArgumentParser):
    """The train parser: answers an unknown flag with the closest known one, or with what kohya's flag is called here."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for extra in extras:
            if extra.startswith("--"):
                self.error(unknown_flag_message(self, extra.split("=", 1)[0]))
        return namespace, extras


def unknown_flag_message(parser: argparse.ArgumentParser, flag: str) -> str:
    name = flag[2:]
    if name in KOHYA_HINTS:
        return f"unrecognized argument {flag} (kohya): {KOHYA_HINTS[name]}"
    # every spelling the parser knows (hidden aliases too), answered with the flag --help shows for it
    shown = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}
    spellings = {}
    for action in parser._actions:
        dest = action.dest
        if dest.startswith(_KOHYA) and dest.count(":") == 2:
            dest = _CFG + dest.split(":")[1]
        for s in action.option_strings:
            spellings[s] = shown.get(dest, s)
    close = difflib.get_close_matches(flag, list(spellings), n=1, cutoff=0.7)
    hint = f" (did you mean {spellings[close[0]]}?)" if close else "; sd-lora train --help lists the flags"
    return f"unrecognized argument {flag}{hint}"


def _flag_type(key):
    """argparse `type=` for a key: its own coercion, with the message argparse shows."""

    def parse(text: str):
        try:
            return key.coerce(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None

    parse.__name__ = key.kind  # argparse names the type in "invalid <type> value"
    return parse


def _help(key) -> str:
    text = key.help_line()
    if key.kohya:
        text += " [kohya: " + ", ".join(f"--{name}" for name in key.kohya) + "]"
    return text.replace("%", "%%")


def register(subparsers) -> None:
    from ..config import config_keys

    p = subparsers.add_parser(
        "train",
        help="train a LoRA from a dataset folder (TOML config and/or flags)",
        description="Train a LoRA. Keys of the TOML config are also flags; flags win. kohya sd-scripts spellings "
        "(--network_dim, --learning_rate, --max_train_steps, --output_dir/--output_name, ...) work too. "
        "Ctrl-C (or creating the STOP file in the checkpoint folder) saves a resumable checkpoint.",
    )
    # add_parser builds the parent's parser class; this one only adds the unknown-flag answer
    p.__class__ = _TrainParser
    p.add_argument("config", nargs="?", help="TOML training config (see docs/training.md)")
    p.add_argument("--dry-run", action="store_true", help="validate, scan the dataset and print the step plan; load no model")
    p.add_argument("--json-events", action="store_true", help="print every event as a JSON line on stdout")
    groups = {None: p.add_argument_group("training"), "data": p.add_argument_group("data ([data] table)"),
              "network": p.add_argument_group("network ([network] table)")}
    for key in config_keys():
        if key.items is not None:  # a list of tables ([[data.subsets]]) is written in TOML only
            continue
        group, dest = groups[key.section], _CFG + key.name
        if key.kind == "bool":
            options = dict(action=argparse.BooleanOptionalAction)
        elif key.kind == "list":  # sample_prompts: one flag per prompt
            options = dict(action="append", metavar=key.metavar)
        elif key.kind == "dict" and "list" in key.types:  # optimizer_args: kohya's --optimizer_args k=v k=v
            options = dict(nargs="+", metavar=key.metavar)
        elif key.meta.get("keywords"):  # --resume alone means --resume latest
            options = dict(nargs="?", const=key.meta["keywords"][0], metavar=key.metavar, type=_flag_type(key))
        elif key.choices is not None:
            options = dict(choices=key.choices, metavar=key.metavar, type=_flag_type(key))
        else:
            options = dict(metavar=key.metavar, type=_flag_type(key))
        group.add_argument(key.flag, dest=dest, default=None, help=_help(key), **options)
        # hidden spellings: --batch_size for --batch-size, and kohya's names that take our value
        underscore = "--" + key.flag[2:].replace("-", "_")
        aliases = [f"--{name}" for name, const in key.kohya.items() if const is None]
        if underscore != key.flag and underscore[2:] not in key.kohya:
            aliases.append(underscore)
        for alias in aliases:
            if alias not in p._option_string_actions:
                group.add_argument(alias, dest=dest, default=None, help=argparse.SUPPRESS, **options)
        # kohya's value-less switches that set a constant (--flip_aug, --network_train_unet_only, ...)
        for name, const in key.kohya.items():
            if const is not None:
                group.add_argument(f"--{name}", dest=f"{_KOHYA}{key.name}:{name}", action="store_const", const=const,
                                   default=None, help=argparse.SUPPRESS)
    for name in KOHYA_OUTPUT:
        groups[None].add_argument(f"--{name}", dest=_KOHYA + name, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def config_from_args(args):
    """TrainConfig from an optional TOML file plus the flags that were given.

    A flag replaces the file's value; a flag for `steps` also clears the file's `epochs` (and the
    other way round), since the flag says how long to train.
    """
    from ..config import ConfigError, TrainConfig, config_keys, load_config
    from ..fields import assign

    cfg = load_config(args.config) if args.config else TrainConfig()
    given: dict[str, object] = {}
    for dest, value in vars(args).items():
        if dest.startswith(_CFG) and value is not None:
            name = dest[len(_CFG):]
            if name == "sample_prompts" and len(value) == 1 and Path(value[0]).is_file():
                value = value[0]  # one flag naming a prompts file
            given[name] = value
    for dest, value in vars(args).items():  # kohya switches, in declaration order (--cache_latents_to_disk beats --cache_latents)
        if dest.startswith(_KOHYA) and value is not None and dest.count(":") == 2:
            given[dest.split(":")[1]] = value
    output_dir, output_name = (getattr(args, _KOHYA + n, None) for n in KOHYA_OUTPUT)
    if output_dir is not None or output_name is not None:
        if "output" in given:
            raise ConfigError(["output: given twice; pass --output FILE or kohya's --output_dir/--output_name, not both"])
        given["output"] = str(Path(output_dir or ".") / f"{output_name or KOHYA_DEFAULT_OUTPUT_NAME}.safetensors")
    assign(cfg, config_keys(), given)
    _batch_size_from_dataset_config(cfg, given)
    return cfg


def _batch_size_from_dataset_config(cfg, given: dict) -> None:
    """kohya sets batch_size per dataset in its dataset config: take it from there unless a flag gave one (a
    flag that disagrees, or a file whose datasets disagree, is reported by validate())."""
    if not cfg.data.dataset_config_path or "batch_size" in given or not Path(cfg.data.dataset_config_path).is_file():
        return
    from ..data.kohya_config import read_dataset_config

    try:
        batch_size = read_dataset_config(cfg.data.dataset_config_path).batch_size
    except ValueError:
        return  # validate() lists the file's problems
    if batch_size is not None:
        cfg.batch_size = batch_size


def with_flags(message: str) -> str:
    """A config message with the flags of its keys: 'model: missing ...' -> 'model (--model): missing ...'."""
    from ..config import config_keys
    from ..fields import keys_of

    flags = {k.name: k.flag for k in config_keys()}
    names = [n for n in sorted(keys_of(message)) if n in flags]
    if not names or ":" not in message:
        return message
    head, rest = message.split(":", 1)
    return f"{head} ({' / '.join(flags[n] for n in names)}):{rest}"


def run(args) -> int:
    from ..config import ConfigError

    cfg = config_from_args(args)
    errors = cfg.validate()
    if errors:
        raise ConfigError([with_flags(e) for e in errors])
    if args.dry_run:
        import dataclasses

        from ..data import class_images
        from ..data.dataset import scan_dataset
        from ..training.loop import make_plan

        scanned = cfg.data
        images = class_images.plan(cfg)  # how many class images a run would render first (none rendered here)
        if images is not None:
            print(images.describe())
            if images.missing and class_images.reg_subset_is_empty(cfg):
                print("(the regularization folder has no image yet: the scan and steps below leave it out)")
                scanned = dataclasses.replace(cfg.data, reg_path=None)
            elif images.missing:
                print(f"(the scan and steps below count the {images.existing} regularization image(s) there now)")
        dataset = scan_dataset(scanned, seed=cfg.seed)  # the seed chooses the validation_split images
        print("\n".join(dataset.report.lines()))
        dataset.check()  # a refused layout fails the dry run as it would fail the run
        print("steps: " + make_plan(cfg, dataset, 1).describe(cfg, 1))
        return 0
    from ..logs import quiet_libraries
    from ..training import TrainingStopped, train

    quiet_libraries(getattr(args, "verbose", False))
    on_event = (lambda e: print(json.dumps(e, default=str), flush=True)) if args.json_events else None
    try:
        train(cfg, on_event=on_event)  # logs "saved <path>" for every LoRA file it writes
    except TrainingStopped as e:
        print(str(e), file=sys.stderr)
        return 130
    return 0
