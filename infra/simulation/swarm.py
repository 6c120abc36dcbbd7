"""Many simulated runs: swarms of seeds across processes, shrinking, the determinism self-check.

A `RunSpec` is one run as plain values (picklable, and printable as the one-line
`compensa simulate …` command that reproduces it); `SimulationOptions` is built from
it inside whichever process runs it. A swarm runs one spec per seed, each seed
drawing its own fault mix (`sagas.simulation.faults.swarm_rates`), on a process pool
with one simulation per process at a time: the simulator is single-threaded on
purpose, so cores are used by running seeds side by side.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any

from sagas.simulation import coverage
from sagas.simulation.faults import FaultRates, differences, profile, swarm_rates
from sagas.simulation.shrink import Candidate, shrink
from sagas.simulation.trace import Divergence, Event, digest, first_divergence
from sagas.simulation.workload import WorkloadSpec

#: How the CLI's `simulate` is spelled in a reproducing command.
COMMAND = "compensa simulate"
#: The operator delay a swarm uses unless told otherwise (virtual seconds).
SWARM_OPERATOR_AFTER = 60.0


@dataclass(frozen=True)
class RunSpec:
    """One simulated run, as the CLI options that make it (defaults as `compensa simulate`'s)."""

    seed: int = 1
    sagas: int = 200
    faults: str = "default"
    #: `--fault NAME=VALUE` overrides, sorted.
    overrides: tuple[tuple[str, float], ...] = ()
    skus: int = 8
    stock_per_sku: int | None = None
    decline_rate: float = 0.1
    liveness: bool = False
    heal_after: float | None = None
    liveness_bound: float | None = None
    operator_after: float | None = None
    #: `module:attribute` of a variant (`driver.load_variant`), and the directory it is imported from.
    variant: str | None = None
    variant_path: str | None = None
    #: `module:attribute` of the saga application (`--app`; None: the order app), and where it is imported from.
    app: str | None = None
    app_path: str | None = None

    @classmethod
    def swarm_seed(cls, seed: int, **options: Any) -> RunSpec:
        """A swarm seed's run: its drawn rates spelled out, so its command needs no swarm to replay."""
        drawn = differences(swarm_rates(seed))
        return cls(seed=seed, faults="none", overrides=tuple(sorted(drawn.items())), **options)

    def rates(self) -> FaultRates:
        return profile(self.faults, dict(self.overrides), seed=self.seed)

    def options(self, *, trace: bool = False) -> Any:
        """The SimulationOptions of this run (the variant loaded here, in the running process)."""
        from infra.apps import resolve_app
        from infra.simulation.driver import SimulationOptions, load_variant

        seams = load_variant(self.variant, self.variant_path) if self.variant else {}
        return SimulationOptions(
            seed=self.seed,
            workload=WorkloadSpec(
                sagas=self.sagas, skus=self.skus, stock_per_sku=self.stock_per_sku, decline_rate=self.decline_rate
            ),
            faults=self.rates(),
            liveness=self.liveness or self.heal_after is not None,
            heal_after=self.heal_after,
            liveness_bound=self.liveness_bound,
            operator_after=self.operator_after,
            trace=trace,
            app=resolve_app(self.app, self.app_path),
            **seams,
        )

    def with_faults(self, sagas: int, faults: dict[str, float]) -> RunSpec:
        """The same run with `sagas` and exactly these fault fields (over no faults)."""
        return replace(self, sagas=sagas, faults="none", overrides=tuple(sorted(faults.items())))

    def fault_fields(self) -> dict[str, float]:
        """Every fault field that differs from no faults: what `with_faults` takes back."""
        return differences(self.rates())

    def regression_entry(self) -> dict[str, Any]:
        """This run as a regression file entry (`sagas.simulation.regressions`)."""
        defaults = RunSpec()
        entry: dict[str, Any] = {"seed": self.seed, "sagas": self.sagas, "faults": self.faults, "overrides": dict(self.overrides)}
        for key in (
            "skus",
            "stock_per_sku",
            "decline_rate",
            "liveness",
            "heal_after",
            "liveness_bound",
            "operator_after",
            "variant",
            "app",
        ):
            if getattr(self, key) != getattr(defaults, key):
                entry[key] = getattr(self, key)
        return entry

    @classmethod
    def from_regression(cls, entry: dict[str, Any], search_path: str | None = None) -> RunSpec:
        """The run a regression file entry names; its variant and app are imported from `search_path`.

        `search_path` is the directory the entry was saved from (None: the working
        directory when the run loads them), as `--variant` and `--app` take it.
        """
        from sagas.simulation.regressions import OPTIONAL_KEYS

        missing = sorted({"seed", "sagas", "faults"} - set(entry))
        unknown = sorted(set(entry) - {"seed", "sagas", "faults", "overrides"} - OPTIONAL_KEYS)
        if missing or unknown:
            said = [f"missing {', '.join(missing)}"] if missing else []
            said += [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
            raise ValueError(f"not a regression entry: {'; '.join(said)}")
        overrides = entry.get("overrides", {})
        counts = [entry[key] for key in ("seed", "sagas") if key in entry]
        if not all(type(value) is int for value in counts) or entry["sagas"] < 1:
            raise ValueError("not a regression entry: seed and sagas are integers, sagas at least 1")
        if not isinstance(entry["faults"], str) or not isinstance(overrides, dict):
            raise ValueError("not a regression entry: faults is a profile's name and overrides an object of rates")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in overrides.values()):
            raise ValueError("not a regression entry: every override is a number")
        options = {k: v for k, v in entry.items() if k != "overrides"}
        return cls(
            overrides=tuple(sorted(overrides.items())),
            variant_path=search_path if "variant" in entry else None,
            app_path=search_path if "app" in entry else None,
            **options,
        )

    def command(self) -> str:
        """The one-line `compensa simulate …` that runs exactly this."""
        args = ["--seed", str(self.seed), "--sagas", str(self.sagas), "--faults", self.faults]
        if self.app is not None:
            args = ["--app", self.app, *args]
        for name, value in self.overrides:
            args += ["--fault", f"{name}={float(value)!r}"]
        defaults = RunSpec()
        if self.skus != defaults.skus:
            args += ["--skus", str(self.skus)]
        if self.stock_per_sku is not None:
            args += ["--stock-per-sku", str(self.stock_per_sku)]
        if self.decline_rate != defaults.decline_rate:
            args += ["--decline-rate", repr(float(self.decline_rate))]
        if self.liveness and self.heal_after is None:
            args += ["--liveness"]
        if self.heal_after is not None:
            args += ["--heal-after", repr(float(self.heal_after))]
        if self.liveness_bound is not None:
            args += ["--liveness-bound", repr(float(self.liveness_bound))]
        if self.operator_after is not None:
            args += ["--operator-after", repr(float(self.operator_after))]
        if self.variant is not None:
            args += ["--variant", self.variant]
        return " ".join([COMMAND, *(shlex.quote(arg) for arg in args)])


@dataclass(frozen=True)
class SeedOutcome:
    """What one run of a swarm found, small enough to send back from a worker."""

    spec: RunSpec
    ok: bool
    sagas: int
    wall_seconds: float
    outcomes: dict[str, int]
    coverage: dict[str, int]
    #: The names of the invariants broken, and the first few violations as the report has them.
    invariants: tuple[str, ...] = ()
    violations: tuple[dict[str, Any], ...] = ()
    violation_count: int = 0

    @property
    def seed(self) -> int:
        return self.spec.seed

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "ok": self.ok,
            "command": self.spec.command(),
            "outcomes": self.outcomes,
            "coverage": self.coverage,
            "invariants_broken": list(self.invariants),
            "violation_count": self.violation_count,
            "violations": list(self.violations),
            "wall_seconds": round(self.wall_seconds, 3),
        }


