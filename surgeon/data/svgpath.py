"""A small SVG path ``d`` parser: the subpaths of a path as densely sampled point arrays.

Supports M L H V C S Q T Z in absolute and relative form, implicit repeated commands (pairs after a moveto are
linetos) and the compact number syntax of SVG ("1.5-2.3", "1e-3", ".5.5"). Elliptical arcs (A) are not
supported: KanjiVG, the data this serves, never uses them, and a silent approximation would be worse than an error.

Lines contribute their end point only (arc-length resampling happens downstream); curves contribute
``samples_per_curve`` points at t = 1/n, 2/n, ..., 1. A moveto that is not followed by a drawing command draws
nothing, so it yields no subpath.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from surgeon.errors import SurgeonError

__all__ = ["PathSyntaxError", "parse_path", "parse_paths"]


class PathSyntaxError(SurgeonError, ValueError):
    """A malformed path string; a ValueError too, so generic parsing code can catch it."""


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_COMMANDS = "MmLlHhVvCcSsQqTtZz"
_TOKEN = re.compile(rf"[{_COMMANDS}]|{_NUMBER}")
_VALID = re.compile(rf"(?:[{_COMMANDS}]|{_NUMBER}|[\s,]+)*")
_SCAN = re.compile(rf"(?P<cmd>[{_COMMANDS}])|(?P<num>{_NUMBER})|(?P<sep>[\s,]+)|(?P<bad>.)", re.DOTALL)
_ARITY = {"M": 2, "L": 2, "H": 1, "V": 1, "C": 6, "S": 4, "Q": 4, "T": 2, "Z": 0}


def _tokenize(d: str) -> list[str | float]:
    # Validating the whole string first keeps the common case in two C-level regex calls.
    if _VALID.fullmatch(d) is None:
        bad = next(m for m in _SCAN.finditer(d) if m.lastgroup == "bad")
        raise PathSyntaxError(
            f"bad token {bad.group()!r} at offset {bad.start()} in SVG path {_excerpt(d)}",
            "paths may only use the commands MLHVCSQTZ (either case), numbers, spaces and commas",
        )
    return [t if t in _COMMANDS else float(t) for t in _TOKEN.findall(d)]


def _excerpt(d: str, width: int = 60) -> str:
    return repr(d if len(d) <= width else d[: width - 3] + "...")


@functools.lru_cache(maxsize=8)
def _bernstein(n: int) -> np.ndarray:
    """Cubic Bernstein basis ``[n, 4]`` at t = 1/n, ..., 1 (t = 0 is the previous point, already emitted)."""
    t = np.arange(1, n + 1, dtype=np.float64) / n
    u = 1.0 - t
    basis = np.stack([u**3, 3 * u**2 * t, 3 * u * t**2, t**3], axis=1)
    basis.flags.writeable = False  # shared through the cache
    return basis


class _Builder:
    """Collects points and cubic pieces in plain floats; one batched evaluation at the end keeps parsing fast."""

    def __init__(self, samples_per_curve: int):
        self.n = samples_per_curve
        self.point_rows: list[int] = []
        self.points: list[tuple[float, float]] = []
        self.curve_rows: list[int] = []
        self.curves: list[tuple[float, ...]] = []
        self.bounds: list[int] = []  # row where each subpath starts
        self.owners: list[int] = []  # which path each subpath belongs to
        self.path = 0
        self.rows = 0
        self.open = False

    def move(self, x: float, y: float) -> None:
        self.bounds.append(self.rows)
        self.owners.append(self.path)
        self.open = True
        self.point(x, y)

    def point(self, x: float, y: float) -> None:
        self.point_rows.append(self.rows)
        self.points.append((x, y))
        self.rows += 1

    def cubic(self, *controls: float) -> None:
        self.curve_rows.append(self.rows)
        self.curves.append(controls)
        self.rows += self.n

    def end_path(self) -> None:
        self.path += 1
        self.open = False

    def build(self) -> list[list[np.ndarray]]:
        """Subpaths grouped by path; a lone moveto draws nothing and is dropped."""
        out = np.empty((self.rows, 2), dtype=np.float64)
        if self.points:
            out[self.point_rows] = self.points
        if self.curves:
            controls = np.asarray(self.curves, dtype=np.float64).reshape(-1, 4, 2)  # [S, 4, 2]
            samples = np.einsum("nk,skd->snd", _bernstein(self.n), controls)  # [S, n, 2]
            rows = (np.asarray(self.curve_rows)[:, None] + np.arange(self.n)).ravel()
            out[rows] = samples.reshape(-1, 2)
        paths: list[list[np.ndarray]] = [[] for _ in range(self.path)]
        ends = self.bounds[1:] + [self.rows]
        for owner, a, b in zip(self.owners, self.bounds, ends):
            if b - a > 1:
                paths[owner].append(out[a:b])
        return paths


def parse_path(d: str, samples_per_curve: int = 16) -> list[np.ndarray]:
    """Parse a path ``d`` attribute into subpaths, each a float64 array ``[K, 2]`` of (x, y) points."""
    return parse_paths([d], samples_per_curve)[0]


def parse_paths(ds: list[str], samples_per_curve: int = 16) -> list[list[np.ndarray]]:
    """``parse_path`` for many paths at once (one batched curve evaluation: much faster for many short paths)."""
    if samples_per_curve < 1:
        raise ValueError(f"samples_per_curve must be >= 1, got {samples_per_curve}")
    out = _Builder(samples_per_curve)
    for d in ds:
        _parse_into(out, d)
        out.end_path()
    return out.build()


def _parse_into(out: _Builder, d: str) -> None:
    tokens = _tokenize(d)
    x = y = 0.0  # current point
    sx = sy = 0.0  # start of the current subpath, where Z returns
    # Second control point of the previous C/S (family "C") or control of the previous Q/T (family "Q");
    # S and T reflect it about the current point only when the previous command was of their family.
    cx = cy = 0.0
    family = ""
    cmd: str | None = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if isinstance(tok, str):
            cmd = tok
            i += 1
        elif cmd is None:
            raise PathSyntaxError(
                f"SVG path {_excerpt(d)} starts with the number {tok:g} instead of a command",
                "a path must begin with a moveto such as 'M 10 20'",
            )
        elif cmd in "Zz":
            raise PathSyntaxError(
                f"number {tok:g} after '{cmd}' in SVG path {_excerpt(d)}",
                "'Z' takes no arguments; start the next subpath with 'M'",
            )
        upper = cmd.upper()
        n_args = _ARITY[upper]
        a = tokens[i : i + n_args]
        if len(a) < n_args or any(isinstance(v, str) for v in a):
            raise PathSyntaxError(
                f"'{cmd}' needs {n_args} numbers in SVG path {_excerpt(d)}",
                "check for a missing coordinate near that command",
            )
        i += n_args
        ox, oy = (x, y) if cmd.islower() else (0.0, 0.0)
        if upper not in "MZ" and not out.open:
            out.move(x, y)  # drawing after Z without a moveto starts a new subpath at the closing point
        next_family = ""

        if upper == "M":
            x, y = ox + a[0], oy + a[1]
            sx, sy = x, y
            out.move(x, y)
            cmd = "l" if cmd == "m" else "L"  # further pairs are implicit linetos
        elif upper == "Z":
            if out.open:
                out.point(sx, sy)
            x, y = sx, sy
            out.open = False
        elif upper == "L":
            x, y = ox + a[0], oy + a[1]
            out.point(x, y)
        elif upper == "H":
            x = ox + a[0]
            out.point(x, y)
        elif upper == "V":
            y = oy + a[0]
            out.point(x, y)
        elif upper in "CS":
            if upper == "C":
                x1, y1, x2, y2, ex, ey = ox + a[0], oy + a[1], ox + a[2], oy + a[3], ox + a[4], oy + a[5]
            else:
                x1, y1 = (2 * x - cx, 2 * y - cy) if family == "C" else (x, y)
                x2, y2, ex, ey = ox + a[0], oy + a[1], ox + a[2], oy + a[3]
            out.cubic(x, y, x1, y1, x2, y2, ex, ey)
            cx, cy, next_family, x, y = x2, y2, "C", ex, ey
        else:  # Q, T
            if upper == "Q":
                qx, qy, ex, ey = ox + a[0], oy + a[1], ox + a[2], oy + a[3]
            else:
                qx, qy = (2 * x - cx, 2 * y - cy) if family == "Q" else (x, y)
                ex, ey = ox + a[0], oy + a[1]
            # Degree elevation: the same curve, same parametrization, as a cubic.
            out.cubic(
                x, y, x + 2 / 3 * (qx - x), y + 2 / 3 * (qy - y), ex + 2 / 3 * (qx - ex), ey + 2 / 3 * (qy - ey), ex, ey
            )
            cx, cy, next_family, x, y = qx, qy, "Q", ex, ey
        family = next_family
