"""What is being denoised. A Task turns data batches into (model inputs, target, weight) and samples."""
from .base import Task

__all__ = ["Task"]