def run_one(spec: RunSpec) -> SeedOutcome:
    """Run `spec` in this process and sum it up."""
    from infra.simulation.driver import run_simulation

    started = time.perf_counter()
    result = run_simulation(spec.options())
    names = tuple(dict.fromkeys(v.invariant for v in result.violations))
    return SeedOutcome(
        spec=spec,
        ok=result.ok,
        sagas=len(result.workload.orders),
        wall_seconds=time.perf_counter() - started,
        outcomes=result.outcomes,
        coverage=result.coverage,
        invariants=names,
        violations=tuple(v.as_dict() for v in result.violations[:5]),
        violation_count=len(result.violations),
    )


def _quiet_worker() -> None:
    """Injected faults log as errors by design; a worker's output is its outcome."""
    from infra.logging import configure_logging

    configure_logging("CRITICAL", "json")


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: workers fork from a clean server that imported the simulator once,
    # never from a parent with threads (a progress bar's) or an event loop.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["infra.simulation.driver"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_quiet_worker)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(
    function: Callable[[Any], Any], items: Sequence[Any], workers: int, on_done: Callable[[Any], None] | None = None
) -> list[Any]:
    """`function` over `items`, `workers` processes at a time (1: here, in order); results in item order."""
    if workers <= 1 or len(items) <= 1:
        results = []
        for item in items:
            results.append(function(item))
            if on_done is not None:
                on_done(results[-1])
        return results
    found: dict[int, Any] = {}
    with _pool(min(workers, len(items))) as pool:
        futures = {pool.submit(function, item): index for index, item in enumerate(items)}
        for future in as_completed(futures):
            found[futures[future]] = future.result()
            if on_done is not None:
                on_done(found[futures[future]])
    return [found[index] for index in range(len(items))]


