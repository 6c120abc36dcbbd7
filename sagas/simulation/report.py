"""Render a simulation result: a JSON document, a terminal summary, an HTML page with plots."""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def duration_stats(durations: Mapping[str, float]) -> dict[str, float]:
    values = list(durations.values())
    return {
        "p50": round(percentile(values, 50), 6),
        "p90": round(percentile(values, 90), 6),
        "p99": round(percentile(values, 99), 6),
        "max": round(max(values), 6) if values else 0.0,
    }


def to_document(result: Any) -> dict[str, Any]:
    """The machine-readable report. Everything outside "wall" repeats exactly for a seed."""
    slowest = max(sorted(result.durations), key=lambda k: result.durations[k]) if result.durations else None
    dlq_groups = Counter(f"{d['queue']} | {d['reason_class']}" for d in result.dead_letters)
    return {
        "seed": result.options.seed,
        "workload": dict(vars(result.workload.spec)),
        "faults": result.options.faults.as_dict(),
        "sagas": len(result.workload.orders),
        "outcomes": result.outcomes,
        "faults_injected": dict(sorted(result.faults_injected.items())),
        "counters": result.counters,
        "dead_letters": {"total": len(result.dead_letters), "groups": dict(sorted(dlq_groups.items()))},
        "circuit_breakers": result.breakers,
        "coverage": getattr(result, "coverage", {}),
        "stack": result.stack,
        "virtual_seconds": result.virtual_seconds,
        "saga_duration_seconds": duration_stats(result.durations),
        "invariants": {
            "ok": result.ok,
            "violations": [v.as_dict() for v in result.violations],
        },
        "slowest_saga": {"saga_id": slowest, "timeline": result.history.get(slowest, []) if slowest else []},
        "violating_sagas": {
            saga_id: result.history.get(saga_id, []) for saga_id in sorted({v.saga_id for v in result.violations if v.saga_id})
        },
        "wall": {
            "seconds": round(result.wall_seconds, 3),
            "sagas_per_second": round(len(result.workload.orders) / result.wall_seconds, 1) if result.wall_seconds else None,
        },
    } | (
        ({"stack_details": result.extra} if result.extra else {})
        | ({"liveness": result.liveness} if getattr(result, "liveness", None) else {})
        | ({"operator": result.operator} if getattr(result, "operator", None) is not None else {})
    )


def without_wall(document: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != "wall"}


def dumps(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True)


def terminal_summary(document: Mapping[str, Any]) -> str:
    clock = "real" if document.get("stack") == "real" else "virtual"
    lines = [
        f"compensa simulate — seed {document['seed']}, {document['sagas']} sagas"
        + (" on the real stack (PostgreSQL + RabbitMQ)" if clock == "real" else ""),
        "outcomes:        " + ", ".join(f"{k} {v}" for k, v in document["outcomes"].items()),
        "faults injected: " + (", ".join(f"{k} {v}" for k, v in document["faults_injected"].items()) or "none"),
        "deliveries:      "
        + ", ".join(
            f"{k} {document['counters'][k]}"
            for k in ("published", "delivered", "retried", "requeued", "duplicates_skipped", "dead_lettered")
        ),
        f"dead letters:    {document['dead_letters']['total']}"
        + "".join(f"\n                   {group}: {count}" for group, count in document["dead_letters"]["groups"].items()),
        "saga duration:   " + ", ".join(f"{k} {v:.3f}s" for k, v in document["saga_duration_seconds"].items()) + f" ({clock})",
        f"time:            {document['virtual_seconds']:.1f} s {clock}, {document['wall']['seconds']:.2f} s wall "
        f"({document['wall']['sagas_per_second']} sagas/s)",
    ]
    for name, breaker in document.get("circuit_breakers", {}).items():
        lines.insert(-2, f"circuit breaker: {name} {breaker_line(breaker)}")
    restarts = document["counters"].get("broker_restarts", 0)
    if restarts:
        returned = document["counters"].get("returned_on_restart", 0)
        lines.insert(-2, f"broker:          restarted {restarts} times, {returned} unacked deliveries returned")
    if document.get("operator") is not None:
        lines.insert(-2, "operator:        " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in document["operator"].items()))
    if document.get("coverage"):
        lines.append("coverage:        " + coverage_line(document["coverage"]))
    if document.get("liveness"):
        live = document["liveness"]
        lines.append(
            f"liveness:        faults stopped at {live['heal_at_seconds']:.1f} s; "
            f"every saga due within {live['bound_seconds']:g} s"
        )
    invariants = document["invariants"]
    if invariants["ok"]:
        lines.append("invariants:      all hold")
    else:
        lines.append(f"invariants:      {len(invariants['violations'])} VIOLATED")
        for violation in invariants["violations"][:50]:
            lines.append(f"  ✗ {violation['invariant']}: saga {violation['saga_id'] or '-'}: {violation['detail']}")
        for saga_id, timeline in list(document["violating_sagas"].items())[:5]:
            lines.append(f"  history of {saga_id}:")
            for entry in timeline:
                lines.append(
                    f"    v{entry['version']:<3} {entry['at_seconds']:>10.3f}s  {entry['trigger']:<32} "
                    f"{entry['from'] or '-':>13} → {entry['to']:<20} sent {', '.join(entry['sent']) or '-'}"
                )
    return "\n".join(lines)


