"""The one loader every tool uses: a model folder, LoRAs in order -> tokenizer, template, model.

Contract: ``load(spec, with_model=True) -> Loaded`` for a ``ModelSpec`` (a base or merged model
folder, zero or more LoRA folders applied in the order given, tokenizer folder, template name,
system prompt, device, dtype, k-bit loading). Every check is made once, from the files, before any
weight is read: the model folder, each adapter, the tokenizer against the vocabulary it will index,
the template (and that its end-of-turn token is in the vocabulary). Then:

- tokenizer: ``--tokenizer_path``, else the last LoRA's that has one, else the model's;
- template: ``--prompt_template``, else the ``template.json`` of the last LoRA that has one, else
  the model's; else, after a pre-training LoRA (``training_args.json`` says so), text continued as
  written (the ``none`` template); else ``alpaca`` with a warning (merge: none, and no
  ``template.json`` is written). ``--system_prompt`` replaces the template's;
- model: the base with each LoRA merged in through PEFT (``merge_and_unload``), on the device; with
  ``load_in_kbits`` 4 or 8 the base quantised and one LoRA kept beside it, unmerged (folding it into
  quantised weights would round it away).

``with_model=False`` stops before the weights: merge and export stream them shard by shard
(``tools.weights``, whose arithmetic gives PEFT's logits: tests/test_merge.py) and preview needs
none. ``quantization_config`` is the one BitsAndBytesConfig of training and inference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import (
    ModelError,
    adapter_vocab_rows,
    check_adapter_dir,
    check_model_dir,
    check_vocab,
    first_line,
    has_tokenizer,
    model_vocab_size,
    read_adapter_config,
)
from .data.templates import TEMPLATE_FILE, Template, load_template
from .data.tokenizer import TextTokenizer, TokenizerError
from .quiet import loading_bar_on_terminal_only

logger = logging.getLogger("llama_sft")

DEFAULT_TEMPLATE = "alpaca"
KBITS = (4, 8, 16)


@dataclass
class ModelSpec:
    """What to load; each field is the flag of the same name in chat, serve, merge, export and eval."""

    base_model: str | Path | None
    lora_models: list[str | Path] = field(default_factory=list)
    tokenizer_path: str | Path | None = None
    prompt_template: str | None = None
    system_prompt: str | None = None
    device: str = "auto"
    torch_dtype: str = "auto"
    load_in_kbits: int = 16
    # How the base folder is named in messages (serve's --model, train's --model_name_or_path).
    base_flag: str = "--base_model"

    @classmethod
    def from_flags(cls, args, base_model=None, base_flag: str = "--base_model") -> ModelSpec:
        """From parsed flags of the same names (``options.add_model_flags``)."""
        return cls(
            base_model or args.base_model,
            args.lora_model,
            args.tokenizer_path,
            args.prompt_template,
            args.system_prompt,
            args.device,
            args.torch_dtype,
            getattr(args, "load_in_kbits", 16),
            base_flag,
        )


@dataclass
class Loaded:
    spec: ModelSpec
    tokenizer: TextTokenizer
    template: Template
    model: torch.nn.Module | None = None

    @property
    def name(self) -> str:
        """The folder that names the result: the last LoRA, else the model."""
        loras = self.spec.lora_models
        return Path(loras[-1] if loras else self.spec.base_model).resolve().name


def load(spec: ModelSpec, with_model: bool = True) -> Loaded:
    loras = [Path(lora) for lora in spec.lora_models]
    if spec.base_model is not None:
        check_model_dir(spec.base_model, spec.base_flag, need_weights=with_model)
    for lora in loras:
        check_adapter_dir(lora, "--lora_model")
    last = loras[-1] if loras else None
    tokenizer = resolve_tokenizer(spec.tokenizer_path, loras, spec.base_model)
    if spec.base_model is not None:
        check_tokenizer(tokenizer, spec.base_model, last, spec.base_flag)
    template = resolve_template(spec.prompt_template, loras, spec.base_model)
    if spec.system_prompt is not None:
        template = template.with_system_prompt(spec.system_prompt)
    # A template whose end-of-turn token the tokenizer lacks stops here, before any weight is read.
    template.stop_ids(tokenizer)
    loaded = Loaded(spec, tokenizer, template)
    if with_model:
        if spec.base_model is None:
            raise ModelError(f"{spec.base_flag} is required: the model folder")
        loaded.model = load_model(
            spec.base_model, loras, pick_device(spec.device), spec.torch_dtype, spec.load_in_kbits
        )
    return loaded


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def quantization_config(
    kbits: int,
    compute_dtype: torch.dtype,
    keep: list[str] | None,
    quant_type: str = "nf4",
    double_quant: bool = True,
):
    """transformers' BitsAndBytesConfig for 4 or 8 bits; None for 16. ``keep`` (the modules trained
    in full) stay unquantised, as the original scripts kept them; every other Linear is quantised,
    lm_head included when it is not trained (a 16-bit lm_head can outweigh the 4-bit layers of a
    small model)."""
    if kbits == 16:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=kbits == 4,
        load_in_8bit=kbits == 8,
        llm_int8_threshold=6.0,
        llm_int8_skip_modules=list(keep or []),
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_type=quant_type,
    )


def load_model(
    base_model: str | Path,
    lora_models: list[str | Path] | str | Path | None,
    device: torch.device,
    dtype: str = "auto",
    load_in_kbits: int = 16,
) -> torch.nn.Module:
    """The base with the LoRAs merged in, in the order given (see the module's contract)."""
    from transformers import AutoModelForCausalLM

    base = Path(base_model)
    if lora_models is None:
        loras = []
    elif isinstance(lora_models, str | Path):
        loras = [Path(lora_models)]
    else:
        loras = [Path(lora) for lora in lora_models]
    if dtype == "auto":
        # float16 matrix products are very slow on a CPU; on a GPU half precision halves memory.
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    extra = {}
    if load_in_kbits != 16:
        if len(loras) > 1:
            raise ModelError(
                f"--load_in_kbits {load_in_kbits} takes one --lora_model; merge the others into the base first"
            )
        compute = torch_dtype if device.type == "cuda" else torch.float32
        # What the adapter trained in full replaces whole modules, which must stay unquantised.
        keep = read_adapter_config(loras[0], "--lora_model").get("modules_to_save") or [] if loras else []
        extra["quantization_config"] = quantization_config(load_in_kbits, compute, list(keep))
        if device.type == "cuda":  # quantised weights are placed when loaded and cannot move
            extra["device_map"] = {"": device}
    loading_bar_on_terminal_only()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch_dtype, **extra)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelError(
            f"{base}: cannot load the model ({first_line(exc)}); re-save it with save_pretrained"
        ) from None
    for lora in loras:
        from peft import PeftModel

        rows = adapter_vocab_rows(lora, "--lora_model")
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            # The saved embed_tokens/lm_head replace these rows, so how they are initialised is moot.
            model.resize_token_embeddings(rows, mean_resizing=False)
        try:
            model = PeftModel.from_pretrained(model, str(lora))
            model = model if load_in_kbits != 16 else model.merge_and_unload()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(
                f"{lora}: the LoRA does not fit {base} ({first_line(exc)}); was it trained on another base?"
            ) from None
    return (model if load_in_kbits != 16 else model.to(device)).eval()


