"""Compression methods (the registry of method records), second-order and low-rank pruning, fine-tuning."""
