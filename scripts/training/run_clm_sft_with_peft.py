#!/usr/bin/env python
"""Instruction fine-tuning with LoRA: the documented entry point, run by run_sft.sh under torchrun.

Accepts the Chinese-LLaMA-Alpaca command line verbatim (and every TrainingArguments flag); the
work is done by llama_sft.training.run, the same code as `llama-sft train`.
"""

import sys
from pathlib import Path

try:
    from llama_sft.training.command_line import main
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from llama_sft.training.command_line import main

if __name__ == "__main__":
    main(sys.argv[1:])
