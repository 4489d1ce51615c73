import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgecompress.core.errors import UsageError
from edgecompress.core.units import parse_fraction, parse_latency_ms, parse_size_bytes


@pytest.mark.parametrize("text, ms", [
    ("10ms", 10.0), ("0.5 ms", 0.5), ("800us", 0.8), ("1.2s", 1200.0), ("3MS", 3.0), (" 7 ms ", 7.0), ("1e-1ms", 0.1),
])
def test_latency_ok(text, ms):
    assert parse_latency_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "ms", "10", "10 min", "-1ms", "0ms", "0us", "1..2ms", "abc", "nanms", "infms", "10 m s"])
def test_latency_bad(text):
    with pytest.raises(UsageError):
        parse_latency_ms(text)


@pytest.mark.parametrize("text, size", [
    ("8MB", 8_000_000), ("512KiB", 524_288), ("2 GB", 2_000_000_000), ("1.5MiB", 1_572_864), ("100b", 100),
])
def test_size_ok(text, size):
    assert parse_size_bytes(text) == size


@pytest.mark.parametrize("text", ["8", "8 MBs", "-1MB", "0MB", "0.1B", "MB", "8 TBB"])
def test_size_bad(text):
    with pytest.raises(UsageError):
        parse_size_bytes(text)


@pytest.mark.parametrize("text, share", [("1%", 0.01), ("0.01", 0.01), ("0", 0.0), ("100%", 1.0), ("2.5 %", 0.025)])
def test_fraction_ok(text, share):
    assert parse_fraction(text) == pytest.approx(share)


@pytest.mark.parametrize("text", ["101%", "1.5", "-1%", "1pp", "%"])
def test_fraction_bad(text):
    with pytest.raises(UsageError):
        parse_fraction(text)


units = st.sampled_from([("us", 1e-3), ("ms", 1.0), ("s", 1e3)])


@given(value=st.floats(min_value=1e-6, max_value=1e6, allow_nan=False), unit=units, space=st.booleans())
def test_latency_roundtrip(value, unit, space):
    name, factor = unit
    text = f"{value!r}{' ' if space else ''}{name}"
    assert parse_latency_ms(text) == pytest.approx(value * factor, rel=1e-9)


@given(st.text(max_size=12))
def test_parsers_never_crash(text):
    """Any text either parses or raises UsageError; nothing else escapes."""
    for parser in (parse_latency_ms, parse_size_bytes, parse_fraction):
        try:
            parser(text)
        except UsageError:
            pass


@given(value=st.integers(min_value=1, max_value=10**12), unit=st.sampled_from(["B", "KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_size_monotone_in_unit(value, unit):
    factor = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    assert parse_size_bytes(f"{value}{unit}") == round(value * factor)
