"""`compensa simulate`: the deterministic saga simulation (or the same workload on the real stack)."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from infra.cli.common import AppOpt, console, err, explain, explain_database_error, load_app_or_exit, print_error

if TYPE_CHECKING:
    from infra.simulation.swarm import RunSpec

#: Where a failing run is saved unless told otherwise: the working directory, for
#: `compensa simulate --replay compensa-regressions.json` in the project's CI.
DEFAULT_REGRESSIONS = Path("compensa-regressions.json")
#: Options that shape the order workload only: another app draws its own sagas.
ORDER_ONLY = (("skus", "--skus"), ("stock_per_sku", "--stock-per-sku"), ("decline_rate", "--decline-rate"))


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
    ctx: typer.Context,
    sagas: Annotated[int, typer.Option("--sagas", "-n", min=1, max=1_000_000, help="Number of sagas (orders).")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the one RNG every choice draws from.")] = 1,
    faults: Annotated[
        str | None,
        typer.Option(
            help="Fault profile: none, default, chaos or swarm (drawn from the seed). Default: default; swarm for --swarm."
        ),
    ] = None,
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
        Path | None,
        typer.Option(
            help="On a violation, append the run (shrunk, unless --no-shrink) to this regression file "
            f"(default: {DEFAULT_REGRESSIONS} in the working directory; the real stack saves only when given)."
        ),
    ] = None,
    no_save_seed: Annotated[bool, typer.Option("--no-save-seed", help="Save no failing run.")] = False,
    replay: Annotated[
        Path | None,
        typer.Option(
            help="Run every entry of this regression file (as --save-seed writes it); exit 1 if any breaks an invariant."
        ),
    ] = None,
    swarm: Annotated[
        int | None, typer.Option(min=1, max=100_000, help="Run this many seeds from --seed on, each with its own fault mix.")
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="Run a swarm of the seeds A..B (inclusive).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, max=256, help="Processes a swarm runs side by side (default: cores).")
    ] = None,
    liveness: Annotated[
        bool, typer.Option("--liveness", help="Stop the faults when the last order arrived; then every saga must end in time.")
    ] = False,
    heal_after: Annotated[
        float | None, typer.Option(min=0.0, max=1e9, help="Stop the faults after this many virtual seconds (implies --liveness).")
    ] = None,
    liveness_bound: Annotated[
        float | None,
        typer.Option(min=0.0, max=1e9, help="Seconds every saga has to end once faults stop (default: from the deadlines)."),
    ] = None,
    operator_after: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1e9,
            help="Simulate an operator who retries compensation_failed sagas and replays dead letters "
            "this many virtual seconds later (a swarm's default: 60).",
        ),
    ] = None,
    require: Annotated[list[str], typer.Option("--require", help="Fail unless this coverage goal is reached (repeatable).")] = [],  # noqa: B006
    check_determinism: Annotated[
        bool,
        typer.Option(
            "--check-determinism",
            help="Run the seed here and again in a fresh process with another PYTHONHASHSEED; compare the whole event trace.",
        ),
    ] = False,
    shrink: Annotated[
        bool,
        typer.Option(
            "--shrink/--no-shrink",
            help="Reduce a failing run (a swarm: one seed per way of failing) to the smallest that still fails.",
        ),
    ] = True,
    variant: Annotated[
        str | None,
        typer.Option(help="module:attribute of a test build of the product (handler overrides...), to prove the checker."),
    ] = None,
    app: AppOpt = None,
) -> None:
    """Run a deterministic saga simulation with injected faults and check every invariant."""
    from infra.logging import configure_logging
    from infra.simulation.swarm import RunSpec
    from sagas.simulation import coverage
    from sagas.simulation.faults import profile

    if replay is not None:
        _refuse_beside_replay(ctx)
        _replay(replay, workers, as_json)
        return
    if no_save_seed and save_seed is not None:
        raise typer.BadParameter("give --save-seed PATH or --no-save-seed, not both", param_hint="--no-save-seed")
    # Refused before the run, not after it: a report path that names a file cannot become a directory.
    if report is not None and report.exists() and not report.is_dir():
        print_error(
            f"--report: {report} exists and is not a directory; give a directory for report.json and report.html",
            as_json=as_json,
        )
        raise typer.Exit(2)
    if database_url is not None:
        from infra.settings import check_database_url

        try:
            check_database_url(database_url)
        except ValueError as exc:  # its message never quotes the URL (a password)
            raise typer.BadParameter(str(exc), param_hint="--database-url") from None
    hosted = load_app_or_exit(app, as_json=as_json)
    _check_app_simulates(ctx, hosted, app, as_json)
    app_goals = _app_goals(hosted)
    if app is not None and amqp_url is not None:
        raise typer.BadParameter(
            "the real-stack run replays the order workload; run your app on the real stack with `compensa run --app`",
            param_hint="--amqp-url",
        )
    # Injected faults log as errors by design; the report is the output that matters.
    configure_logging("CRITICAL", "json")
    overrides = _parse_fault_overrides(fault)
    unknown = sorted(set(coverage.unknown_goals(require)) - set(app_goals))
    if unknown:
        known = [*coverage.GOALS, *app_goals]
        raise typer.BadParameter(
            f"unknown coverage goal(s) {', '.join(unknown)}; known: {', '.join(known)}", param_hint="--require"
        )
    if variant is not None:
        from infra.simulation.driver import load_variant

        try:
            load_variant(variant, str(Path.cwd()))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--variant") from None
    variant_path = str(Path.cwd()) if variant is not None else None
    is_swarm = swarm is not None or seeds is not None
    if is_swarm:
        conflicting = [
            name
            for name, given in (
                ("--amqp-url", amqp_url),
                ("--database-url", database_url),
                ("--report", report),
                ("--check-determinism", check_determinism or None),
            )
            if given is not None
        ]
        if conflicting:
            raise typer.BadParameter(
                f"a swarm runs many seeds in their own processes; {', '.join(conflicting)} applies to one run "
                "(re-run a seed with the command the swarm prints)",
                param_hint="--swarm/--seeds",
            )
    # The real stack is not the simulator: a failing real run replays nothing, so it is saved only when asked.
    seed_file = None if no_save_seed else save_seed or (None if amqp_url is not None else DEFAULT_REGRESSIONS)
    chosen = faults or ("swarm" if is_swarm else "default")
    try:
        profile(chosen, overrides, seed=seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--faults/--fault") from None
    common: dict[str, Any] = {
        "sagas": sagas,
        "skus": skus,
        "stock_per_sku": stock_per_sku,
        "decline_rate": decline_rate,
        "liveness": liveness,
        "heal_after": heal_after,
        "liveness_bound": liveness_bound,
        "variant": variant,
        "variant_path": variant_path,
        "app": app,
        "app_path": str(Path.cwd()) if app is not None else None,
    }

    if is_swarm:
        _run_swarm(
            seeds,
            seed,
            swarm,
            chosen,
            overrides,
            common | {"operator_after": operator_after},
            workers=workers,
            required=require,
            shrink=shrink,
            save_seed=seed_file,
            as_json=as_json,
            app_goals=app_goals,
        )
        return

    spec = RunSpec(seed=seed, faults=chosen, overrides=tuple(sorted(overrides.items())), operator_after=operator_after, **common)
    if check_determinism:
        if amqp_url is not None:
            raise typer.BadParameter(
                "the real stack is not deterministic; check a simulated run", param_hint="--check-determinism"
            )
        _check_determinism(spec, as_json)
        return
    rates = spec.rates()

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sagas.simulation import report as rendering
    from sagas.simulation.workload import WorkloadSpec

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
        spec_for_real = WorkloadSpec(sagas=sagas, skus=skus, stock_per_sku=stock_per_sku, decline_rate=decline_rate)
        try:
            with progress:
                result = asyncio.run(
                    run_real_stack(
                        seed, spec_for_real, amqp_url=amqp_url, database_url=database_url, faults=rates, on_progress=on_progress
                    )
                )
        except Exception as exc:  # explained in one line, or re-raised
            explained = explain(exc)
            if explained is None:
                raise
            print_error(explained, as_json=as_json)
            raise typer.Exit(1) from None
    else:
        from dataclasses import replace

        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import DBAPIError

        from infra.simulation.driver import run_simulation

        options = replace(spec.options(), database_url=database_url)
        try:
            with progress:
                result = run_simulation(options, on_progress)
        except (DBAPIError, OSError, TimeoutError) as exc:
            if database_url is None:
                raise
            where = make_url(database_url).render_as_string(hide_password=True)
            print_error(explain_database_error(exc, where, named_by="--database-url"), as_json=as_json)
            raise typer.Exit(1) from None

    document = rendering.to_document(result)
    if report is not None:
        try:
            report.mkdir(parents=True, exist_ok=True)
            (report / "report.json").write_text(rendering.dumps(document))
            (report / "report.html").write_text(rendering.html_page(document, list(result.durations.values())))
        except OSError as exc:
            print_error(f"--report: cannot write the report into {report}: {exc.strerror or exc}", as_json=as_json)
            raise typer.Exit(1) from None
    unmet = coverage.unmet(require, result.coverage)
    shrunk = None
    saved = None
    if not result.ok:
        if shrink and amqp_url is None:
            from infra.simulation.swarm import shrink_failure

            shrunk = shrink_failure(spec)
            document["shrunk"] = shrunk.as_dict()
        if seed_file is not None:
            saved = _save(seed_file, [shrunk.spec if shrunk is not None else spec], as_json=as_json)
            document["saved_to"] = str(saved) if saved is not None else None
    if as_json:
        sys.stdout.write(rendering.dumps(document | ({"unmet_goals": unmet} if require else {})) + "\n")
    else:
        console.print(rendering.terminal_summary(document), highlight=False, markup=False)
        if report is not None:
            console.print(f"report written to {report / 'report.html'}", highlight=False)
        if not result.ok and amqp_url is None:
            console.print(f"reproduce:       {spec.command()}", highlight=False, markup=False, soft_wrap=True)
        if shrunk is not None:
            _print_shrunk(shrunk)
        if saved is not None:
            _print_saved(saved, 1)
    if not result.ok:
        raise typer.Exit(1)
    if unmet:
        print_error(coverage.unmet_message(unmet, app_goals))
        raise typer.Exit(1)


def _app_goals(app: Any) -> dict[str, str]:
    """The coverage goals the hosted app adds to compensa's own."""
    return {name: goal.description for name, goal in app.simulation.goals.items()} if app.simulation is not None else {}


