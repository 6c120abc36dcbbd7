"""Swarms: many seeds, each with its own fault mix, side by side; a failing seed comes with
the one command that reproduces it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from infra.simulation.swarm import RunSpec, run_swarm, seed_range
from sagas.simulation.coverage import GOALS
from sagas.simulation.faults import RATE_NAMES, SWARM_CEILINGS, profile, swarm_rates
from tests.sim.test_cli import compensa as run_compensa
from tests.sim.test_cli import plain
from tests.support import COMPENSA

#: Variants are imported by name from the working directory, as `compensa simulate --variant` does.
ROOT = Path(__file__).resolve().parents[2]
BROKEN = "tests.sim.support:STOCK_NEVER_RELEASED_VARIANT"
#: A failing run neither shrunk (not what these tests check) nor saved into the repository.
NOT_SHRUNK = ("--no-shrink", "--no-save-seed")


def compensa(*args: str) -> subprocess.CompletedProcess[str]:
    return run_compensa(*args, cwd=ROOT)


def test_each_seed_draws_its_own_fault_mix() -> None:
    mixes = [swarm_rates(seed) for seed in range(1, 21)]

    assert swarm_rates(7) == swarm_rates(7)
    assert len({tuple(sorted(m.as_dict().items())) for m in mixes}) == 20
    for mix in mixes:
        assert all(getattr(mix, name) <= SWARM_CEILINGS[name] for name in RATE_NAMES)
    # Over a few seeds every fault is on somewhere and off somewhere.
    for name in RATE_NAMES:
        assert any(getattr(m, name) for m in mixes) and not all(getattr(m, name) for m in mixes), name
    assert profile("swarm", seed=7) == swarm_rates(7)


def test_a_seeds_command_names_its_drawn_rates() -> None:
    spec = RunSpec.swarm_seed(1, sagas=30, operator_after=60.0)
    words = shlex.split(spec.command())

    assert words[:2] == ["compensa", "simulate"]
    assert words[words.index("--faults") + 1] == "none"
    named = {}
    for index, word in enumerate(words):
        if word == "--fault":
            name, value = words[index + 1].split("=")
            named[name] = float(value)
    assert named == spec.fault_fields()
    assert spec.rates() == swarm_rates(1)


def test_swarm_reports_the_failing_seeds_with_commands_that_reproduce_them() -> None:
    """A release that forgets the stock breaks the seeds whose faults cancel orders (no declines here)."""
    run = compensa(
        "--seeds", "1..4", "--sagas", "30", "--decline-rate", "0", "--variant", BROKEN, "--workers", "2", "--json", *NOT_SHRUNK
    )

    assert run.returncode == 1, run.stderr
    swarm = json.loads(run.stdout)
    assert swarm["runs"] == 4 and swarm["workers"] == 2 and swarm["sagas"] == 120
    failed = {f["seed"]: f for f in swarm["failures"]}
    assert failed and set(failed) < {1, 2, 3, 4}, "some seeds fail, not all: the swarm tells them apart"
    assert swarm["wall"]["sagas_per_second"] > 0
    seed, failure = sorted(failed.items())[0]
    assert "no stock left reserved" in failure["invariants_broken"]
    assert f"--seed {seed} " in failure["command"] and f"--variant {BROKEN}" in failure["command"]
    assert "--fault " in failure["command"]

    # The printed command, run as it is, fails the same way.
    words = shlex.split(failure["command"])
    assert words[:2] == ["compensa", "simulate"]
    again = subprocess.run(
        [COMPENSA, *words[1:], "--json", *NOT_SHRUNK],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_env(),
        cwd=ROOT,
    )
    assert again.returncode == 1, again.stderr
    document = json.loads(again.stdout)
    assert document["seed"] == seed
    assert sorted({v["invariant"] for v in document["invariants"]["violations"]}) == sorted(failure["invariants_broken"])
    assert len(document["invariants"]["violations"]) == failure["violation_count"]
    assert document["outcomes"] == failure["outcomes"]


def test_terminal_summary_of_a_swarm() -> None:
    run = compensa("--swarm", "2", "--seed", "3", "--sagas", "15", "--decline-rate", "0.5", "--variant", BROKEN, *NOT_SHRUNK)

    assert run.returncode == 1
    text = plain(run.stdout)
    assert "swarm of 2 seeds (3..4), 15 sagas each, faults swarm" in text
    assert "seeds run: 2, failed 2" in text
    assert "reproduce: compensa simulate --seed 3 --sagas 15 --faults none" in text
    assert "throughput:" in text and "sagas/s" in text


def test_default_swarm_meets_every_coverage_goal() -> None:
    requires = [arg for goal in GOALS for arg in ("--require", goal)]
    # Six seeds: compensation_failed (a long gateway outage during refunds) is the rarest goal.
    run = compensa("--seeds", "11..16", "--sagas", "40", "--workers", "2", "--json", *requires)

    assert run.returncode == 0, run.stderr
    swarm = json.loads(run.stdout)
    assert swarm["ok"] and swarm["failures"] == [] and swarm["unmet_goals"] == []
    assert all(swarm["coverage"][goal]["seeds"] >= 1 for goal in GOALS)


def test_an_unmet_goal_fails_the_run_by_name() -> None:
    run = compensa("-n", "10", "--faults", "none", "--require", "breaker_opened", "--require", "duplicate_skipped")

    assert run.returncode == 1
    message = plain(run.stderr)
    assert "coverage goals not reached: breaker_opened (the payment gateway's circuit breaker opened)" in message
    assert "duplicate_skipped (the inbox skipped a delivery it had already applied)" in message
    assert "coverage:" in run.stdout and "not reached:" in run.stdout


def test_in_process_swarm_equals_the_pool() -> None:
    specs = [RunSpec.swarm_seed(seed, sagas=10) for seed in (5, 6)]

    alone = run_swarm(specs, 1)
    pooled = run_swarm(specs, 2)

    assert [(o.seed, o.outcomes, o.coverage) for o in alone.outcomes] == [
        (o.seed, o.outcomes, o.coverage) for o in pooled.outcomes
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "5..2"], "expected seeds as A..B with A <= B, got '5..2'"),
        (["--seeds", "x"], "expected seeds as A..B (two integers), got 'x'"),
        (["--swarm", "2", "--report", "out"], "--report applies to one run"),
        (["--require", "nirvana"], "unknown coverage goal(s) nirvana; known: deadline_mid_step"),
        (["--variant", "tests.sim.support:NOTHING"], "cannot load variant 'tests.sim.support:NOTHING'"),
    ],
    ids=["range-order", "range-syntax", "swarm-report", "goal", "variant"],
)
def test_bad_swarm_arguments_fail_precisely(args: list[str], message: str) -> None:
    run = compensa(*args)

    assert run.returncode == 2
    assert message in plain(run.stderr)


def test_seed_range() -> None:
    assert seed_range("3..5") == [3, 4, 5]
    assert seed_range("7..7") == [7]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("COMPENSA_")} | {"COLUMNS": "200"}


def test_swarm_benchmark_smoke() -> None:
    """`compensa bench simulate`'s swarm figure, tiny: it runs and reports both rates (never timed)."""
    from infra.bench.simulate import swarm_rate

    figures = swarm_rate(sagas=10, seeds=2, workers=2, faults="default")

    assert figures["one_seed_sagas_per_s"] > 0 and figures["swarm_sagas_per_s"] > 0
    assert figures["failed_seeds"] == [] and figures["workers"] == 2
