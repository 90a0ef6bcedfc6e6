"""vimpac: video pre-training by masked token prediction and contrastive learning over VQ video tokens.

`vimpac.load_model(path)` loads exported (or original-release) weights for inference (vimpac/api.py); it is
imported on first use, so `import vimpac` stays light (no torch).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MissingHeadError", "VimpacModel", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from vimpac import api

        return getattr(api, name)
    raise AttributeError(f"module 'vimpac' has no attribute {name!r}")
