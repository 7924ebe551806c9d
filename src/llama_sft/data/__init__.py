"""From data files to training batches. Each stage's contract is in its module:

records.py    Alpaca JSON/JSONL file -> validated ``Record`` objects
templates.py  record -> prompt text (templates are JSON data in ``templates/``)
tokenizer.py  text -> token ids, identical to SentencePiece for SentencePiece models
encode.py     record -> input_ids + labels (the one place labels are masked), cached by content
collate.py    examples -> right-padded batch tensors
packing.py    examples -> one packed row without padding, position ids restarting per record
pretrain.py   plain-text .txt/.jsonl documents -> EOS-joined blocks for pre-training, memory-mapped cache
preference.py preference files (chosen/rejected) -> prompt/chosen/rejected ids in SFT's layout -> pair
              batches
"""
