"""PyTorch backend for kdspec."""
