"""LISA Studio: reasoning segmentation (LLaVA [SEG] tokens into SAM's mask decoder)."""

__version__ = "0.1.0"
