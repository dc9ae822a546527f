"""Model architectures surgeon ships itself (anything from diffusers is loaded, not defined, here)."""

from surgeon.models.chirodiff import ChiroDiffNet

__all__ = ["ChiroDiffNet"]
