"""Torch side of ripper-dist: safe checkpoint loading, model definitions, ONNX export with parity checks.

Only the driver imports this package (and only on an export-cache miss); workers never need torch.
"""
