"""Training data: reading JSONL files, checking their format, tokenizing them."""
