"""`--check-determinism`: a seed run twice records the same event trace, or the check says where it diverged."""

from __future__ import annotations

import json
from pathlib import Path

from infra.simulation.driver import run_simulation
from infra.simulation.swarm import RunSpec, check_determinism
from sagas.simulation.trace import digest, first_divergence
from tests.sim.test_cli import compensa, plain

ROOT = Path(__file__).resolve().parents[2]
WHIMSICAL = "tests.sim.support:GLOBAL_RANDOM_VARIANT"
HASH_ORDERED = "tests.sim.support:HASH_ORDER_VARIANT"


def test_the_trace_records_every_kind_of_event() -> None:
    result = run_simulation(RunSpec(seed=2, sagas=20, faults="chaos", operator_after=30.0).options(trace=True))

    kinds = {event[1] for event in result.trace}
    assert {"place", "publish", "deliver", "transition"} <= kinds
    times = [event[0] for event in result.trace]
    assert times == sorted(times), "events in the order they happened, on the virtual clock"
    untraced = run_simulation(RunSpec(seed=2, sagas=20, faults="chaos", operator_after=30.0).options())
    assert untraced.trace == [] and untraced.outcomes == result.outcomes


def test_the_default_run_is_deterministic() -> None:
    found = check_determinism(RunSpec(seed=1, sagas=30, faults="chaos"))

    assert found.ok, found.as_dict()
    assert found.events[0] == found.events[1] > 500
    assert found.digests[0] == found.digests[1]


def test_a_handler_that_reads_the_global_rng_is_caught() -> None:
    found = check_determinism(RunSpec(seed=1, sagas=30, decline_rate=0.5, variant=WHIMSICAL, variant_path=str(ROOT)))

    assert not found.ok
    assert found.divergence is not None
    assert found.digests[0] != found.digests[1]
    # Everything before the divergence agreed; the events named are where the runs parted.
    diverged = found.divergence.as_dict()
    assert diverged["index"] > 0 and diverged["first"] != diverged["second"]


def test_a_handler_that_follows_the_hash_order_of_strings_is_caught_by_the_second_process() -> None:
    spec = RunSpec(seed=1, sagas=30, decline_rate=0.5, variant=HASH_ORDERED, variant_path=str(ROOT))
    # Two runs in one process agree: the hash order is the same for both.
    here, again = (run_simulation(spec.options(trace=True)) for _ in range(2))
    assert here.trace == again.trace and digest(here.trace) == digest(again.trace)

    found = check_determinism(spec)

    assert found.hash_seeds[0] != found.hash_seeds[1]
    assert not found.ok and found.divergence is not None
    diverged = found.divergence.as_dict()
    assert diverged["index"] > 0 and diverged["first"] != diverged["second"]


def test_first_divergence() -> None:
    a = [(0.0, "place", "o-1"), (0.1, "deliver", "q", "m1")]
    assert first_divergence(a, list(a)) is None
    assert first_divergence(a, a[:1]).index == 1  # type: ignore[union-attr]
    assert first_divergence(a, [a[0], (0.1, "deliver", "q", "m2")]).index == 1  # type: ignore[union-attr]
    assert digest(a) != digest(a[:1])


def test_check_determinism_from_the_command_line() -> None:
    good = compensa("-n", "20", "--check-determinism")
    assert good.returncode == 0, good.stderr
    assert "determinism: seed 1 run here (PYTHONHASHSEED" in good.stdout and "identical" in good.stdout

    bad = compensa("-n", "20", "--decline-rate", "0.5", "--check-determinism", "--variant", WHIMSICAL, "--json", cwd=ROOT)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["divergence"]["index"] >= 0
    text = compensa("-n", "20", "--decline-rate", "0.5", "--check-determinism", "--variant", WHIMSICAL, cwd=ROOT)
    assert "DIVERGED at event #" in plain(text.stdout) and "first run:" in text.stdout
