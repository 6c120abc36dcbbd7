"""A saga's timeline as an inline SVG sequence diagram, drawn on the server.

Lanes are the parties (orders, the saga, stock, payments, the clock that fires
deadlines, the dead-letter archive, the operator); each row is one thing that
happened, in time order: a transition (the message or deadline that caused it, an
arrow into the saga), the commands it sent (arrows out of it), a dead letter (a cross
on the archive's lane), a replay, an operator's action; and the saga's active deadline
at the bottom. Colours: normal flow, compensation, failure, late reply, operator.
Every stored text is escaped before it is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from typing import Any

LANES = ("Orders", "Saga", "Stock", "Payments", "Clock", "Dead letters", "Operator")
_PARTY = {"order": "Orders", "stock": "Stock", "payment": "Payments", "deadline": "Clock", "operator": "Operator"}
_QUEUE_LANE = {"stock.commands": "Stock", "payments.commands": "Payments", "orders.events": "Orders"}
COMPENSATIONS = ("stock.release", "payment.refund")

LEFT, LANE_GAP, ROW, TOP = 150, 128, 30, 56
COLOURS = {
    "flow": "#2563eb",
    "compensation": "#d97706",
    "failure": "#dc2626",
    "late": "#7c3aed",
    "operator": "#059669",
    "ignored": "#9ca3af",
}


@dataclass(frozen=True)
class Row:
    at: datetime | None
    source: str
    target: str
    label: str
    kind: str
    cross: bool = False
    dashed: bool = False


def _party(message_type: str) -> str:
    return _PARTY.get(message_type.split(".")[0].split(":")[0], "Orders")


def _sent_types(sent: Any) -> list[str]:
    if not isinstance(sent, list):
        return []
    return [str(x.get("type")) if isinstance(x, dict) else str(x) for x in sent]


def _transition_kind(entry: dict[str, Any]) -> str:
    note = str(entry.get("note") or "")
    if str(entry["trigger"]).startswith("operator:"):
        return "operator"
    if note.startswith("late "):
        return "late"
    if entry["from_status"] == entry["to_status"] and entry["from_status"] is not None and not entry.get("sent"):
        return "ignored"
    if entry["to_status"] in ("compensating", "cancelled", "compensation_failed") or entry["trigger"].endswith(
        ("failed", "declined")
    ):
        return "failure" if entry["to_status"] == "compensation_failed" else "compensation"
    return "flow"


def rows(
    history: list[dict[str, Any]],
    dead_letters: Sequence[dict[str, Any]] = (),
    actions: Sequence[dict[str, Any]] = (),
) -> list[Row]:
    """Everything that happened to a saga, as diagram rows in time order."""
    timed: list[tuple[datetime, int, Row]] = []
    epoch = datetime.min.replace(tzinfo=UTC)
    order = 0

    def add(at: datetime | None, row: Row) -> None:
        nonlocal order
        order += 1
        timed.append(((at or epoch).astimezone(UTC), order, row))

    for entry in history:
        trigger = str(entry["trigger"])
        kind = _transition_kind(entry)
        if trigger.startswith("deadline:"):
            label = f"deadline {trigger.split(':', 1)[1]} fired"
        elif kind == "late":
            label = f"late {trigger}"
        else:
            label = trigger
        moved = f" ({entry['from_status'] or 'new'} → {entry['to_status']})"
        add(entry["at"], Row(entry["at"], _party(trigger), "Saga", f"v{entry['version']} {label}{moved}", kind))
        for sent in _sent_types(entry.get("sent")):
            sent_kind = "compensation" if sent in COMPENSATIONS else ("failure" if sent.endswith("rejected") else "flow")
            add(entry["at"], Row(entry["at"], "Saga", _party(sent), f"sends {sent}", sent_kind))
    for letter in dead_letters:
        lane = _QUEUE_LANE.get(str(letter["queue"]), "Saga")
        label = f"dead letter #{letter['id']}: {letter['type']} on {letter['queue']} ({letter['reason_class']})"
        add(letter["last_failure_at"], Row(letter["last_failure_at"], lane, "Dead letters", label, "failure", cross=True))
        if letter.get("replayed_at"):
            add(
                letter["replayed_at"],
                Row(letter["replayed_at"], "Dead letters", lane, f"replayed #{letter['id']} to {letter['queue']}", "operator"),
            )
    for action in actions:
        target = "Dead letters" if str(action["action"]).startswith("dlq.") else "Saga"
        label = f"{action['actor']}: {action['action']} ({action['outcome']})"
        add(action["at"], Row(action["at"], "Operator", target, label, "operator", dashed=True))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [row for _, _, row in timed]


def _x(lane: str) -> int:
    return LEFT + LANES.index(lane) * LANE_GAP + LANE_GAP // 2


def render(diagram: list[Row], deadline: dict[str, Any] | None = None) -> str:
    """The SVG document (a string, escaped) of the rows and the saga's active deadline."""
    count = len(diagram) + (1 if deadline else 0)
    width = LEFT + len(LANES) * LANE_GAP + 20
    height = TOP + max(count, 1) * ROW + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="timeline" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="saga timeline" font-family="sans-serif" font-size="11">',
        "<defs>",
    ]
    for name, colour in COLOURS.items():
        out.append(
            f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
            f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="{colour}"/></marker>'
        )
    out.append("</defs>")
    for lane in LANES:
        x = _x(lane)
        out.append(f'<text x="{x}" y="20" text-anchor="middle" font-weight="bold" font-size="12">{escape(lane)}</text>')
        out.append(f'<line x1="{x}" y1="30" x2="{x}" y2="{height - 10}" stroke="#d1d5db" stroke-width="1"/>')
    for index, row in enumerate(diagram):
        y = TOP + index * ROW
        colour = COLOURS[row.kind]
        when = row.at.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if row.at else ""
        out.append(f'<text x="8" y="{y + 4}" fill="#6b7280">{escape(when)}</text>')
        x1, x2 = _x(row.source), _x(row.target)
        label_x = (x1 + x2) // 2
        if row.cross:
            out.append(
                f'<line x1="{x1}" y1="{y}" x2="{x2}" y2="{y}" stroke="{colour}" stroke-dasharray="2,3" '
                f'marker-end="url(#arrow-{row.kind})"/>'
            )
            out.append(
                f'<path d="M{x2 - 6},{y - 6} L{x2 + 6},{y + 6} M{x2 + 6},{y - 6} L{x2 - 6},{y + 6}" '
                f'stroke="{colour}" stroke-width="2.5"/>'
            )
        elif x1 == x2:
            out.append(f'<circle cx="{x1}" cy="{y}" r="5" fill="{colour}"/>')
        else:
            dash = ' stroke-dasharray="5,3"' if row.dashed else ""
            out.append(
                f'<line x1="{x1}" y1="{y}" x2="{x2 + (-6 if x2 > x1 else 6)}" y2="{y}" stroke="{colour}" '
                f'stroke-width="1.6"{dash} marker-end="url(#arrow-{row.kind})"/>'
            )
        out.append(
            f'<text x="{label_x}" y="{y - 5}" text-anchor="middle" fill="{colour}">'
            f"<title>{escape(row.label)}</title>{escape(_clip(row.label, 70))}</text>"
        )
    if deadline:
        y = TOP + len(diagram) * ROW
        x = _x("Clock")
        due = deadline["at"].astimezone(UTC).strftime("%H:%M:%S") if deadline.get("at") else "?"
        text = f"active deadline: {deadline.get('kind')} of {deadline.get('step')} due {due} UTC"
        out.append(f'<line x1="{_x("Saga")}" y1="{y}" x2="{x}" y2="{y}" stroke="#6b7280" stroke-dasharray="4,4"/>')
        out.append(f'<text x="{(x + _x("Saga")) // 2}" y="{y - 5}" text-anchor="middle" fill="#374151">{escape(text)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