def coverage_line(reached: Mapping[str, int]) -> str:
    """Which coverage goals a run reached (with counts) and which it did not."""
    hit = ", ".join(f"{goal} {count}" for goal, count in reached.items() if count) or "none"
    missed = [goal for goal, count in reached.items() if not count]
    return hit + (f" (not reached: {', '.join(missed)})" if missed else "")


def breaker_line(breaker: Mapping[str, Any]) -> str:
    """One circuit breaker's run in a line: opened and closed how often, first opened when, calls refused."""
    if not breaker["opened"]:
        return f"never opened, {breaker['gateway_calls']} gateway calls"
    return (
        f"opened {breaker['opened']}, half-opened {breaker['half_opened']}, closed {breaker['closed']} "
        f"(first opened at {breaker['first_opened_at_seconds']:.3f} s), {breaker['refused_calls']} calls refused, "
        f"{breaker['gateway_calls']} gateway calls, ends {breaker['final_state']}"
    )


# ---------------------------------------------------------------- HTML with inline SVG


def _bar_chart(title: str, data: Mapping[str, float], color: str = "#3b6ea5") -> str:
    if not data:
        return f"<h3>{html.escape(title)}</h3><p>nothing to show</p>"
    width, bar_h, gap, label_w = 640, 22, 6, 200
    peak = max(data.values()) or 1
    height = len(data) * (bar_h + gap) + gap
    bars = []
    for i, (label, value) in enumerate(data.items()):
        y = gap + i * (bar_h + gap)
        w = (width - label_w - 80) * value / peak
        bars.append(
            f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end">{html.escape(str(label))}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + 15}">{value:g}</text>'
        )
    return (
        f"<h3>{html.escape(title)}</h3>"
        f'<svg width="{width}" height="{height}" font-family="sans-serif" font-size="12">{"".join(bars)}</svg>'
    )


def _histogram(title: str, values: Sequence[float], bins: int = 30) -> str:
    if not values:
        return f"<h3>{html.escape(title)}</h3><p>nothing to show</p>"
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - low) / span * bins))] += 1
    width, height, pad = 640, 200, 30
    peak = max(counts) or 1
    bar_w = (width - 2 * pad) / bins
    rects = "".join(
        f'<rect x="{pad + i * bar_w:.1f}" y="{height - pad - (height - 2 * pad) * c / peak:.1f}" '
        f'width="{bar_w - 1:.1f}" height="{(height - 2 * pad) * c / peak:.1f}" fill="#5a9e6f"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    axis = (
        f'<text x="{pad}" y="{height - 8}">{low:.2f}s</text>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">{high:.2f}s</text>'
        f'<text x="{pad}" y="14">{peak} sagas</text>'
    )
    return (
        f"<h3>{html.escape(title)}</h3>"
        f'<svg width="{width}" height="{height}" font-family="sans-serif" font-size="12">{rects}{axis}</svg>'
    )


