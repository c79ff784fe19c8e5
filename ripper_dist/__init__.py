"""ripper-dist runtime: numpy + ONNX Runtime (+ Ray for the distributed job). Never imports torch."""

__version__ = "0.1.0"
