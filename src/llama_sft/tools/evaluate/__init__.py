"""``llama-sft eval``: a model (``--model``, or ``--base_model`` with ``--lora_model``) scored on
multiple-choice benchmarks, perplexity or generated answers, through the one loader.

Contract: ``main(argv)`` (``command.py``) takes ``--task ceval|cmmlu|mmlu|perplexity|generate``.
Every input is read and checked before the weights are loaded; bad input stops with one
``error: ...`` line and exit code 2, ``--output_dir`` untouched. A finished run moves
``results.json`` (scores and what produced them), ``predictions.jsonl`` (one line a question or
record) and, for C-Eval, ``submission.json`` into ``--output_dir`` at once, and prints a table.

    choice.py      C-Eval, CMMLU and MMLU folders, their prompts, the letter scoring (batched)
    perplexity.py  text blocked as pretrain blocks it, summed NLL -> perplexity per file
    generation.py  greedy answers to a validation file; metrics.py scores them
    command.py     flags, checks, the run, the output folder
"""

from .command import main

__all__ = ["main"]