def _timeline(saga_id: str | None, timeline: Sequence[Mapping[str, Any]]) -> str:
    if not saga_id or not timeline:
        return "<p>no saga</p>"
    start = timeline[0]["at_seconds"]
    end = max(e["at_seconds"] for e in timeline) or start
    span = (end - start) or 1.0
    width, row_h, label_w = 900, 26, 330
    marks = []
    for i, entry in enumerate(timeline):
        y = 10 + i * row_h
        x = label_w + (width - label_w - 20) * (entry["at_seconds"] - start) / span
        color = {"completed": "#2e7d32", "cancelled": "#b26a00", "rejected": "#6d4c41", "compensating": "#c62828"}.get(
            entry["to"], "#1565c0"
        )
        marks.append(
            f'<text x="{label_w - 8}" y="{y + 13}" text-anchor="end">'
            f"{html.escape(entry['trigger'])} → {html.escape(entry['to'])}</text>"
            f'<line x1="{label_w}" y1="{y + 9}" x2="{x:.1f}" y2="{y + 9}" stroke="#ddd"/>'
            f'<circle cx="{x:.1f}" cy="{y + 9}" r="6" fill="{color}"><title>{html.escape(entry["note"])}</title></circle>'
            f'<text x="{x + 10:.1f}" y="{y + 13}">{entry["at_seconds"] - start:.3f}s</text>'
        )
    height = 20 + len(timeline) * row_h
    rows = "".join(
        f"<tr><td>{e['version']}</td><td>{e['at_seconds'] - start:.3f}s</td><td>{html.escape(e['trigger'])}</td>"
        f"<td>{html.escape(str(e['from'] or '-'))} → {html.escape(e['to'])}</td>"
        f"<td>{html.escape(', '.join(e['sent']) or '-')}</td>"
        f"<td>{html.escape(e['note'])}</td></tr>"
        for e in timeline
    )
    return (
        f"<h3>Timeline of the slowest saga: {html.escape(saga_id)}</h3>"
        f'<svg width="{width}" height="{height}" font-family="sans-serif" font-size="12">{"".join(marks)}</svg>'
        "<table><tr><th>v</th><th>at</th><th>trigger</th><th>status</th><th>sent</th><th>note</th></tr>"
        f"{rows}</table>"
    )


def _breakers(breakers: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, breaker in breakers.items():
        rows = "".join(
            f"<tr><td>{t['at_seconds']:.3f}s</td><td>{html.escape(t['from'])} → {html.escape(t['to'])}</td>"
            f"<td>{html.escape(t['reason'])}</td></tr>"
            for t in breaker["transitions"]
        )
        table = (
            "<table><tr><th>at</th><th>state</th><th>reason</th></tr>" + rows + "</table>" if rows else "<p>no transitions</p>"
        )
        parts.append(f"<h3>Circuit breaker: {html.escape(name)}</h3><p>{html.escape(breaker_line(breaker))}</p>{table}")
    return "".join(parts)


def html_page(document: Mapping[str, Any], durations: Sequence[float]) -> str:
    invariants = document["invariants"]
    verdict = (
        '<p class="ok">All invariants hold.</p>'
        if invariants["ok"]
        else "<p class='bad'>Violations:</p><ul>"
        + "".join(
            f"<li>{html.escape(v['invariant'])} — saga {html.escape(str(v['saga_id']))}: {html.escape(v['detail'])}</li>"
            for v in invariants["violations"]
        )
        + "</ul>"
    )
    faults_vs_retries = {f"fault: {k}": v for k, v in document["faults_injected"].items()}
    faults_vs_retries.update(
        {
            "retries (delay queue)": document["counters"]["retried"],
            "redeliveries": document["counters"]["requeued"],
            "duplicates skipped": document["counters"]["duplicates_skipped"],
            "dead-lettered": document["counters"]["dead_lettered"],
        }
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>compensa simulation — seed {document["seed"]}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1000px; color: #222 }}
table {{ border-collapse: collapse; font-size: 13px }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left }}
.ok {{ color: #2e7d32; font-weight: bold }} .bad {{ color: #c62828; font-weight: bold }}
</style></head><body>
<h1>compensa simulation</h1>
<p>Seed <b>{document["seed"]}</b>, {document["sagas"]} sagas, {document["virtual_seconds"]:.1f} s of virtual time,
{document["wall"]["seconds"]:.2f} s wall ({document["wall"]["sagas_per_second"]} sagas/s).</p>
{verdict}
{_bar_chart("Outcomes", document["outcomes"])}
{_histogram("Saga duration (virtual seconds)", list(durations))}
{_bar_chart("Faults injected vs. recovery work", faults_vs_retries, "#a05a2c")}
{_breakers(document.get("circuit_breakers", {}))}
{_timeline(document["slowest_saga"]["saga_id"], document["slowest_saga"]["timeline"])}
<h3>Raw report</h3><pre>{html.escape(dumps(document))}</pre>
</body></html>
"""
