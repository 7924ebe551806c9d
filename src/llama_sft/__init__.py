"""llama-sft: instruction fine-tuning of LLaMA-family models with LoRA.

The data flow, one module a stage:
    records.py   Alpaca JSON/JSONL files -> validated records
    templates.py record -> prompt text (templates are JSON data in templates/)
    tokenizer.py text -> token ids, identical to SentencePiece for SentencePiece models
    encode.py    record -> input_ids + labels (the one place labels are masked), cached
    collate.py   examples -> padded batch tensors
    train.py     the training run, top to bottom
"""

__version__ = "0.1.0"
