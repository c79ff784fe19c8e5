"""ripper-dist runtime: numpy + ONNX Runtime (+ Ray for the distributed job). Never imports torch.

`from ripper_dist import Separator` is the Python API (`api.py`); it is imported on first use, so workers that only
need the runtime do not pay for it.
"""

__version__ = "0.1.0"
__all__ = ["Separator", "__version__"]


def __getattr__(name: str):
    if name == "Separator":
        from .api import Separator
        return Separator
    raise AttributeError(f"module 'ripper_dist' has no attribute {name!r}")
