"""Supervised fine-tuning on annotated CoT: the first stage of ReFT and CARFT."""
