"""Model architectures surgeon ships itself (anything from diffusers is loaded, not defined, here)."""
from .chirodiff import ChiroDiffNet

__all__ = ["ChiroDiffNet"]
