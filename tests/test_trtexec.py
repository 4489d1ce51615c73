"""The trtexec parser on real trtexec outputs of several TensorRT versions (sources in each fixture's header)."""

import json
from pathlib import Path

import pytest

from edgecompress.core.errors import TrtexecParseError
from edgecompress.deploy.trtexec import parse_trtexec

FIXTURES = Path(__file__).parent / "fixtures" / "trtexec"
EXPECTED = json.loads((FIXTURES / "EXPECTED.json").read_text())


def _log(name: str) -> str:
    text = (FIXTURES / name).read_text()
    assert text.startswith("# source: "), f"{name} must name its source"
    return text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parses_real_outputs(name):
    parsed = parse_trtexec(_log(name))
    for key, want in EXPECTED[name].items():
        got = parsed[key]
        if want is None:
            assert got is None, (key, got)
        elif isinstance(want, str):
            assert got == want, (key, got)
        else:
            assert got == pytest.approx(want, rel=1e-6), (key, got)


def test_every_fixture_is_checked():
    assert {p.name for p in FIXTURES.glob("*.txt")} == set(EXPECTED)
    assert len({EXPECTED[n]["tensorrt_version"] for n in EXPECTED}) >= 5  # several versions' formats


def test_failed_build_is_an_error():
    log = _log("trt10_16_mnist_full.txt")
    failed = log[:log.index("=== Performance summary ===")] + "[E] Error[4]: engine build failed\n&&&& FAILED TensorRT.trtexec\n"
    with pytest.raises(TrtexecParseError, match="no latency summary"):
        parse_trtexec(failed)
