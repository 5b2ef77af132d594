"""The ``fewbit`` command line."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from fewbit import formats


def _number(value: float) -> str:
    """A value as a person reads it: exact powers of two as 2^k, small integers plainly, else 4 significant digits."""
    if value == 0 or not math.isfinite(value):
        return str(value)
    mantissa, exponent = math.frexp(abs(value))
    sign = "-" if value < 0 else ""
    if mantissa == 0.5 and not -5 < exponent - 1 < 20:
        return f"{sign}2^{exponent - 1}"
    if value == int(value) and abs(value) < 1e6:
        return f"{int(value)}"
    return f"{value:.4g}".replace("e+", "e")


def _specials(fmt: formats.Format) -> str:
    if fmt.is_int:
        return "-"
    top = (1 << (fmt.bits - fmt.signed)) - 1  # the all-ones magnitude code
    top_codes = f"0x{top:02X}/0x{top | (1 << (fmt.bits - 1)):02X}" if fmt.signed else f"0x{top:02X}"
    nan = {"ieee": "NaN", "top_code": f"NaN={top_codes} only", "none": "no NaN"}[fmt.nan.value]
    return f"inf, {nan}" if fmt.inf else nan


def _formats_table(console: Console) -> None:
    table = Table(title="fewbit number formats", title_style="bold")
    for column, justify in [("format", "left"), ("bits", "right"), ("E", "right"), ("M", "right"),
                            ("bias", "right"), ("max", "right"), ("min normal", "right"),
                            ("min subnormal", "right"), ("binades", "right"), ("inf / NaN", "left")]:
        table.add_column(column, justify=justify)
    for name in formats.names():
        f = formats.get(name)
        table.add_row(
            name, str(f.bits), str(f.ebits) if not f.is_int else "-", str(f.mbits) if not f.is_int else "-",
            str(f.bias) if not f.is_int else "-", _number(f.max), _number(f.min_normal),
            _number(f.min_subnormal) if f.subnormals and not f.is_int else "-", f"{f.binades:.2f}", _specials(f),
        )
    console.print(table)
    console.print("binades = log2(max / min subnormal). `fewbit formats NAME` lists every value of a format of "
                  "8 bits or fewer.")


def _values_table(console: Console, fmt: formats.Format) -> None:
    values = fmt.values.tolist()
    table = Table(title=f"{fmt.name}: all {fmt.num_codes} codes ({fmt.description})", title_style="bold")
    columns = 4 if fmt.num_codes > 16 else 1
    for _ in range(columns):
        table.add_column("code", justify="right", style="cyan")
        table.add_column("bits", justify="right", style="dim")
        table.add_column("value", justify="right")
    rows = math.ceil(fmt.num_codes / columns)
    for r in range(rows):
        cells = []
        for c in range(columns):
            code = c * rows + r
            if code < fmt.num_codes:
                cells += [f"0x{code:02X}", format(code, f"0{fmt.bits}b"), repr(values[code])]
        table.add_row(*cells)
    console.print(table)


def _console() -> Console:
    # Piped output gets a width that fits the tables rather than rich's 80-column default.
    return Console() if sys.stdout.isatty() else Console(width=140)


def _cmd_formats(args: argparse.Namespace) -> int:
    console = _console()
    if args.name is None:
        if args.json:
            print(json.dumps([formats.get(n).as_dict() for n in formats.names()], indent=2))
        else:
            _formats_table(console)
        return 0
    fmt = formats.get(args.name)
    if fmt.bits > 8:
        raise ValueError(f"{fmt.name} has {fmt.num_codes} codes; value listings exist for formats of 8 bits or "
                         "fewer. Run `fewbit formats` for its facts")
    if args.json:
        facts = fmt.as_dict()
        facts["values"] = [v if math.isfinite(v) else str(v) for v in fmt.values.tolist()]
        print(json.dumps(facts, indent=2))
    else:
        _values_table(console, fmt)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from fewbit import recipes

    rows = [recipes.get(n) for n in recipes.names()]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    table = Table(title="fewbit recipes (QuantSpec per role; '-' = high precision)", title_style="bold")
    for col in ["recipe", "weight", "input", "grad_output", "compute", "loss scaling"]:
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, *(str(s) if s is not None else "-" for s in (r.weight, r.input, r.grad_output)),
                      r.compute_format or "fp32", r.loss_scaling)
    _console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewbit", description="Train, quantize, sparsify and benchmark "
                                     "neural networks in few bits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("formats", help="table of number formats, or every value of one format")
    p.add_argument("name", nargs="?", help=f"one of: {', '.join(formats.names())}")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_formats)
    p = sub.add_parser("recipes", help="the preset recipes and the QuantSpec each gives to each role")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=_cmd_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"fewbit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
