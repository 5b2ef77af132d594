"""The catalog commands rendered: ``fewbit formats``, ``fewbit recipes``, ``fewbit workloads``."""

from __future__ import annotations

import math

from rich.table import Table

from fewbit import formats

FORMATS_NOTE = ("binades = log2(max / min subnormal). `fewbit formats NAME` lists every value of a format of 8 bits "
                "or fewer.")


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


def formats_table(fmts: list[formats.Format]) -> Table:
    """Every format's facts: bits, exponent and mantissa bits, bias, max, min normal and subnormal, binades and
    specials."""
    table = Table(title="fewbit number formats", title_style="bold")
    for column, justify in [("format", "left"), ("bits", "right"), ("E", "right"), ("M", "right"),
                            ("bias", "right"), ("max", "right"), ("min normal", "right"),
                            ("min subnormal", "right"), ("binades", "right"), ("inf / NaN", "left")]:
        table.add_column(column, justify=justify)
    for f in fmts:
        table.add_row(
            f.name, str(f.bits), str(f.ebits) if not f.is_int else "-", str(f.mbits) if not f.is_int else "-",
            str(f.bias) if not f.is_int else "-", _number(f.max), _number(f.min_normal),
            _number(f.min_subnormal) if f.subnormals and not f.is_int else "-", f"{f.binades:.2f}", _specials(f),
        )
    return table


def values_table(fmt: formats.Format) -> Table:
    """Every code of a format of 8 bits or fewer, with its bits and value."""
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
    return table


def recipes_table(rows: list) -> Table:
    """Each recipe's QuantSpec per role ('-': high precision), compute format, training policy and loss scaling."""
    table = Table(title="fewbit recipes (QuantSpec per role; '-' = high precision)", title_style="bold")
    for col in ["recipe", "weight", "input", "grad_output", "compute", "autocast", "params / master", "loss scaling"]:
        table.add_column(col)
    for r in rows:
        table.add_row(r.name, *(str(s) if s is not None else "-" for s in (r.weight, r.input, r.grad_output)),
                      r.compute_format or "fp32", r.autocast or "-", f"{r.param_dtype} / {r.master_weight_dtype}",
                      str(r.loss_scaling))
    return table


def workloads_table(rows: list[dict]) -> Table:
    """Each workload (the records ``fewbit workloads --json`` prints): what it is, its metric, configs, sources."""
    table = Table(title="fewbit workloads", title_style="bold")
    for col in ["workload", "what", "metric", "configs", "data sources (available here?)"]:
        table.add_column(col)
    for r in rows:
        sources = "\n".join(f"{s['name']}: {'yes' if s['available'] else 'no: ' + s['install']}"
                            for s in r["sources"])
        table.add_row(r["name"], r["description"], r["metric"] + (" ↑" if r["higher_is_better"] else " ↓"),
                      ", ".join(r["configs"]), sources)
    return table
