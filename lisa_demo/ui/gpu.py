"""ZeroGPU support: `spaces` exists only on Hugging Face Spaces, so it is imported optionally.

On ZeroGPU a GPU is attached only while a function decorated with `spaces.GPU` runs; elsewhere
the decorator is the identity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

try:
    import spaces  # type: ignore[import-not-found]
except ImportError:
    spaces = None

ZERO_GPU = spaces is not None
GPU_DURATION_S = 120  # first call also loads the model inside the GPU window

F = TypeVar("F", bound=Callable)


def on_gpu(fn: F) -> F:
    """`spaces.GPU(duration=GPU_DURATION_S)(fn)` on ZeroGPU, else `fn` unchanged."""
    if spaces is None:
        return fn
    return spaces.GPU(duration=GPU_DURATION_S)(fn)
