"""The benchmark's report: the targets checked against one run's numbers, and the tables.

The targets are about what is in the proxy's hands: its own cost on top of the stack's floor
(``bench/floor.py``, a bare Sanic + aiohttp forwarder measured in the same run, side by side),
and how it compares with LiteLLM's proxy (``--peers``). nginx stays a column for reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """A limit on ``key`` of ``part`` (a path through the results: ``("delay_us", "p99")``),
    comparing the table's ``ours`` column with its ``versus`` column."""

    name: str
    part: str
    key: tuple[str, ...]
    how: str  # "ratio": ours / versus; "added": ours - versus
    limit: float
    op: str  # "<=" or ">="
    unit: str  # shown after the numbers ("x", "us", "ms", "KiB")
    scale: float = 1.0  # applied to both numbers before comparing (us -> ms)
    ours: str = "proxy"
    versus: str = "floor"


_ADDED_LATENCY = Target(
    "added latency p50 @1 conn, proxy - floor", "nonstream", ("latency_p50_us",), "added", 30.0, "<=", "us"
)
TARGETS = (
    Target(
        "CPU per non-streamed request, proxy / floor",
        "nonstream", ("server_cpu_us_per_request",), "ratio", 1.3, "<=", "x",
    ),
    Target(
        "relay CPU per event, proxy / floor",
        "streaming", ("server_cpu_s_per_1k_events",), "ratio", 1.1, "<=", "x",
    ),
    Target(
        "relay CPU per event with think stripping / floor",
        "streaming", ("server_cpu_s_per_1k_events",), "ratio", 1.5, "<=", "x", ours="proxy_strip",
    ),
    _ADDED_LATENCY,
    Target(
        "RSS per open idle stream, proxy - floor",
        "memory", ("kib_per_stream",), "added", 4.0, "<=", "KiB",
    ),
    Target(
        "per-event delay p99 @10,000 events/s, proxy - floor",
        "streaming", ("delay_us", "p99"), "added", 1.0, "<=", "ms", scale=1e-3,
    ),
    Target(
        "requests/s, proxy / LiteLLM (same upstream)",
        "nonstream", ("rps",), "ratio", 30.0, ">=", "x", versus="litellm",
    ),
)  # fmt: skip


