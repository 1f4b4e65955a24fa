"""The DINO(-DAMEX) detector and its parts: ``damex.models.DINO`` and
``damex.models.DINOConfig`` (with ``preset("tiny" | "paper")``)."""
from .dino import DINO, DINOConfig, PRESETS, preset

__all__ = ["DINO", "DINOConfig", "PRESETS", "preset"]
