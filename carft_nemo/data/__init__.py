"""Data: records, prompts, loaders, synthetic problems, tokenization and batching."""
