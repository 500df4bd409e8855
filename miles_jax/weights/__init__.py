"""Weights from elsewhere: PyTorch checkpoints (torch_io) and public image / text models
(public_init)."""
