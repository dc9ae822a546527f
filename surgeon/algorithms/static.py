"""Static-DM (Algorithm 1): the mask drawn at initialization never changes. Dense: no mask at all."""

from surgeon.algorithms.base import Algorithm


class Static(Algorithm):
    name = "static"


class Dense(Algorithm):
    name = "dense"
