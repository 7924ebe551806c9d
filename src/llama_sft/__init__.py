"""llama-sft: instruction fine-tuning of LLaMA-family models with LoRA.

One package per stage; imports run down this list, never up it:
    data/       records -> prompt text -> token ids + labels -> batches (each stage's contract in
                its module)
    checks.py   model folders, adapters and vocabularies, checked the same way by every command
    training/   the run, top to bottom: arguments, precision, model and LoRA, trainer, checkpoints
    speedups/   what only makes training faster; the trainer reaches it through one call,
                ``speedups.apply``, and runs the same without it
    tools/      what reads a trained model: merge, merge-tokenizer, chat, demo
    cli.py      the ``llama-sft`` subcommands
"""

__version__ = "0.1.0"
