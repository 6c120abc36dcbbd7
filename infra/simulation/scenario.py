"""What a simulated run does that depends on the application it hosts.

The driver (driver.py) runs any `SagaApp` the same way: the same broker, clock, faults,
relays and operator. What differs is here, behind one small interface: how the workload
is drawn, how its sagas start, what the database holds before the first one and what is
read back and checked at the end.

- `OrderScenario`: the order app's, built in (its snapshot is read with SQL aggregates and
  shared with the real-stack run and the e2e tests: infra/simulation/readback.py).
- `AppScenario`: any other app's, from its `SimulationPieces`: the workload it draws, the
  rows it seeds, its start messages sent through the `ingest` outbox (as an upstream system
  would), and its invariants and goals judged over every row of its tables.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

import consumers.orders as orders
import consumers.stock as stock
from contracts.clock import Clock
from infra.apps import ORDER_APP, create_app_tables
from infra.bootstrap import message_services, outbox_services
from infra.simulation.readback import Observed, ReadBack, message_ids, read_back, read_outcomes
from outbox.tables import tables_for
from outbox.uow import UnitOfWork
from sagas.app import FinalState, PlannedSaga, SagaApp, SimulationPieces
from sagas.simulation.invariants import Snapshot, Violation, check_common
from sagas.simulation.workload import Workload, WorkloadSpec, generate
from sagas.tables import saga_instances

#: The outbox an app's start messages leave from: the one HTTP ingest writes upstream events to.
START_OUTBOX = "ingest"


class Scenario(Protocol):
    """The app-dependent half of a simulated run."""

    #: Types of the events that end a saga (the progress bar counts them).
    outcome_types: frozenset[str]
    #: Outboxes the run starts sagas from, besides the services' own.
    start_outboxes: tuple[str, ...]
    #: The app's coverage goals: name -> what it means.
    goals: Mapping[str, str]

    def generate(self, spec: WorkloadSpec, rng: random.Random) -> Any:
        """Draw the workload (`.spec`, and `.orders`: the planned sagas, each with `saga_id` and `at_seconds`)."""
        ...

    async def prepare(self, engine: AsyncEngine, workload: Any) -> None:
        """Create the app's tables (compensa's are migrated already) and seed the rows the workload begins with."""
        ...

    async def place(
        self, engine: AsyncEngine, clock: Clock, planned: Any, workload: Any, uow_factory: Callable[..., Any]
    ) -> None:
        """Start one planned saga."""
        ...

    async def tick(self, engine: AsyncEngine, clock: Clock) -> None:
        """The app's periodic housekeeping (the order app expires stale reservations)."""
        ...

    async def read_back(
        self, engine: AsyncEngine, workload: Any, observed: Observed, more: list[Violation]
    ) -> tuple[ReadBack, dict[str, int]]:
        """The end of the run checked, and how often each of the app's own goals was reached."""
        ...


class OrderScenario:
    """The order app's simulation: orders over a catalogue with limited stock."""

    outcome_types = frozenset(model.message_type for model in ORDER_APP.outcomes)
    start_outboxes: tuple[str, ...] = ()
    goals: Mapping[str, str] = {}

    def generate(self, spec: WorkloadSpec, rng: random.Random) -> Workload:
        return generate(spec, rng)

    async def prepare(self, engine: AsyncEngine, workload: Workload) -> None:
        await stock.seed_stock(engine, workload.stock)

    async def place(
        self, engine: AsyncEngine, clock: Clock, planned: Any, workload: Workload, uow_factory: Callable[..., Any]
    ) -> None:
        await place_planned_order(engine, clock, planned, workload, uow_factory)

    async def tick(self, engine: AsyncEngine, clock: Clock) -> None:
        await stock.expire_reservations(engine, clock)

    async def read_back(
        self, engine: AsyncEngine, workload: Workload, observed: Observed, more: list[Violation]
    ) -> tuple[ReadBack, dict[str, int]]:
        return await read_back(engine, workload, observed, more), {}


@dataclass(frozen=True)
class AppWorkloadSpec:
    """What an app's workload was drawn from (the report shows it)."""

    app: str
    sagas: int


@dataclass(frozen=True)
class AppWorkload:
    """An app's drawn plan, in the shape the driver and the report read."""

    spec: AppWorkloadSpec
    plan: Any

    @property
    def orders(self) -> tuple[PlannedSaga, ...]:
        """The planned sagas (named as the order workload names its own)."""
        return tuple(self.plan.sagas)