def _check_app_simulates(ctx: typer.Context, hosted: Any, app: str | None, as_json: bool) -> None:
    """Refuse what cannot apply to the hosted app: the order workload's options, or no simulation at all."""
    from infra.apps import ORDER_APP

    if hosted is ORDER_APP:
        return
    if hosted.simulation is None:
        print_error(
            f"--app {app}: app {hosted.name!r} has no simulation pieces (SagaApp.simulation: a workload and invariants); "
            "docs/tutorial.md shows how to add them",
            as_json=as_json,
        )
        raise typer.Exit(2)
    given = [flag for name, flag in ORDER_ONLY if _on_command_line(ctx, name)]
    if given:
        raise typer.BadParameter(
            f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} the order workload; app {hosted.name!r} draws "
            "its own sagas (SimulationPieces.workload), sized by --sagas",
            param_hint=given[0],
        )


def _save(path: Path, specs: list[RunSpec], *, as_json: bool) -> Path | None:
    """Append the runs to the regression file at `path`; the path, or None (said on stderr) when it cannot be written."""
    from sagas.simulation.regressions import save_regression

    try:
        for spec in specs:
            save_regression(path, **spec.regression_entry())
    except (OSError, ValueError) as exc:  # a directory, no permission, or a file that is not a regression list
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print_error(f"--save-seed: cannot save the failing run to {path}: {reason}", as_json=False)
        return None
    return path