def resolve_tokenizer(
    tokenizer_path: str | Path | None, loras: list[Path], base_model: str | Path | None
) -> TextTokenizer:
    if tokenizer_path is not None:
        return TextTokenizer.load(tokenizer_path)
    for folder in [*reversed(loras), base_model]:
        if folder is not None and has_tokenizer(folder):
            return TextTokenizer.load(folder)
    raise TokenizerError(
        f"no tokenizer in {loras[-1] if loras else base_model}: pass --tokenizer_path (the folder with "
        "tokenizer.model)"
    )


def pretrained_only(folder: Path) -> bool:
    """Whether a LoRA folder's training_args.json says it was trained by ``llama-sft pretrain``."""
    try:
        return (
            json.loads((folder / "training_args.json").read_text(encoding="utf-8")).get("task")
            == "pre-training"
        )
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def resolve_template(
    name: str | None, loras: list[Path], base_model: str | Path | None, default: str | None = DEFAULT_TEMPLATE
) -> Template | None:
    """The template by the order in the module's contract; ``default`` None: None when no folder
    has a ``template.json``."""
    if name is not None:
        return load_template(name)
    for folder in [*reversed(loras), base_model]:
        if folder is not None and (Path(folder) / TEMPLATE_FILE).is_file():
            return load_template(Path(folder))
    if loras and pretrained_only(Path(loras[-1])):
        # A pre-training LoRA learned plain text: it continues text rather than answering prompts.
        logger.info(
            "%s is a pre-training LoRA: its text is continued as written (--prompt_template none)", loras[-1]
        )
        return load_template("none")
    if default is not None:
        logger.warning(
            "no %s with the LoRA or the model; using the %r template (--prompt_template)",
            TEMPLATE_FILE,
            default,
        )
        return load_template(default)
    return None


def check_tokenizer(
    tokenizer: TextTokenizer,
    base_model: str | Path,
    lora_model: str | Path | None,
    base_flag: str = "--base_model",
) -> None:
    """Refuse a tokenizer that does not fit the model, from the config files, before it is loaded."""
    rows = adapter_vocab_rows(lora_model, "--lora_model") if lora_model is not None else None
    # A LoRA that saved embed_tokens decides the vocabulary; otherwise the base does.
    source = lora_model if rows is not None else base_model
    if rows is None:
        rows = model_vocab_size(base_model, base_flag)
    if check_vocab(rows, len(tokenizer), source, tokenizer.directory, virtual_pad=tokenizer.added_pad):
        usable = len(tokenizer) - (1 if tokenizer.added_pad else 0)
        # Generation cannot grow the embedding: ids past its last row would index out of range.
        raise ModelError(
            f"{tokenizer.directory}: the tokenizer has {usable} tokens but the model {source} has {rows} "
            "embedding rows; pass the tokenizer the model was trained with (--tokenizer_path)"
        )
