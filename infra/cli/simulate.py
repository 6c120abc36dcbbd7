"""`compensa simulate`: the deterministic saga simulation (or the same workload on the real stack)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from infra.cli.common import console, err, explain, print_error


def _parse_fault_overrides(values: list[str]) -> dict[str, float]:
    overrides = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"expected NAME=RATE, got {item!r}", param_hint="--fault")
        try:
            overrides[name.strip().replace("-", "_")] = float(raw)
        except ValueError:
            raise typer.BadParameter(f"rate of {name!r} must be a number, got {raw!r}", param_hint="--fault") from None
    return overrides


def simulate(
    sagas: Annotated[int, typer.Option("--sagas", "-n", min=1, max=1_000_000, help="Number of orders.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the one RNG every choice draws from.")] = 1,
    faults: Annotated[str, typer.Option(help="Fault profile: none, default or chaos.")] = "default",
    fault: Annotated[list[str], typer.Option("--fault", help="Override one fault rate, NAME=RATE (repeatable).")] = [],  # noqa: B006
    skus: Annotated[int, typer.Option(min=1, max=10_000)] = 8,
    stock_per_sku: Annotated[
        int | None,
        typer.Option(
            min=0, max=2**63 - 1, help="Units per SKU at the start (default: a little under what the paying orders ask for)."
        ),
    ] = None,
    decline_rate: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write report.json and report.html into this directory.")] = None,
    database_url: Annotated[str | None, typer.Option(help="Run on this database instead of a temporary SQLite file.")] = None,
    amqp_url: Annotated[str | None, typer.Option(help="Run the same workload on the real stack (RabbitMQ).")] = None,
    save_seed: Annotated[
        Path | None, typer.Option(help="On a violation, append the seed and options to this regression file.")
    ] = None,
) -> None:
    """Run a deterministic saga simulation with injected faults and check every invariant."""
    from infra.logging import configure_logging
    from sagas.simulation import report as rendering
    from sagas.simulation.faults import profile
    from sagas.simulation.workload import WorkloadSpec

    # Injected faults log as errors by design; the report is the output that matters.
    configure_logging("CRITICAL", "json")
    try:
        rates = profile(faults, _parse_fault_overrides(fault))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--faults/--fault") from None
    spec = WorkloadSpec(sagas=sagas, skus=skus, stock_per_sku=stock_per_sku, decline_rate=decline_rate)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("simulating" if amqp_url is None else "running on the real stack"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=as_json or not err.is_terminal,
    )
    task = progress.add_task("sagas", total=sagas)

    def on_progress(done: int, _total: int) -> None:
        progress.update(task, completed=done)

    if amqp_url is not None:
        if database_url is None:
            raise typer.BadParameter("the real stack needs --database-url as well", param_hint="--amqp-url")
        from infra.simulation.realstack import REAL_FAULTS, real_stack_faults, run_real_stack

        _kept, ignored = real_stack_faults(rates)
        if ignored:
            err.print(
                f"note: the real stack injects only {', '.join(REAL_FAULTS)} (and declines); ignoring {', '.join(ignored)}",
                highlight=False,
                markup=False,
            )
        try:
            with progress:
                result = asyncio.run(
                    run_real_stack(
                        seed, spec, amqp_url=amqp_url, database_url=database_url, faults=rates, on_progress=on_progress
                    )
                )
        except Exception as exc:  # explained in one line, or re-raised
            explained = explain(exc)
            if explained is None:
                raise
            print_error(explained)
            raise typer.Exit(1) from None
    else:
        from infra.simulation.driver import SimulationOptions, run_simulation

        options = SimulationOptions(seed=seed, workload=spec, faults=rates, database_url=database_url)
        with progress:
            result = run_simulation(options, on_progress)

    document = rendering.to_document(result)
    if report is not None:
        report.mkdir(parents=True, exist_ok=True)
        (report / "report.json").write_text(rendering.dumps(document))
        (report / "report.html").write_text(rendering.html_page(document, list(result.durations.values())))
    if as_json:
        sys.stdout.write(rendering.dumps(document) + "\n")
    else:
        console.print(rendering.terminal_summary(document), highlight=False, markup=False)
        if report is not None:
            console.print(f"report written to {report / 'report.html'}", highlight=False)
    if not result.ok:
        if save_seed is not None:
            from sagas.simulation.regressions import save_regression

            save_regression(save_seed, seed=seed, sagas=sagas, faults=faults, overrides=_parse_fault_overrides(fault))
        raise typer.Exit(1)