def _print_saved(path: Path, runs: int) -> None:
    console.print(
        f"saved to {path}: {runs} failing run{'s' if runs != 1 else ''} "
        f"(replay: compensa simulate --replay {shlex.quote(str(path))})",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


#: What `--replay` may be given beside it: the entries say everything else.
REPLAY_OPTIONS = frozenset({"replay", "workers", "as_json"})


def _on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option `name` on the command line (not its default, nor an environment variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _refuse_beside_replay(ctx: typer.Context) -> None:
    given = [
        param for param in ctx.command.params if param.name not in REPLAY_OPTIONS and _on_command_line(ctx, param.name or "")
    ]
    if given:
        flags = ", ".join(param.opts[0] for param in given)
        raise typer.BadParameter(
            f"each entry of the file says its own run; {flags} cannot apply (only --workers and --json can)",
            param_hint="--replay",
        )


def _replay(path: Path, workers: int | None, as_json: bool) -> None:
    """Run every entry of the regression file at `path`; exit 1 if any breaks an invariant."""
    import json

    from infra.logging import configure_logging
    from infra.simulation.swarm import default_workers, parallel_map, run_one

    specs = _regression_specs(path)
    configure_logging("CRITICAL", "json")
    outcomes = parallel_map(run_one, specs, workers or default_workers())
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        document = {"ok": not failed, "file": str(path), "runs": len(outcomes), "failed": len(failed)}
        document["entries"] = [o.as_dict() for o in outcomes]
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        lines = []
        for outcome in outcomes:
            verdict = "ok" if outcome.ok else f"{outcome.violation_count} violations ({', '.join(outcome.invariants)})"
            lines.append(f"{'✓' if outcome.ok else '✗'} seed {outcome.seed}: {verdict}: {outcome.spec.command()}")
        lines.append(f"replayed {len(outcomes)} runs from {path}: {len(failed)} failed")
        console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _regression_specs(path: Path) -> list[RunSpec]:
    """The runs a regression file lists, each checked (faults, variant, app) before any runs; exit 2 naming the first bad one."""
    import json

    from infra.apps import ORDER_APP, resolve_app
    from infra.simulation.driver import load_variant
    from infra.simulation.swarm import RunSpec

    def refuse(message: str) -> typer.Exit:
        print_error(f"--replay {path}: {message}")
        return typer.Exit(2)

    try:
        entries = json.loads(path.read_text())
    except OSError as exc:
        raise refuse(exc.strerror or str(exc)) from None
    except ValueError as exc:  # JSON, or text that is not UTF-8
        raise refuse(f"not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise refuse("expected a non-empty JSON list of runs, as --save-seed writes")
    here = str(Path.cwd())
    specs = []
    for number, entry in enumerate(entries, start=1):
        try:
            spec = RunSpec.from_regression(entry, here)
            spec.rates()
            if spec.variant is not None:
                load_variant(spec.variant, here)
            hosted = resolve_app(spec.app, here)
        except ValueError as exc:  # AppLoadError is one
            raise refuse(f"entry {number}: {exc}") from None
        if hosted is not ORDER_APP and hosted.simulation is None:
            raise refuse(f"entry {number}: app {hosted.name!r} has no simulation pieces")
        specs.append(spec)
    return specs


def _print_shrunk(shrunk: Any) -> None:
    faults = ", ".join(f"{k}={v:g}" for k, v in shrunk.spec.overrides) or "none"
    console.print(
        f"shrunk seed {shrunk.spec.seed} in {shrunk.runs} runs ({shrunk.seconds:.1f} s): "
        f"{shrunk.original.sagas} -> {shrunk.spec.sagas} sagas, faults {faults}; "
        f"still breaks {', '.join(shrunk.invariants)}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    console.print(f"  reproduce: {shrunk.spec.command()}", highlight=False, markup=False, soft_wrap=True)


def _check_determinism(spec: RunSpec, as_json: bool) -> None:
    import json

    from infra.simulation.swarm import SecondRunError, check_determinism

    try:
        found = check_determinism(spec)
    except SecondRunError as exc:
        print_error(str(exc), as_json=as_json)
        raise typer.Exit(1) from None
    runs = f"here (PYTHONHASHSEED {found.hash_seeds[0]}) and in a fresh process (PYTHONHASHSEED {found.hash_seeds[1]})"
    if as_json:
        sys.stdout.write(json.dumps(found.as_dict(), indent=2, sort_keys=True) + "\n")
    else:
        first, second = found.events
        if found.ok:
            console.print(
                f"determinism: seed {spec.seed} run {runs}, {first} events each, "
                f"trace sha256 {found.digests[0][:16]}…: identical",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        elif found.divergence is not None:
            diverged = found.divergence.as_dict()
            console.print(
                f"determinism: seed {spec.seed} run {runs} DIVERGED at event #{diverged['index']} "
                f"(traces of {first} and {second} events)\n"
                f"  first run:  {diverged['first']}\n"
                f"  second run: {diverged['second']}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        else:
            console.print(
                f"determinism: seed {spec.seed}: the traces agree but the final reports differ", highlight=False, markup=False
            )
    if not found.ok:
        raise typer.Exit(1)


def _run_swarm(
    seeds: str | None,
    seed: int,
    swarm: int | None,
    faults: str,
    overrides: dict[str, float],
    common: dict[str, Any],
    *,
    workers: int | None,
    required: list[str],
    shrink: bool,
    save_seed: Path | None,
    as_json: bool,
    app_goals: dict[str, str],
) -> None:
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from infra.simulation.swarm import SWARM_OPERATOR_AFTER, RunSpec, default_workers, run_swarm, seed_range
    from sagas.simulation import coverage

    if seeds is not None:
        try:
            chosen = seed_range(seeds)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--seeds") from None
    else:
        chosen = list(range(seed, seed + (swarm or 1)))
    if common["operator_after"] is None:
        common = common | {"operator_after": SWARM_OPERATOR_AFTER}
    specs = []
    for each in chosen:
        if faults == "swarm":
            drawn = RunSpec.swarm_seed(each, **common)
            specs.append(drawn.with_faults(common["sagas"], drawn.fault_fields() | overrides) if overrides else drawn)
        else:
            specs.append(RunSpec(seed=each, faults=faults, overrides=tuple(sorted(overrides.items())), **common))
    processes = workers or default_workers()
    progress = Progress(
        TextColumn(f"swarm of {len(specs)} seeds on {processes} processes"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=as_json or not err.is_terminal,
    )
    task = progress.add_task("seeds", total=len(specs))
    with progress:
        result = run_swarm(specs, processes, required=required, shrink_failures=shrink, on_done=lambda _o: progress.advance(task))
    document = result.as_dict()
    saved = None
    if save_seed is not None and result.failures:
        # One run per way of failing: shrunk when shrinking, else the first seed that failed so.
        keep = [s.spec for s in result.shrunk] if result.shrunk else [o.spec for o in result.distinct_failures()]
        saved = _save(save_seed, keep, as_json=as_json)
        document["saved_to"] = str(saved) if saved is not None else None
    if as_json:
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
    else:
        lines = [
            f"compensa simulate — swarm of {len(specs)} seeds ({chosen[0]}..{chosen[-1]}), {common['sagas']} sagas each, "
            f"faults {faults}, {processes} processes",
            f"seeds run:       {document['runs']}, failed {len(result.failures)}",
        ]
        for outcome in result.failures:
            lines.append(f"  ✗ seed {outcome.seed}: {outcome.violation_count} violations ({', '.join(outcome.invariants)})")
            lines.append(f"    reproduce: {outcome.spec.command()}")
        reached = {goal: len(found) for goal, found in result.reached().items()}
        lines.append("coverage:        " + coverage_seeds_line(reached))
        lines.append(
            f"throughput:      {document['sagas']:,} sagas in {document['wall']['seconds']:.2f} s wall, "
            f"{document['wall']['sagas_per_second']} sagas/s"
        )
        console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)
        for shrunk in result.shrunk:
            _print_shrunk(shrunk)
        if saved is not None:
            _print_saved(saved, len(keep))
    unmet = result.unmet()
    if unmet:
        print_error(coverage.unmet_message(unmet, app_goals) + f" by any of the {len(specs)} seeds")
    if not result.ok:
        raise typer.Exit(1)


def coverage_seeds_line(reached: dict[str, int]) -> str:
    hit = ", ".join(f"{goal} ({count} seeds)" for goal, count in reached.items() if count) or "none"
    missed = [goal for goal, count in reached.items() if not count]
    return hit + (f"; not reached: {', '.join(missed)}" if missed else "")
