"""Evaluation metrics over extracted answers."""
