"""A deterministic stand-in for LisaPipeline: it segments the saturated red pixels."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass
class FakeMask:
    mask: np.ndarray  # HxW bool
    score: float
    area_fraction: float
    logits: np.ndarray | None = None


@dataclass
class FakeResult:
    answer: str
    masks: list[FakeMask]
    timings: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    message: str | None = None


def red_pixels(image: np.ndarray) -> np.ndarray:
    """HxW bool: clearly red pixels (the test images draw their target in pure red)."""
    r, g, b = (image[:, :, i].astype(int) for i in range(3))
    return (r > 150) & (g < 100) & (b < 100)


class FakeBackend:
    """`segment` like LisaPipeline's: one mask (the red pixels); none when asked about
    "nothing"; twelve (the red pixels, then eleven empty ones) when asked about "many"."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[tuple[int, ...], str, float]] = []
        self._seen: set[bytes] = set()

    def segment(self, image: np.ndarray, query: str, threshold: float = 0.0) -> FakeResult:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        self.calls.append((image.shape, query, threshold))
        key = image.tobytes()[:4096] + bytes(str(image.shape), "ascii")
        cache_hit = key in self._seen
        self._seen.add(key)
        timings = {"image_encoding": 0.01, "generation": 0.02, "mask_decoding": 0.01}
        timings["total"] = sum(timings.values())
        if "nothing" in query.lower():
            return FakeResult("There is nothing like that here.", [], timings, cache_hit)
        mask = red_pixels(image)
        masks = [FakeMask(mask, 0.93, float(mask.mean()))]
        if "many" in query.lower():  # degenerate output: the answer repeats [SEG]
            empty = np.zeros_like(mask)
            masks += [FakeMask(empty, 0.1, 0.0) for _ in range(11)]
            return FakeResult("[SEG] " * 12, masks, timings, cache_hit, "12 [SEG] tokens")
        return FakeResult("It is the red square [SEG].", masks, timings, cache_hit)
