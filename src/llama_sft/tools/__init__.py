"""Commands that read a trained model or prepare one: merge, merge-tokenizer, chat, demo."""
