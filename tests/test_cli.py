"""The ``fewbit`` command line, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fewbit import formats
from fewbit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fewbit.cli", *args], capture_output=True, text=True, timeout=120)


def test_formats_table_lists_every_format():
    result = run_cli("formats")
    assert result.returncode == 0, result.stderr
    for name in formats.names():
        assert name in result.stdout
    assert "448" in result.stdout and "57344" in result.stdout and "2^-9" in result.stdout


def test_formats_json_matches_the_library(capsys):
    assert main(["formats", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == formats.names()
    e4m3 = next(r for r in rows if r["name"] == "fp8_e4m3")
    assert (e4m3["max"], e4m3["min_subnormal"], e4m3["nan"]) == (448.0, 2.0**-9, "top_code")


@pytest.mark.parametrize("name", [n for n in formats.names() if formats.get(n).bits <= 8])
def test_format_values_listing(name, capsys):
    assert main(["formats", name, "--json"]) == 0
    values = json.loads(capsys.readouterr().out)["values"]
    assert len(values) == formats.get(name).num_codes


def test_fp4_listing_is_readable():
    result = run_cli("formats", "fp4_e2m1")
    assert result.returncode == 0
    for value in ["0.5", "1.5", "3.0", "6.0", "-6.0", "0x0F", "1111"]:
        assert value in result.stdout


def test_unknown_format_is_a_clear_error():
    result = run_cli("formats", "fp7")
    assert result.returncode == 2
    assert "unknown format 'fp7'" in result.stderr and "fp8_e4m3" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("formats", "bf16")
    assert result.returncode == 2 and "8 bits or fewer" in result.stderr
