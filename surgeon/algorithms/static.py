"""Static-DM (Algorithm 1): the mask drawn at initialization never changes. Dense: no mask at all."""
from .base import Algorithm


class Static(Algorithm):
    name = "static"


class Dense(Algorithm):
    name = "dense"
