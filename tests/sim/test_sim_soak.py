"""The soak's verdict (a pure function over samples), its process sampling and its argument
checks; the soak itself runs on real servers for minutes and is not part of CI."""

from __future__ import annotations

import os

import pytest

from riffloop.core import ValidationError
from riffloop.sim import Tolerance, flatness
from riffloop.sim._soak import format_report, least_squares_slope, parse_args, sample_process

pytestmark = pytest.mark.unit

TIMES = [30.0 * i for i in range(9)]


def test_a_steady_series_is_flat_and_its_slope_is_zero() -> None:
    f = flatness(TIMES, [500.0] * 9, Tolerance(relative=0.10))
    assert f.flat
    assert (f.warm_mean, f.last_mean, f.allowed, f.slope_per_h) == (500.0, 500.0, 50.0, 0.0)


def test_warm_up_growth_is_ignored_but_growth_after_it_is_not() -> None:
    warm_up_then_steady = [100.0, 300.0, 480.0, 500.0, 500.0, 500.0, 500.0, 500.0, 500.0]
    assert flatness(TIMES, warm_up_then_steady, Tolerance(relative=0.10)).flat
    # a leak: +20 MiB per sample after warm-up, 400 → 540 on average over the last third
    leak = [100.0, 300.0, 380.0, 400.0, 420.0, 440.0, 460.0, 480.0, 500.0]
    f = flatness(TIMES, leak, Tolerance(relative=0.10))
    assert (f.warm_mean, f.last_mean) == (420.0, 480.0)
    assert f.allowed == pytest.approx(42.0)
    assert not f.flat
    # least squares over the six samples after warm-up: 20 per 30 s = 2,400 per hour
    assert f.slope_per_h == pytest.approx(2400.0)


def test_the_tolerance_is_the_edge_exactly() -> None:
    at_edge = [20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 25.0, 25.0, 25.0]
    assert flatness(TIMES, at_edge, Tolerance(absolute=5)).flat
    over = [20.0, 20.0, 20.0, 20.0, 20.0, 20.0, 25.0, 25.0, 26.0]
    assert not flatness(TIMES, over, Tolerance(absolute=5)).flat
    shrinking = [30.0, 30.0, 30.0, 30.0, 30.0, 30.0, 10.0, 10.0, 10.0]
    assert flatness(TIMES, shrinking, Tolerance()).flat


def test_thirds_by_index_when_the_count_does_not_divide() -> None:
    # n = 7: warm-up [0, 2), second [2, 4), last [4, 7)
    f = flatness(TIMES[:7], [0.0, 0.0, 10.0, 12.0, 11.0, 11.0, 14.0], Tolerance(absolute=1))
    assert (f.warm_mean, f.last_mean) == (11.0, 12.0)
    assert f.flat


def test_least_squares_slope() -> None:
    assert least_squares_slope([0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert least_squares_slope([5.0, 5.0], [1.0, 9.0]) == 0.0


@pytest.mark.parametrize(
    ("times", "values", "reason"),
    [
        ([0.0, 1.0], [1.0, 1.0], "at least 3 samples"),
        ([0.0, 1.0, 2.0], [1.0, 1.0], "3 times for 2 values"),
        ([0.0, 1.0, 2.0], [1.0, float("nan"), 1.0], "finite"),
    ],
)
def test_a_verdict_refuses_too_few_or_bad_samples(
    times: list[float], values: list[float], reason: str
) -> None:
    with pytest.raises(ValidationError, match=reason):
        flatness(times, values, Tolerance())


def test_the_report_names_what_is_not_flat() -> None:
    from riffloop.sim._soak import DEFAULT_TOLERANCES, ResourceSample

    steady = [ResourceSample(t, 100.0, 20, 10) for t in TIMES]
    leaking = [ResourceSample(t, 100.0, 20 + 3 * i, 10) for i, t in enumerate(TIMES)]
    text, flat = format_report({"feedback": steady, "gateway": leaking}, DEFAULT_TOLERANCES)
    assert not flat
    verdicts = [line for line in text.splitlines() if line.endswith(("flat", "FLAT"))]
    assert [line for line in verdicts if "NOT FLAT" in line] == [
        line for line in verdicts if line.startswith("gateway   fds")
    ]
    assert format_report({"feedback": steady}, DEFAULT_TOLERANCES)[1]


def test_sampling_reads_this_process() -> None:
    sample = sample_process(os.getpid(), 1.5)
    assert sample.t_s == 1.5
    assert sample.rss_mib > 1
    assert sample.fds >= 3  # stdin, stdout, stderr at least
    assert sample.threads >= 1
    with pytest.raises(OSError):
        sample_process(2**22 + 12345, 0.0)  # above the kernel's pid_max: no such process


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--minutes", "0"], "--minutes must be"),
        (["--minutes", "nan"], "--minutes must be"),
        (["--minutes", "2000"], "--minutes must be"),
        (["--listeners", "0"], "--listeners must be"),
        (["--listeners", "two"], "invalid int value"),
        (["--sample-every", "0.5"], "--sample-every must be"),
        (["--minutes", "1", "--sample-every", "30"], "needs at least 6"),
        (["--spam-share", "1"], "--spam-share must be"),
        (["--clip-seconds", "0.1"], "--clip-seconds must be"),
        (["--rss-tolerance", "-0.1"], "--rss-tolerance must be"),
        (["--fd-tolerance", "-1"], "must be ≥ 0"),
        (["--infra-env", "/nonexistent/infra.env"], "no such file"),
        (["--population", "nomodule"], "package.module:factory"),
        (["--population", "riffloop.sim:no_such_factory"], "not a callable factory"),
        (["--unknown"], "unrecognized arguments"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err


def test_good_arguments_build_the_population() -> None:
    ns = parse_args(["--minutes", "3", "--listeners", "5", "--spam-share", "0.2"])
    assert (ns.minutes, ns.listeners, ns.sample_every) == (3.0, 5, 30.0)
    assert len(ns.population_list) == 5