def dig(data: Any, *steps: str) -> float | None:
    """The number at ``steps`` into nested dicts, or None where a step or the number is missing."""
    for step in steps:
        data = data.get(step) if isinstance(data, dict) else None
    return data if isinstance(data, int | float) and not isinstance(data, bool) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: both numbers, what they make, the limit, pass/fail (None: not measured)."""
    checked = []
    for target in TARGETS:
        part = results.get(target.part, {})
        ours, versus = dig(part, target.ours, *target.key), dig(part, target.versus, *target.key)
        if ours is not None and versus is not None:
            ours, versus = ours * target.scale, versus * target.scale
        value = ratio(ours, versus) if target.how == "ratio" else None
        if target.how == "added" and ours is not None and versus is not None:
            value = ours - versus
        passed = (
            None if value is None else value <= target.limit if target.op == "<=" else value >= target.limit
        )
        checked.append(
            {
                "target": target.name,
                "ours": ours,
                "versus": versus,
                "value": value,
                "limit": target.limit,
                "op": target.op,
                "unit": target.unit,
                "pass": passed,
            }
        )
    return checked


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def verdict(target: dict[str, Any]) -> str:
    if target["pass"] is None:
        return "n/a"
    return "PASS" if target["pass"] else "FAIL"


def targets_table(targets: list[dict[str, Any]]) -> str:
    header = ("target", "proxy", "vs", "measured", "limit", "result")
    rows: list[tuple[str, ...] | str] = []
    for target in targets:
        unit = target["unit"]
        digits = 2 if unit in ("x", "ms") else 1 if unit == "KiB" else 0
        if target["unit"] == "x":
            measured = f"{fmt(target['value'], 2)}x"
            limit = f"{target['op']} {target['limit']:g}x"
        else:
            measured = "-" if target["value"] is None else f"{target['value']:+,.{digits}f} {unit}"
            limit = f"{target['op']} +{target['limit']:g} {unit}"
        rows.append(
            (
                target["target"],
                fmt(target["ours"], digits),
                fmt(target["versus"], digits),
                measured,
                limit,
                verdict(target),
            )
        )
    return table(header, rows)


# The columns of the main table, in order, with their labels.
COLUMNS = (
    ("direct", "direct"),
    ("nginx", "nginx"),
    ("floor", "floor"),
    ("proxy", "proxy"),
    ("litellm", "LiteLLM"),
)


def render(results: dict[str, Any]) -> str:
    """Every number side by side: direct, nginx, floor, proxy, LiteLLM (when run), proxy/floor."""
    meta = results["meta"]
    ns, st, mem = results.get("nonstream", {}), results.get("streaming", {}), results.get("memory", {})
    peers = any("litellm" in part for part in (ns, st))
    columns = [(key, label) for key, label in COLUMNS if key != "litellm" or peers]
    header = ("", *[label for _, label in columns], "proxy/floor", *(["proxy/LiteLLM"] if peers else []))
    rows: list[tuple[str, ...] | str] = []

    def row(label: str, values: dict[str, Any], digits: int = 0, ratios: bool = True) -> None:
        ours = values.get("proxy")
        cells = [fmt(values.get(key), digits) for key, _ in columns]
        extra = [fmt(ratio(ours, values.get("floor")), 2) if ratios else ""]
        if peers:
            extra.append(fmt(ratio(ours, values.get("litellm")), 2) if ratios else "")
        rows.append((label, *cells, *extra))

    def pick(part: dict[str, Any], *key: str, scale: float = 1.0) -> dict[str, Any]:
        picked = {name: dig(part, name, *key) for name, _ in COLUMNS}
        return {name: value * scale if value is not None else None for name, value in picked.items()}

    if ns:
        rows.append(
            f"Non-streaming: POST /v1/chat/completions ({meta['request_bytes']} B body, "
            f"{meta['answer_bytes']} B answer); wrk, 1 thread"
        )
        row(f"requests/s @{meta['profile']['connections']} conns", pick(ns, "rps"))
        row("  server CPU us/request", pick(ns, "server_cpu_us_per_request"), 1)
        row("latency p50 @1 conn (us)", pick(ns, "latency_p50_us"))
        row("latency p99 @1 conn (us)", pick(ns, "latency_p99_us"))
        seen = ns.get("proxy", {}).get("overhead_histogram")
        if seen:
            added = next(
                (t["value"] for t in results.get("targets", []) if t["target"] == _ADDED_LATENCY.name), None
            )
            rows.append(
                f"  proxy overhead per rerouter_proxy_overhead_seconds ({seen['count']:,.0f} requests): "
                f"mean {fmt(seen['mean_us'])} us, p50 {fmt(seen['p50_us'])} us, "
                f"p99 {fmt(seen['p99_us'])} us; the benchmark's own figure "
                f"(p50 @1 conn, proxy - floor): {fmt(added)} us"
            )
        row(f"stream=true req/s @{meta['profile']['connections']} (20-event canned)", pick(ns, "stream_rps"))
        row("  errors (wrk)", pick(ns, "errors"), ratios=False)
        row("  other processes' load (cores)", pick(ns, "other_cores"), 2, ratios=False)
        row("  steal (cores)", pick(ns, "steal_cores"), 2, ratios=False)
    if st:
        p = meta["profile"]
        rows.append(
            f"Streaming: {p['streams']} streams x {p['events']} events @ {p['rate']:g}/s "
            f"= {p['streams'] * p['rate']:,.0f} events/s (LiteLLM: see below)"
        )
        row("per-event delay p50 (ms)", pick(st, "delay_us", "p50", scale=1e-3), 2)
        row("per-event delay p99 (ms)", pick(st, "delay_us", "p99", scale=1e-3), 2)
        row("relay CPU s / 1k events", pick(st, "server_cpu_s_per_1k_events"), 4)
        if "proxy_strip" in st:  # its own rows, against the floor's plain relay
            strip = {"floor": st.get("floor", {}), "proxy": st["proxy_strip"]}
            row("  proxy+strip: relay CPU s / 1k events", pick(strip, "server_cpu_s_per_1k_events"), 4)
            row("  proxy+strip: delay p99 (ms)", pick(strip, "delay_us", "p99", scale=1e-3), 2)
        row("  upstream CPU s / 1k events", pick(st, "upstream_cpu_s_per_1k_events"), 4, ratios=False)
        row("  client CPU s (whole run)", pick(st, "client_cpu_s"), 2, ratios=False)
        row("  other processes' load (cores)", pick(st, "other_cores"), 2, ratios=False)
        row("  interrupts (cores)", pick(st, "irq_cores"), 2, ratios=False)
        row("  steal (cores)", pick(st, "steal_cores"), 2, ratios=False)
        row(
            "  events seen / sent",
            {name: _seen(st.get(name)) for name, _ in COLUMNS},
            ratios=False,
        )
        if "litellm" in st:
            rows.append(f"  LiteLLM: {st['litellm'].get('load', '-')}")
    if mem:
        rows.append(f"Memory: {meta['profile']['idle_streams']} idle open streams (first event received)")
        row("RSS per open stream (KiB)", pick(mem, "kib_per_stream"), 1)
        row("  RSS before (MiB)", pick(mem, "rss_before_kib", scale=1 / 1024), 1, ratios=False)
    return table(header, rows)


def _seen(run: dict[str, Any] | None) -> str | None:
    if not run or "events_sent" not in run:
        return None
    return f"{int(run['events_seen'])}/{int(run['events_sent'])}"


def table(header: tuple[str, ...], rows: list[tuple[str, ...] | str]) -> str:
    cells = [header, *[r for r in rows if isinstance(r, tuple)]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join([r[0].ljust(widths[0]), *[r[i].rjust(widths[i]) for i in range(1, len(r))]]).rstrip()

    out = [line(header), "-" * len(line(header))]
    for r in rows:
        out.append(r if isinstance(r, str) else line(r))
    return "\n".join(out)