@dataclass
class Shrunk:
    """A failing run reduced: the smallest spec that still fails, and what it took."""

    original: RunSpec
    spec: RunSpec
    runs: int
    seconds: float
    steps: list[str]
    invariants: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "seed": self.spec.seed,
            "from_command": self.original.command(),
            "command": self.spec.command(),
            "sagas": self.spec.sagas,
            "faults": dict(self.spec.overrides),
            "runs": self.runs,
            "seconds": round(self.seconds, 3),
            "steps": self.steps,
            "invariants_broken": list(self.invariants),
        }


def shrink_failure(spec: RunSpec, budget: int = 40) -> Shrunk:
    """Reduce a failing `spec` (fewer sagas, fewer faults, lower rates) to the smallest that fails the same way.

    "The same way": at least one invariant the original broke is broken again.
    """
    started = time.perf_counter()
    broken = set(run_one(spec).invariants)
    if not broken:
        raise ValueError(f"seed {spec.seed} does not fail: nothing to shrink ({spec.command()})")
    last: dict[Candidate, tuple[str, ...]] = {}

    def still_fails(candidate: Candidate) -> bool:
        names = run_one(spec.with_faults(candidate.sagas, candidate.rates)).invariants
        last[candidate] = names
        return bool(broken & set(names))

    start = Candidate.of(spec.sagas, spec.fault_fields())
    found = shrink(start, still_fails, budget=budget)
    smallest = spec.with_faults(found.candidate.sagas, found.candidate.rates) if found.steps else spec
    invariants = last.get(found.candidate, tuple(sorted(broken)))
    return Shrunk(spec, smallest, found.runs + 1, time.perf_counter() - started, found.steps, invariants)


@dataclass
class SwarmResult:
    outcomes: list[SeedOutcome]
    workers: int
    wall_seconds: float
    required: list[str] = field(default_factory=list)
    shrunk: list[Shrunk] = field(default_factory=list)

    @property
    def failures(self) -> list[SeedOutcome]:
        return [o for o in self.outcomes if not o.ok]

    def distinct_failures(self) -> list[SeedOutcome]:
        """The first failing seed of each set of broken invariants: one per way of failing.

        A swarm of a broken build often fails most of its seeds the same way; shrinking
        and saving each of them would cost minutes and fill a regression file with one bug.
        """
        first: dict[frozenset[str], SeedOutcome] = {}
        for outcome in self.failures:
            first.setdefault(frozenset(outcome.invariants), outcome)
        return list(first.values())

    @property
    def sagas(self) -> int:
        return sum(o.sagas for o in self.outcomes)

    def reached(self) -> dict[str, list[int]]:
        """Goal -> the seeds that reached it (a swarm meets a goal when one seed does)."""
        goals = dict.fromkeys([*coverage.GOALS, *(goal for o in self.outcomes for goal in o.coverage)])
        return {goal: [o.seed for o in self.outcomes if o.coverage.get(goal)] for goal in goals}

    def unmet(self) -> list[str]:
        reached = {goal: len(seeds) for goal, seeds in self.reached().items()}
        return coverage.unmet(self.required, reached)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.unmet()

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seeds": [o.seed for o in self.outcomes],
            "runs": len(self.outcomes),
            "workers": self.workers,
            "sagas": self.sagas,
            "failures": [o.as_dict() for o in self.failures],
            "coverage": {
                goal: {"seeds": len(seeds), "first_seed": seeds[0] if seeds else None} for goal, seeds in self.reached().items()
            },
            "required": self.required,
            "unmet_goals": self.unmet(),
            "shrunk": [s.as_dict() for s in self.shrunk],
            "wall": {
                "seconds": round(self.wall_seconds, 3),
                "sagas_per_second": round(self.sagas / self.wall_seconds, 1) if self.wall_seconds else None,
            },
        }


