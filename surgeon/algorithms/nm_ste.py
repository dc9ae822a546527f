"""SparseDM N:M straight-through fine-tuning: NMMask recomputes S(W) every forward and SR-STE acts in backward,
so the loop needs no per-step hook; the teacher loss lives in surgeon.distill."""
from .base import Algorithm


class NMSTE(Algorithm):
    name = "nm_ste"
    mask_init = "magnitude"
