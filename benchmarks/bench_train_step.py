"""One training step and one eval forward of a ReLU MLP under each fewbit recipe, beside torchao's float8 emulation;
optionally the same for one workload's real model and batch.

    python -m benchmarks.bench_train_step [--batch 256 --width 1024 --layers 4] [--workload lm]
        [--json out/bench_train_step.json]

A step is forward, loss (MLP: MSE against a fixed random target; a workload: its own training loss on its batch 0),
backward, SGD step and zero_grad. Every configuration starts from a deep copy of the same initial model: plain torch
(unconverted), ``fewbit.quantize_`` with each recipe, and torchao's ``convert_to_float8_training(...,
config=Float8LinearConfig(emulate=True))``. The eval forward runs with ``model.eval()`` under ``torch.no_grad()``,
where fewbit caches the quantized weights and compares each weight's bits with the copy the cache was made from on
every forward; the frozen eval forward runs the same inside ``fewbit.nn.frozen_weights``, as fewbit's own
evaluations do (the cache trusted: version counter and storage only). Ratios are to the fewbit ``fp32`` recipe of
the same model measured in the same run. Compilation happens in the first, untimed call, reported in its own column.
Timing then runs in rounds that visit every configuration in turn (so a busy neighbour slows all of them alike);
each round takes the median of ``--repeats`` calls after ``--warmup`` untimed ones, and the table shows the median
over the rounds with its spread (half the range, in percent). On a shared machine ``--threads 1`` gives steadier
numbers, and ``--threads 1 --clock thread`` (the thread's CPU time instead of wall time) steady ones while other
jobs share the machine. ``--profile RECIPE`` adds a torch.profiler table of one MLP training step under that recipe,
sorted by self CPU time. The printed targets are the project's stated goals for the MX recipes on the MLP; a MISS is
reported, never raised.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

import fewbit
from benchmarks.common import CLOCKS, environment, time_it, write_json

RECIPES = ["fp32", "bf16", "fp8", "mxfp8", "mxfp6", "mxfp4", "int8"]
BASELINE = "fp32"
# The project's stated targets: (recipe, measurement, most allowed ratio to the fp32 recipe), on the MLP.
TARGETS = [(recipe, kind, limit) for recipe in ("mxfp8", "mxfp6", "mxfp4")
           for kind, limit in (("step", 1.5), ("eval", 1.15), ("frozen", 1.15))]
KINDS = ("step", "eval", "frozen")
WHAT = {"step": "training step", "eval": "eval forward (cached weights, bits checked)",
        "frozen": "eval forward (cached weights, frozen_weights)"}


def make_mlp(width: int, layers: int) -> torch.nn.Sequential:
    mods: list[torch.nn.Module] = []
    for i in range(layers):
        mods.append(torch.nn.Linear(width, width))
        if i < layers - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def torchao_float8(model: torch.nn.Module) -> torch.nn.Module | None:
    """torchao's emulated float8 training conversion, or None when torchao is not installed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        return None
    return convert_to_float8_training(model, config=Float8LinearConfig(emulate=True))


def first_call_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Config:
    """One model with its optimizer, its training-step and eval-forward callables, and what was measured."""

    def __init__(self, name: str, model: torch.nn.Module, loss: Callable[[torch.nn.Module], torch.Tensor],
                 baseline: str = BASELINE) -> None:
        self.name, self.model, self.loss, self.baseline = name, model, loss, baseline
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        self.first: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.times: dict[str, list[float]] = {kind: [] for kind in KINDS}

    def step(self) -> None:
        self.loss(self.model).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def forward(self) -> None:
        with torch.no_grad():
            self.loss(self.model)

    def frozen(self) -> None:
        with torch.no_grad(), fewbit.nn.frozen_weights(self.model):
            self.loss(self.model)

    def run(self, kind: str, first: bool, repeats: int, warmup: int, clock: str = "wall") -> None:
        """The first (compiling) call, or one round of timing; a failure is recorded, not raised."""
        if kind in self.errors:
            return
        self.model.train(kind == "step")
        fn = {"step": self.step, "eval": self.forward, "frozen": self.frozen}[kind]
        try:
            if first:
                self.first[kind] = first_call_s(fn)
            else:  # the warm-up also refreshes the eval weight cache after the training steps changed the weights
                self.times[kind].append(time_it(fn, repeats=repeats, warmup=warmup, clock=clock))
        except Exception as error:  # a configuration that fails is reported, not fatal to the whole run
            self.errors[kind] = f"{type(error).__name__}: {error}"

    def row(self) -> dict:
        row: dict = {"config": self.name, "baseline": self.baseline}
        for kind, times in self.times.items():
            ok = kind not in self.errors and times
            median = statistics.median(times) if ok else None
            row[f"{kind}_ms"] = median * 1e3 if ok else None
            row[f"{kind}_spread_pct"] = 50 * (max(times) - min(times)) / median if ok else None
            row[f"{kind}_first_s"] = self.first.get(kind)
            row[f"{kind}_round_ms"] = [t * 1e3 for t in times]
            if kind in self.errors:
                row[f"{kind}_error"] = self.errors[kind]
        return row


