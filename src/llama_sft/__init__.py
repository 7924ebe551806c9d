"""llama-sft: instruction fine-tuning of LLaMA-family models with LoRA.

One package per stage; imports run down this list, never up it:
    options.py      flags every command shares: --config YAML, --lora_model lists, ArgumentError
    quiet.py        library notices a user cannot act on, silenced at import, one exact message each
    data/           records -> prompt text -> token ids + labels -> batches (each stage's contract
                    in its module)
    checks.py       model folders, adapters and vocabularies, checked the same way by every command
    loading.py      the one loader: model folder + LoRAs in order -> tokenizer, template, model
    peft_modules.py how PEFT wraps modules (the module that serves, base copies it replaces)
    training/       the run, top to bottom: arguments parsed once and resolved for this machine,
                    model and LoRA, trainer, checkpoints; command_line.py is its CLI entry
    speedups/       what only makes training faster; training reaches it through its package entry
                    (``speedups.prepare_process`` before PyTorch starts, ``speedups.apply`` for the
                    model) and runs the same without it
    tools/          what reads a trained model: merge and export (weights.py: streamed readers and
                    the LoRA arithmetic), chat, serve/ (engine, protocol, app, command), evaluate/
                    (eval: multiple-choice benchmarks, perplexity, generation), preview,
                    merge-tokenizer, demo
    cli.py          the ``llama-sft`` subcommands; the only reader of ``sys.argv``
"""

from .quiet import quiet_libraries

__version__ = "0.1.0"

quiet_libraries()
