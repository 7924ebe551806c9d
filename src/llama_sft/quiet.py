"""Library notices a user of llama-sft cannot act on, silenced one exact message at a time.

Installed once, when the package is first imported, so every entry point (``llama-sft``, the
torchrun scripts, a Python caller) gets them before transformers, PEFT or DeepSpeed speak. Each
filter names one message and the library it comes from; anything else those libraries say is shown.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _drop(logger_name: str, text: str) -> None:
    # A filter on the logger itself, which exists before the library that logs through it is
    # imported (logging.getLogger makes it; the library later adds its handler to the same object).
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.text == text for f in logger.filters):
        logger.addFilter(_DropMessage(text))


def quiet_libraries() -> None:
    # PEFT asks every model it wraps for `is_gradient_checkpointing` (PeftModel.__init__, so every
    # LoRA attached or loaded), a property transformers 5 deprecated in favour of
    # `is_activation_checkpointing`; the call is PEFT's, not ours.
    warnings.filterwarnings(
        "ignore",
        message=r"`is_gradient_checkpointing` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
    # A tokenizer larger than the base model (a Chinese tokenizer over LLaMA's) grows the embedding;
    # PEFT then saves the grown embedding with every adapter, as it must, and says so at every save.
    warnings.filterwarnings(
        "ignore",
        message=r"Setting `save_embedding_layers` to `True` as the embedding layer has been resized",
        category=UserWarning,
        module=r"peft\.utils\.save_and_load",
    )
    # gguf's writer announces its byte order and the temporary file export writes before renaming it
    # into place; export logs the file it wrote itself.
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)
    # accelerate and transformers import DeepSpeed whenever it is installed (the Trainer, every
    # --deepspeed run), and DeepSpeed then announces on stdout that a CPU-only machine has no GPU.
    _drop("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator")
    # Growing the embedding for a larger tokenizer: transformers describes how it fills the new
    # embedding and lm_head rows, with a keyword to change it that llama-sft does not expose; the
    # run's own warning (training.model.load_base_model) already says the rows are new.
    _drop(
        "transformers.modeling_utils",
        "will be initialized from a multivariate normal distribution that has old embeddings' mean and covariance",
    )
    # The Trainer accumulates gradients itself and gives accelerate 1 step, while the DeepSpeed
    # config's "auto" is filled with --gradient_accumulation_steps; accelerate reports the
    # difference and uses that value, which is the one asked for.
    _drop("accelerate.accelerator", "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,")


def loading_bar_on_terminal_only() -> None:
    """transformers draws a "Loading weights" bar with carriage returns; in a redirected log (a
    script, CI, ``nohup``) those frames are noise, so the bar is kept for a terminal only."""
    import sys

    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