def profile_step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, rows: int) -> str:
    """torch.profiler table of one (already warmed-up) training step, sorted by self CPU time."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def workload_configs(name: str, config: str, recipes: list[str]) -> list[Config]:
    """One configuration per recipe on a workload's model (built once, deep-copied) and its training batch 0."""
    from fewbit import workloads

    cls = workloads.get(name)
    workload = cls(cls.load_config(config)).setup()
    base = workload.build_model()
    batch = workload.batch(0)

    def loss(model: torch.nn.Module) -> torch.Tensor:
        return workload.loss(model, batch)

    baseline = f"{name} {BASELINE}"
    return [Config(f"{name} {r}", fewbit.quantize_(copy.deepcopy(base), r), loss, baseline) for r in recipes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--recipes", nargs="+", default=RECIPES, help=f"fewbit recipes (default: {' '.join(RECIPES)})")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, each over every configuration in turn")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration and round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice); 1 gives steadier "
                        "numbers on a shared machine")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time (default), or the "
                        "calling thread's CPU time (with --threads 1: steady on a machine shared with other jobs)")
    parser.add_argument("--profile", metavar="RECIPE", help="also print a torch.profiler table of one step")
    parser.add_argument("--workload", help="also time this workload's model on its own batch (e.g. lm, vision), "
                        "under fp32 and the recipes")
    parser.add_argument("--workload-config", default="quick", help="the workload's config (default: quick)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    base = make_mlp(args.width, args.layers)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.width, generator=gen)
    target = torch.randn(args.batch, args.width, generator=gen)

    Convert = Callable[[torch.nn.Module], torch.nn.Module | None]
    configs: list[tuple[str, Convert]] = [("torch (unconverted)", lambda m: m)]
    recipes = [BASELINE] + [r for r in args.recipes if r != BASELINE]
    configs += [(r, lambda m, r=r: fewbit.quantize_(m, r)) for r in recipes]
    configs.append(("torchao float8 emulate", torchao_float8))

    def mlp_loss(model: torch.nn.Module) -> torch.Tensor:
        return torch.nn.functional.mse_loss(model(x), target)

    runs = [Config(name, model, mlp_loss) for name, convert in configs
            if (model := convert(copy.deepcopy(base))) is not None]
    if args.workload:
        runs += workload_configs(args.workload, args.workload_config, recipes)
    for first in [True] + [False] * args.rounds:  # rounds interleave the configurations, so drift hits all alike
        for run in runs:
            for kind in KINDS:
                run.run(kind, first, args.repeats, args.warmup, args.clock)
    rows = [run.row() for run in runs]
    by_config = {r["config"]: r for r in rows}
    for r in rows:
        ref = by_config[r["baseline"]]
        for kind in KINDS:
            ok = r[f"{kind}_ms"] is not None and ref[f"{kind}_ms"] is not None
            r[f"{kind}_vs_fp32"] = r[f"{kind}_ms"] / ref[f"{kind}_ms"] if ok else None

    console = Console(width=140)
    console.print(environment())
    table = Table(title=f"Training step and eval forward, {args.layers}x Linear({args.width}, {args.width}) ReLU MLP, "
                        f"batch {args.batch}, float32 master weights, SGD; median over {args.rounds} rounds of the "
                        f"median of {args.repeats} ({torch.get_num_threads()} threads, {args.clock} clock)"
                        + (f"; rows '{args.workload} <recipe>': the {args.workload} workload's model "
                           f"({args.workload_config} config) on its batch, ratios to its own fp32" if args.workload
                           else ""))
    for col in ["config", "step ms", "±%", "x fp32", "first step s", "eval fwd ms", "±%", "x fp32 eval",
                "first eval s", "frozen eval ms", "±%", "x fp32 frozen"]:
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in rows:
        cells = [(r[f"{kind}_{key}"], fmt) for kind in KINDS
                 for key, fmt in [("ms", ".1f"), ("spread_pct", ".0f"), ("vs_fp32", ".2f"), ("first_s", ".2f")]
                 if not (kind == "frozen" and key == "first_s")]  # the first frozen call is not a compile
        table.add_row(r["config"], *("error" if v is None else f"{v:{fmt}}" for v, fmt in cells))
    console.print(table)
    for r in rows:
        for kind in KINDS:
            if f"{kind}_error" in r:
                console.print(f"[red]{r['config']} {kind} failed[/red]: {r[f'{kind}_error']}", markup=True)

    by_name = {r["config"]: r for r in rows}
    targets = []
    for recipe, kind, limit in TARGETS:
        if recipe not in by_name:
            continue
        ratio = by_name[recipe][f"{kind}_vs_fp32"]
        ok = ratio is not None and ratio <= limit
        targets.append({"recipe": recipe, "measure": kind, "limit": limit, "ratio": ratio, "pass": ok})
        what = WHAT[kind]
        shown = "error" if ratio is None else f"{ratio:.2f}x"
        console.print(f"target: {recipe} {what} <= {limit:g}x fp32: {shown} "
                      f"{'[green]PASS[/green]' if ok else '[red]MISS[/red]'}")

    profile = None
    if args.profile:
        profile = profile_step(fewbit.quantize_(copy.deepcopy(base), args.profile), x, target, rows=25)
        console.print(f"\ntorch.profiler, one {args.profile} training step, sorted by self CPU time:")
        print(profile)

    write_json(args.json, {"environment": environment(), "clock": args.clock, "batch": args.batch, "width": args.width,
                           "layers": args.layers, "rounds": args.rounds, "repeats": args.repeats,
                           "warmup": args.warmup, "rows": rows,
                           "targets": targets, "profile": profile})


if __name__ == "__main__":
    main()
