"""The SVG path parser on hand-written paths whose points are known."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from surgeon.data.svgpath import PathSyntaxError, parse_path, parse_paths
from surgeon.errors import SurgeonError


def cubic(p0, p1, p2, p3, t):
    p0, p1, p2, p3 = map(np.asarray, (p0, p1, p2, p3))
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def test_absolute_lines_and_close():
    (sub,) = parse_path("M10,20 L30,20 H40 V50 Z")
    np.testing.assert_allclose(sub, [[10, 20], [30, 20], [40, 20], [40, 50], [10, 20]])


def test_relative_commands_match_their_absolute_form():
    rel = parse_path("m10,20 l20,0 h10 v30 z")
    ab = parse_path("M10,20 L30,20 H40 V50 Z")
    assert len(rel) == len(ab) == 1
    np.testing.assert_allclose(rel[0], ab[0])


def test_implicit_repeats_after_moveto_are_linetos():
    (a,) = parse_path("M0 0 10 0 10 10")
    np.testing.assert_allclose(a, [[0, 0], [10, 0], [10, 10]])
    (b,) = parse_path("m1 1 2 0 0 2")  # relative moveto: the repeats are relative linetos
    np.testing.assert_allclose(b, [[1, 1], [3, 1], [3, 3]])


def test_compact_number_syntax():
    (sub,) = parse_path("M1.5-2.3L.5.5 1e1,2E-1l-1-1")
    np.testing.assert_allclose(sub, [[1.5, -2.3], [0.5, 0.5], [10.0, 0.2], [9.0, -0.8]])


def test_cubic_endpoints_and_midpoint_follow_the_bezier_formula():
    p0, p1, p2, p3 = (0, 0), (10, 30), (40, -20), (50, 10)
    (sub,) = parse_path("M0,0 C10,30 40,-20 50,10", samples_per_curve=8)
    assert sub.shape == (9, 2)
    np.testing.assert_allclose(sub[0], p0)
    np.testing.assert_allclose(sub[-1], p3)
    np.testing.assert_allclose(sub[4], cubic(p0, p1, p2, p3, 0.5))  # t = 4/8
    np.testing.assert_allclose(sub[1], cubic(p0, p1, p2, p3, 1 / 8))


def test_relative_cubic_controls_are_relative_to_the_segment_start():
    (rel,) = parse_path("M5,5 c10,30 40,-20 50,10 c1,1 2,2 3,0", samples_per_curve=4)
    (ab,) = parse_path("M5,5 C15,35 45,-15 55,15 C56,16 57,17 58,15", samples_per_curve=4)
    np.testing.assert_allclose(rel, ab)


def test_smooth_cubic_reflects_the_previous_control_point():
    (s,) = parse_path("M0 0 C0 10 10 10 10 0 S20 -10 20 0", samples_per_curve=6)
    # reflection of (10, 10) about the current point (10, 0) is (10, -10)
    (c,) = parse_path("M0 0 C0 10 10 10 10 0 C10 -10 20 -10 20 0", samples_per_curve=6)
    np.testing.assert_allclose(s, c)
    np.testing.assert_allclose(s[9], cubic((10, 0), (10, -10), (20, -10), (20, 0), 0.5))


def test_smooth_cubic_without_a_previous_cubic_starts_at_the_current_point():
    (s,) = parse_path("M0 0 L5 0 S10 10 20 0", samples_per_curve=4)
    (c,) = parse_path("M0 0 L5 0 C5 0 10 10 20 0", samples_per_curve=4)
    np.testing.assert_allclose(s, c)


def test_quadratic_and_smooth_quadratic():
    (q,) = parse_path("M0 0 Q10 20 20 0 T40 0", samples_per_curve=2)
    # midpoint of a quadratic: p0/4 + p1/2 + p2/4; T reflects (10, 20) about (20, 0) to (30, -20)
    np.testing.assert_allclose(q, [[0, 0], [10, 10], [20, 0], [30, -10], [40, 0]])


def test_drawing_after_close_starts_a_new_subpath_at_the_start_point():
    a, b = parse_path("M1 1 L5 1 Z L1 9")
    np.testing.assert_allclose(a, [[1, 1], [5, 1], [1, 1]])
    np.testing.assert_allclose(b, [[1, 1], [1, 9]])


def test_lone_moveto_draws_nothing():
    subs = parse_path("M0 0 M3 3 L4 4 M9 9")
    assert len(subs) == 1
    np.testing.assert_allclose(subs[0], [[3, 3], [4, 4]])


def test_parse_paths_matches_parse_path_and_resets_between_paths():
    ds = ["M0 0 C1 2 3 4 5 6", "m10 10 l1 1", "M0 0 S1 1 2 0"]  # the S must not reflect the first path's control
    batched = parse_paths(ds, samples_per_curve=5)
    for d, got in zip(ds, batched):
        expected = parse_path(d, samples_per_curve=5)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e)
    np.testing.assert_allclose(batched[1][0], [[10, 10], [11, 11]])


@pytest.mark.parametrize(
    "d, token",
    [
        ("M0 0 A5 5 0 0 1 10 10", "'A'"),  # arcs are not supported
        ("M0 0 L1e 2", "'e'"),
        ("M0 0 L1;2", "';'"),
        ("10 10 L 20 20", "10"),
        ("M0 0 Z 5", "5"),
        ("M0 0 C1 1 2 2", "'C'"),
        ("M0", "'M'"),
    ],
)
def test_bad_paths_name_the_bad_token(d, token):
    with pytest.raises(PathSyntaxError) as err:
        parse_path(d)
    assert token in err.value.message
    assert isinstance(err.value, ValueError) and isinstance(err.value, SurgeonError)
    assert err.value.hint


coords = st.floats(-200, 200, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(coords, coords), min_size=2, max_size=12))
def test_relative_and_absolute_polylines_agree(points):
    pts = np.asarray(points)
    absolute = "M" + " L".join(f"{x!r},{y!r}" for x, y in pts.tolist())  # repr: exponents like 1e-05 included
    deltas = np.diff(pts, axis=0).tolist()
    relative = f"m{points[0][0]!r},{points[0][1]!r} " + " ".join(f"{dx!r} {dy!r}" for dx, dy in deltas)
    (a,) = parse_path(absolute)
    (r,) = parse_path(relative)
    np.testing.assert_allclose(a, pts)
    np.testing.assert_allclose(r, pts, atol=1e-9)
