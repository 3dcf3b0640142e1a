"""Sentence captions from a local image-to-text model: BLIP, BLIP-2, GIT, Florence-2 and similar.

Any model folder that transformers' `AutoProcessor` + `AutoModelForImageTextToText` can load works,
e.g. a downloaded Salesforce/blip-image-captioning-base or -large, Salesforce/blip2-opt-2.7b,
microsoft/git-base-coco or florence-community/Florence-2-base. Loading is local only
(`local_files_only=True`): nothing is downloaded, and a folder with files missing gets an error
naming them.

Generation is deterministic (beam search, no sampling), so the same images give the same captions.
"""

from __future__ import annotations

from pathlib import Path

from .base import Captioner, CaptionerError, Option, Source, register_captioner

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# Florence-2 is steered by a task token instead of free text.
DEFAULT_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}

_HOWTO = (
    "Point --model at a transformers model folder, e.g. one downloaded on a machine with internet with "
    "`huggingface-cli download Salesforce/blip-image-captioning-base --local-dir models/blip` and copied here."
)


def check_model_folder(path: Path) -> None:
    """Raise CaptionerError naming the missing files unless `path` looks like a loadable image-to-text folder."""
    if not path.is_dir():
        raise CaptionerError(f"model folder not found: {path}. {_HOWTO}")
    problems = []
    if not (path / "config.json").is_file():
        problems.append("config.json")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        problems.append("the weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).is_file() for f in PROCESSOR_FILES):
        problems.append("the image processor config (preprocessor_config.json or processor_config.json)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        problems.append("the tokenizer files (tokenizer.json, or vocab.txt / vocab.json + tokenizer_config.json)")
    if problems:
        raise CaptionerError(f"{path} is missing {'; '.join(problems)}. {_HOWTO}")


@register_captioner
class TransformersCaptioner(Captioner):
    name = "transformers"
    description = "sentence captions from a local BLIP / BLIP-2 / GIT / Florence-2 model folder (transformers)"
    options = {
        "model": Option(None, "the model folder (config.json, weights, processor and tokenizer files)"),
        "prompt": Option(None, "text the caption starts from, e.g. 'a photo of' (Florence-2: a task such as '<CAPTION>')"),
        "strip_prompt": Option(False, "remove the prompt from the start of the caption when the model repeats it"),
        "max_new_tokens": Option(75, "longest caption, in tokens"),
        "min_new_tokens": Option(0, "shortest caption, in tokens (stops a model from ending at once)"),
        "num_beams": Option(3, "beam search width (1 = greedy, fastest)"),
        "device": Option("auto", "'cuda', 'cpu' or 'auto' (CUDA when available)"),
        "dtype": Option("auto", "'float16', 'bfloat16', 'float32' or 'auto' (float16 on CUDA, float32 on CPU)"),
        "trust_remote_code": Option(False, "allow Python code shipped inside the model folder to run (older Florence-2 folders need it)"),
    }
    default_batch_size = 8

    def __init__(self, **options):
        super().__init__(**options)
        import torch

        if not self.config["model"]:
            raise CaptionerError(f"the transformers captioner needs --model FOLDER. {_HOWTO}")
        path = Path(self.config["model"])
        check_model_folder(path)
        device = self.config["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype_name = self.config["dtype"]
        if dtype_name == "auto":
            dtype_name = "float16" if device.startswith("cuda") else "float32"
        if dtype_name not in ("float16", "bfloat16", "float32"):
            raise CaptionerError(f"dtype must be float16, bfloat16, float32 or auto (got {dtype_name!r}).")
        self.device, self.dtype = torch.device(device), getattr(torch, dtype_name)

        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        remote = bool(self.config["trust_remote_code"])
        try:
            model_type = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=remote).model_type
            self.processor = AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
            self.model = AutoModelForImageTextToText.from_pretrained(
                path, local_files_only=True, trust_remote_code=remote, dtype=self.dtype
            )
        except (OSError, ValueError, KeyError) as e:
            raise CaptionerError(
                f"{path}: transformers cannot load this folder as an image-to-text model ({str(e).splitlines()[0]}). "
                "It must be a BLIP / BLIP-2 / GIT / Florence-2 style captioning model; a folder that ships its "
                "own Python code also needs trust_remote_code=True."
            ) from e
        self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", None) or self.processor
        if not hasattr(self.tokenizer, "batch_decode"):
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model_type = model_type
        self.prompt = self.config["prompt"] or DEFAULT_PROMPTS.get(model_type)

    def caption(self, sources: list[Source]) -> list[str]:
        import torch

        if not sources:
            return []
        images = [s.image for s in sources]
        if self.prompt and self.model_type == "git":
            # GIT continues the text after [CLS]; the tokenizer's closing [SEP] would end the caption at once.
            inputs = self.processor(images=images, return_tensors="pt")
            ids = [self.tokenizer.cls_token_id] + self.tokenizer(self.prompt, add_special_tokens=False).input_ids
            inputs["input_ids"] = torch.tensor([ids] * len(images))
        elif self.prompt:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs.pop("token_type_ids", None)  # BERT-style tokenizers add it; no captioning model's generate() takes it
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()
                  if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=int(self.config["max_new_tokens"]), min_new_tokens=int(self.config["min_new_tokens"]),
                num_beams=int(self.config["num_beams"]), do_sample=False,
            )
        texts = [" ".join(t.split()) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        if self.prompt and self.config["strip_prompt"]:
            p = " ".join(self.prompt.split()).lower()
            texts = [t[len(p):].lstrip(" ,:") if t.lower().startswith(p) else t for t in texts]
        return texts