def run_swarm(
    specs: Sequence[RunSpec],
    workers: int,
    *,
    required: Sequence[str] = (),
    shrink_failures: bool = False,
    on_done: Callable[[SeedOutcome], None] | None = None,
) -> SwarmResult:
    """Run every spec, `workers` at a time; when asked, shrink one failing seed per way of failing
    (`SwarmResult.distinct_failures`, side by side too)."""
    started = time.perf_counter()
    outcomes = parallel_map(run_one, list(specs), workers, on_done)
    result = SwarmResult(outcomes, workers, time.perf_counter() - started, list(dict.fromkeys(required)))
    if shrink_failures and result.failures:
        result.shrunk = parallel_map(shrink_failure, [o.spec for o in result.distinct_failures()], workers)
    return result


def seed_range(text: str) -> list[int]:
    """`A..B` (inclusive) as the seeds it names."""
    first, sep, last = text.partition("..")
    try:
        low, high = int(first), int(last)
    except ValueError:
        raise ValueError(f"expected seeds as A..B (two integers), got {text!r}") from None
    if not sep or high < low:
        raise ValueError(f"expected seeds as A..B with A <= B, got {text!r}")
    if high - low >= 100_000:
        raise ValueError(f"at most 100000 seeds per swarm, got {high - low + 1}")
    return list(range(low, high + 1))


@dataclass(frozen=True)
class DeterminismCheck:
    """Two traced runs of one spec, compared event by event."""

    spec: RunSpec
    events: tuple[int, int]
    digests: tuple[str, str]
    divergence: Divergence | None
    #: Whether the two final reports (wall time aside) agree as well.
    reports_equal: bool
    #: The PYTHONHASHSEED of each run ("random": this process's own, randomised).
    hash_seeds: tuple[str, str] = ("random", "0")

    @property
    def ok(self) -> bool:
        return self.divergence is None and self.reports_equal

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seed": self.spec.seed,
            "command": self.spec.command(),
            "events": list(self.events),
            "trace_sha256": list(self.digests),
            "divergence": self.divergence.as_dict() if self.divergence else None,
            "reports_equal": self.reports_equal,
            "hash_seeds": list(self.hash_seeds),
        }


def traced_run(spec: RunSpec) -> tuple[list[Event], str]:
    """Run `spec` traced in this process: its trace, and its final report without wall times."""
    from infra.simulation.driver import run_simulation
    from sagas.simulation.report import dumps, to_document, without_wall

    result = run_simulation(spec.options(trace=True))
    return result.trace, dumps(without_wall(to_document(result)))


def hash_seeds() -> tuple[str, str]:
    """This process's PYTHONHASHSEED, and a different one for the second run.

    With randomisation on (no PYTHONHASHSEED, or "random") this process hashes with a
    random key; "0" turns randomisation off, a different key but for a 2**-128 chance.
    """
    own = os.environ.get("PYTHONHASHSEED", "random")
    if own.isdigit():
        return own, str((int(own) + 1) % 2**32)
    return "random", "0"


class SecondRunError(RuntimeError):
    """The determinism check's second process did not finish its run."""


def _second_run(spec: RunSpec, hash_seed: str) -> tuple[list[Event], str]:
    """`traced_run(spec)` in a fresh interpreter with PYTHONHASHSEED=`hash_seed`."""
    import pickle
    import subprocess
    from pathlib import Path

    import infra

    # The checkout or install compensa runs from goes first, as in this process.
    root = str(Path(infra.__file__).resolve().parents[1])
    env = os.environ | {
        "PYTHONHASHSEED": hash_seed,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    done = subprocess.run(
        [sys.executable, "-m", "infra.simulation.second_run"],
        input=pickle.dumps(spec),
        capture_output=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise SecondRunError(f"the second run (PYTHONHASHSEED={hash_seed}) failed: {last[0]}")
    trace, report = pickle.loads(done.stdout)  # noqa: S301 - written by our own child process
    return trace, report


def check_determinism(spec: RunSpec) -> DeterminismCheck:
    """Run `spec` traced here, and again in a fresh process with another PYTHONHASHSEED; compare traces and reports.

    The second process catches what a second run here would not: behaviour that follows
    the hash order of strings (a set of ids iterated), or module state a first run left.
    A global RNG or the wall clock differs in either.
    """
    seeds = hash_seeds()
    first, first_report = traced_run(spec)
    second, second_report = _second_run(spec, seeds[1])
    return DeterminismCheck(
        spec=spec,
        events=(len(first), len(second)),
        digests=(digest(first), digest(second)),
        divergence=first_divergence(first, second),
        reports_equal=first_report == second_report,
        hash_seeds=seeds,
    )
