"""The benchmark's report: the targets checked against one run's numbers, and the tables.

The targets are about what is in the proxy's hands: its own cost on top of the stack's floor
(``bench/floor.py``, a bare Sanic + aiohttp forwarder measured in the same run, side by side),
and how it compares with LiteLLM's proxy (``--peers``). nginx stays a column for reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Where a number sits in the results: part, row (a column of the table), key.
_Path = tuple[str, str, str]


@dataclass(frozen=True)
class Target:
    name: str
    ours: _Path
    versus: _Path
    how: str  # "ratio": ours / versus; "added": ours - versus
    limit: float
    op: str  # "<=" or ">="
    unit: str  # shown after the numbers ("x", "us", "ms", "KiB")
    scale: float = 1.0  # applied to both numbers before comparing (us -> ms)


TARGETS = (
    Target(
        "CPU per non-streamed request, proxy / floor",
        ("nonstream", "proxy", "server_cpu_us_per_request"),
        ("nonstream", "floor", "server_cpu_us_per_request"),
        "ratio",
        1.3,
        "<=",
        "x",
    ),
    Target(
        "relay CPU per event, proxy / floor",
        ("streaming", "proxy", "server_cpu_s_per_1k_events"),
        ("streaming", "floor", "server_cpu_s_per_1k_events"),
        "ratio",
        1.1,
        "<=",
        "x",
    ),
    Target(
        "relay CPU per event with think stripping / floor",
        ("streaming", "proxy_strip", "server_cpu_s_per_1k_events"),
        ("streaming", "floor", "server_cpu_s_per_1k_events"),
        "ratio",
        1.5,
        "<=",
        "x",
    ),
    Target(
        "added latency p50 @1 conn, proxy - floor",
        ("nonstream", "proxy", "latency_p50_us"),
        ("nonstream", "floor", "latency_p50_us"),
        "added",
        30.0,
        "<=",
        "us",
    ),
    Target(
        "RSS per open idle stream, proxy - floor",
        ("memory", "proxy", "kib_per_stream"),
        ("memory", "floor", "kib_per_stream"),
        "added",
        4.0,
        "<=",
        "KiB",
    ),
    Target(
        "per-event delay p99 @10,000 events/s, proxy - floor",
        ("streaming", "proxy", "delay_p99_us"),
        ("streaming", "floor", "delay_p99_us"),
        "added",
        1.0,
        "<=",
        "ms",
        scale=1e-3,
    ),
    Target(
        "requests/s, proxy / LiteLLM (same upstream)",
        ("nonstream", "proxy", "rps"),
        ("nonstream", "litellm", "rps"),
        "ratio",
        30.0,
        ">=",
        "x",
    ),
)


def number(results: dict[str, Any], path: _Path) -> float | None:
    part, row, key = path
    data = results.get(part, {}).get(row, {})
    if key == "delay_p99_us":
        data, key = data.get("delay_us") or {}, "p99"
    value = data.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: both numbers, what they make, the limit, pass/fail (None: not measured)."""
    checked = []
    for target in TARGETS:
        ours, versus = number(results, target.ours), number(results, target.versus)
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

    def pick(part: dict[str, Any], key: str, *path: str, scale: float = 1.0) -> dict[str, Any]:
        out = {}
        for name, _ in COLUMNS:
            value: Any = part.get(name, {}).get(key)
            for step in path:
                value = value.get(step) if isinstance(value, dict) else None
            out[name] = value * scale if isinstance(value, int | float) else value
        return out

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
            p50s = pick(ns, "latency_p50_us")
            floor_p50, proxy_p50 = p50s.get("floor"), p50s.get("proxy")
            added = proxy_p50 - floor_p50 if proxy_p50 is not None and floor_p50 is not None else None
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
        strip = st.get("proxy_strip")
        if strip:
            floor = st.get("floor", {})
            row(
                "  proxy+strip: relay CPU s / 1k events",
                {
                    "floor": floor.get("server_cpu_s_per_1k_events"),
                    "proxy": strip["server_cpu_s_per_1k_events"],
                },
                4,
            )
            row(
                "  proxy+strip: delay p99 (ms)",
                {
                    "floor": (floor.get("delay_us") or {}).get("p99", 0) / 1000 if floor else None,
                    "proxy": strip["delay_us"]["p99"] / 1000,
                },
                2,
            )
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