class AppScenario:
    """Any other app's simulation, from its `SimulationPieces`."""

    start_outboxes: tuple[str, ...] = (START_OUTBOX,)

    def __init__(self, app: SagaApp) -> None:
        if app.simulation is None:
            raise ValueError(f"app {app.name!r} has no simulation pieces (SagaApp.simulation): nothing to simulate")
        self.app = app
        self.pieces: SimulationPieces = app.simulation
        self.outcome_types = frozenset(model.message_type for model in app.outcomes)
        self.goals: Mapping[str, str] = {name: goal.description for name, goal in self.pieces.goals.items()}
        self.tables = {table.name: table for table in app.tables()}

    def generate(self, spec: WorkloadSpec, rng: random.Random) -> AppWorkload:
        plan = self.pieces.workload(spec.sagas, rng)
        unknown = sorted(set(plan.rows) - set(self.tables))
        if unknown:
            raise ValueError(f"app {self.app.name!r}: its workload seeds {', '.join(unknown)}, not among its tables")
        return AppWorkload(AppWorkloadSpec(self.app.name, spec.sagas), plan)

    async def prepare(self, engine: AsyncEngine, workload: AppWorkload) -> None:
        await create_app_tables(engine, self.app)
        async with engine.begin() as connection:
            for name, rows in workload.plan.rows.items():
                if rows:
                    await connection.execute(insert(self.tables[name]), [dict(row) for row in rows])

    async def place(
        self, engine: AsyncEngine, clock: Clock, planned: PlannedSaga, workload: AppWorkload, uow_factory: Callable[..., Any]
    ) -> None:
        uow: UnitOfWork
        async with uow_factory(engine, START_OUTBOX, clock) as uow:
            uow.send(planned.start, correlation_id=planned.saga_id)
            await uow.commit()

    async def tick(self, engine: AsyncEngine, clock: Clock) -> None:
        return None

    async def read_back(
        self, engine: AsyncEngine, workload: AppWorkload, observed: Observed, more: list[Violation]
    ) -> tuple[ReadBack, dict[str, int]]:
        final = await read_final_state(engine, self.app, workload.plan)
        snapshot = await _common_snapshot(engine, self.app, final, observed)
        violations = check_common(snapshot) + list(self.pieces.invariants(final)) + list(more)
        durations, outcomes, history = await read_outcomes(engine, violations)
        reached = {name: int(goal.count(final)) for name, goal in self.pieces.goals.items()}
        return ReadBack(snapshot, violations, durations, outcomes, history), reached


async def read_final_state(engine: AsyncEngine, app: SagaApp, plan: Any) -> FinalState:
    """Every saga's status and every row of the app's tables (a simulated run's tables are small)."""
    tables: dict[str, Sequence[Mapping[str, Any]]] = {}
    async with engine.connect() as connection:
        status = dict((await connection.execute(select(saga_instances.c.saga_id, saga_instances.c.status))).all())
        for table in app.tables():
            rows = await connection.execute(select(table).order_by(*table.primary_key.columns))
            tables[table.name] = [dict(row._mapping) for row in rows]
    return FinalState(plan=plan, saga_status=status, tables=tables)


async def _common_snapshot(engine: AsyncEngine, app: SagaApp, final: FinalState, observed: Observed) -> Snapshot:
    """What the invariants every app keeps need: saga statuses, pending outboxes, message ids."""
    from sqlalchemy import func

    outboxes = outbox_services(app)
    pending = {}
    async with engine.connect() as connection:
        for service in outboxes:
            outbox = tables_for(service).outbox
            count = (
                await connection.execute(select(func.count()).select_from(outbox).where(outbox.c.sent_at.is_(None)))
            ).scalar_one()
            pending[service] = int(count)
    sent, consumed = await message_ids(engine, outboxes, message_services(app))
    empty = Snapshot(
        placed={planned.saga_id: 0 for planned in final.plan.sagas},
        saga_status=dict(final.saga_status),
        order_status={},
        initial_stock={},
        stock={},
        committed_units={},
        committed_by_order={},
        payments={},
        ledger_debits=0,
        ledger_credits=0,
        ledger_by_order={},
        ledger_duplicates=[],
        outbox_pending=pending,
        published_ids=set(),
        consumed_ids=set(),
        dead_lettered={},
        unrouted_ids=set(),
        messages_left_in_queues=observed.messages_left,
    )
    return replace(
        empty,
        published_ids=set(observed.published_ids),
        consumed_ids=set(observed.consumed_ids) if observed.consumed_ids is not None else consumed,
        dead_lettered=dict(observed.dead_lettered),
        unrouted_ids=set(observed.unrouted_ids),
        marked_sent_ids=sent,
    )


def scenario_for(app: SagaApp) -> Scenario:
    """The order app's built-in scenario, or one made from the app's simulation pieces."""
    return OrderScenario() if app is ORDER_APP else AppScenario(app)


async def place_planned_order(
    engine: AsyncEngine, clock: Clock, planned: Any, workload: Workload, uow_factory: Callable[..., Any] = UnitOfWork
) -> None:
    """Place one order of the workload, as its customer would (the simulator and the real-stack run)."""
    await orders.place_order(
        engine,
        clock,
        order_id=planned.order_id,
        customer_id=planned.customer_id,
        lines=list(planned.lines),
        currency=workload.spec.currency,
        payment_token=planned.payment_token,
        uow_factory=uow_factory,
    )
