#!/usr/bin/env python
"""UI benchmark: every list page of the administrator's UI with 100,000 rows behind it, served
for real and timed over HTTP, side by side with Django's own admin on the same tables.

    make bench-ui            # or, with options:
    cd /work/main && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test \\
        .venv/bin/python bench/ui.py [--requests 30] [--reseed] [--no-admin]

Target (issue 4): every list loads in < 300 ms with 100,000 rows behind it. Each page is
fetched ``--warmups`` times, then ``--requests`` times; its verdict is on p95.

1. Data: its own database (``bench_ui`` on DATABASE_URL's server; created and migrated when
   missing, never the test database), seeded once with 100,000 steps, HL7 messages, studies,
   instances, deliveries and audit events (bench/_ui_data.py, a few minutes) and reused by
   later runs. ``--reseed`` seeds again; a seed older than two days is made again.
2. Server: ``gunicorn gateway.wsgi:application --workers 2`` on a free port of 127.0.0.1,
   signed in as a bench superuser through the sign-in page (urllib with a cookie jar). Each
   request is a new connection (gunicorn's sync workers close it) and is timed to its last
   byte; redirects are not followed (a page that sends the browser to sign in shows as 302).
   The gunicorn processes' CPU time per request is reported too: unlike wall time, other work
   on the machine does not inflate it.
3. Peer: the Django admin's changelists of the same models on the same server and session.
   The admin counts the rows behind every list and lists the distinct values of some filter
   columns, which is what a UI must not do at this size; its pages show 100 rows, ours 50.
4. Per page, one more request in this process (Django's test client, same database) counts
   its SQL statements and their time: the "no N+1" half of the target. For a page that misses
   the target, EXPLAIN ANALYZE of its slowest statements goes to bench/output/ui-explain.txt.

Prints two tables (ours with verdicts; ours against the admin) and writes them to
bench/output/ui.txt, the raw timings to bench/output/ui-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime

import _ui_data
from _common import (
    LOCALHOST,
    OUTPUT_DIR,
    PYTHON,
    Service,
    bench_database_url,
    drop_database,
    ensure_database,
    format_table,
    free_port,
    gateway_env,
    log,
    percentile,
    recreate_database,
    setup_django,
    tree_cpu_seconds,
)

TARGET_MS = 300.0
BENCH_USER = "bench-ui-admin"
PLACEHOLDER = b"Not built yet"


# --- Pages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Page:
    section: str
    label: str
    path: str


def our_pages(p: _ui_data.Picks) -> list[Page]:
    q = urllib.parse.quote
    return [
        Page("Worklist", "default (open steps)", "/worklist/"),
        Page("Worklist", "open CT", "/worklist/?status=open&modality=CT"),
        Page(
            "Worklist",
            f"patient name prefix {p.patient_prefix}",
            f"/worklist/?patient={q(p.patient_prefix)}",
        ),
        Page("Worklist", "page 200", "/worklist/?page=200"),
        Page("HL7 messages", "all", "/hl7/"),
        Page("HL7 messages", "refused", "/hl7/?status=refused"),
        Page("HL7 messages", f"sender {p.sender}", f"/hl7/?sender={q(p.sender)}"),
        Page("HL7 messages", "one control id", f"/hl7/?control_id={q(p.control_id)}"),
        Page("Studies", "all", "/studies/"),
        Page("Studies", "one accession", f"/studies/?accession={q(p.accession)}"),
        Page("Deliveries", "all", "/deliveries/"),
        Page("Deliveries", "failed, flaky node", f"/deliveries/?status=FAILED&node={p.flaky_node}"),
        Page("Deliveries", "open", "/deliveries/?status=open"),
        Page("Deliveries", "page 200", "/deliveries/?page=200"),
        Page("Configuration", "nodes", "/nodes/"),
        Page("Configuration", "rules (50)", "/rules/"),
        Page("Audit trail", "all", "/audit/"),
        Page("Audit trail", "action routing", "/audit/?action=routing"),
        Page("Audit trail", f"search {p.audit_q}", f"/audit/?q={q(p.audit_q)}"),
        Page(
            "Audit trail",
            "CSV export, action routing.node (full body)",
            "/audit/export.csv?action=routing.node",
        ),
        Page("Detail", "a step", f"/worklist/{p.step}/"),
        Page("Detail", "an HL7 message", f"/hl7/{p.message}/"),
        Page(
            "Detail", f"a study with {p.big_study_instances} instances", f"/studies/{p.big_study}/"
        ),
        Page("Detail", "an audit event", f"/audit/{p.audit_event}/"),
        Page("Dashboard", "page", "/"),
        Page("Dashboard", "dashboard.json", "/dashboard.json"),
    ]


def admin_pairs(p: _ui_data.Picks) -> list[tuple[str, str, str]]:
    """(what, our page, the admin's changelist of the same rows)."""
    q = urllib.parse.quote
    return [
        ("steps", "/worklist/", "/admin/worklist/scheduledstep/"),
        (
            "steps: scheduled CT",
            "/worklist/?status=SCHEDULED&modality=CT",
            "/admin/worklist/scheduledstep/?status__exact=SCHEDULED&modality=CT",
        ),
        ("HL7 messages", "/hl7/", "/admin/worklist/hl7message/"),
        (
            "HL7 messages: errors",
            "/hl7/?status=ERROR",
            "/admin/worklist/hl7message/?status__exact=ERROR",
        ),
        (
            "HL7 messages: a control id",
            f"/hl7/?control_id={q(p.control_id)}",
            f"/admin/worklist/hl7message/?q={q(p.control_id)}",
        ),
        ("studies", "/studies/", "/admin/routing/receivedstudy/"),
        (
            "studies: an accession",
            f"/studies/?accession={q(p.accession)}",
            f"/admin/routing/receivedstudy/?q={q(p.accession)}",
        ),
        ("deliveries", "/deliveries/", "/admin/routing/delivery/"),
        (
            "deliveries: failed, flaky node",
            f"/deliveries/?status=FAILED&node={p.flaky_node}",
            f"/admin/routing/delivery/?status__exact=FAILED&node__id__exact={p.flaky_node}",
        ),
        ("audit trail", "/audit/", "/admin/gateway/auditevent/"),
        (
            "audit trail: search",
            f"/audit/?q={q(p.audit_q)}",
            f"/admin/gateway/auditevent/?q={q(p.audit_q)}",
        ),
        ("nodes", "/nodes/", "/admin/routing/node/"),
        ("rules", "/rules/", "/admin/routing/rule/"),
    ]


# --- A browser without requests --------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # urllib then raises HTTPError with the 3xx, which get() returns as is


class Browser:
    """One signed-in session: urllib with a cookie jar; each request a new connection."""

    def __init__(self, base: str):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect()
        )

    def request(self, path: str, data: dict | None = None) -> tuple[int, bytes, float, dict]:
        """(status, body, seconds to the last byte, headers)."""
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(self.base + path, data=body)
        if data is not None:
            req.add_header("Referer", self.base + path)
        t0 = time.perf_counter()
        try:
            with self.opener.open(req, timeout=300) as resp:
                content = resp.read()
                status, headers = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            content = exc.read()
            status, headers = exc.code, dict(exc.headers)
        return status, content, time.perf_counter() - t0, headers

    def sign_in(self, username: str, password: str) -> None:
        status, page, _, _ = self.request("/login/")
        token = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        if status != 200 or not token:
            raise RuntimeError(f"no sign-in form at /login/ (HTTP {status})")
        status, _, _, headers = self.request(
            "/login/",
            {
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": token.group(1).decode(),
                "next": "/",
            },
        )
        signed_in = any(c.name == "sessionid" for c in self.jar)
        if status != 302 or not signed_in:
            raise RuntimeError(
                f"sign-in failed: HTTP {status}, Location {headers.get('Location')!r}"
            )
        log(f"signed in as {username}")


# --- Timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    path: str
    status: int = 0
    size: int = 0
    times_ms: list[float] = field(default_factory=list)
    note: str = ""
    sql_count: int | None = None
    sql_ms: float | None = None
    server_cpu_ms: float | None = None  # gunicorn's CPU per timed request
    target_ms: float = TARGET_MS

    @property
    def p50(self) -> float | None:
        return percentile(self.times_ms, 50)

    @property
    def p95(self) -> float | None:
        return percentile(self.times_ms, 95)

    @property
    def max(self) -> float | None:
        return max(self.times_ms) if self.times_ms else None

    @property
    def verdict(self) -> str:
        if self.status != 200 or self.p95 is None:
            return "n/a"
        return "met" if self.p95 < self.target_ms else "MISSED"


def measure(browser: Browser, path: str, args: argparse.Namespace, server: Service) -> Timing:
    """``args.warmups`` untimed fetches, then up to ``args.requests`` timed ones (fewer if they
    take longer than ``args.page_seconds`` in all)."""
    requests, budget_s = args.requests, args.page_seconds
    result = Timing(path, target_ms=args.target_ms)
    for _ in range(args.warmups):
        result.status, body, _, headers = browser.request(path)
    started = time.monotonic()
    cpu_before = tree_cpu_seconds(server.pid)
    for _ in range(requests):
        status, body, seconds, headers = browser.request(path)
        result.status = status
        result.size = len(body)
        result.times_ms.append(seconds * 1000)
        if status != 200 or time.monotonic() - started > budget_s:
            break
    if result.times_ms:
        cpu = tree_cpu_seconds(server.pid) - cpu_before
        result.server_cpu_ms = cpu * 1000 / len(result.times_ms)
    if result.status in (301, 302):
        result.note = f"redirect to {headers.get('Location', '?')}"
    elif result.status != 200:
        result.note = f"HTTP {result.status}"
    elif PLACEHOLDER in body:
        result.note = "placeholder (Not built yet)"
    if len(result.times_ms) < requests and result.status == 200:
        result.note = (result.note + "; " if result.note else "") + (
            f"stopped after {len(result.times_ms)} requests ({budget_s:.0f} s budget)"
        )
    log(
        f"{path}: HTTP {result.status}, {len(result.times_ms)} requests, "
        f"p50 {_ms(result.p50)} p95 {_ms(result.p95)} max {_ms(result.max)} ms, "
        f"{result.size:,} bytes {result.note}"
    )
    return result


def sql_profile(user, paths: list[str]) -> dict[str, list[dict]]:
    """Each page once in this process with Django's test client: its SQL statements (with
    their parameters in, ready for EXPLAIN) and each one's time in ms."""
    from django.db import connection
    from django.test import Client

    client = Client(HTTP_HOST=LOCALHOST, raise_request_exception=False)
    client.force_login(user)
    out: dict[str, list[dict]] = {}
    statements: list[dict] = []

    def timed(execute, sql, params, many, context):
        t0 = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            text = connection.ops.last_executed_query(context["cursor"], sql, params)
            statements.append({"sql": text, "ms": ms})

    for path in paths:
        statements = []
        with connection.execute_wrapper(timed):
            response = client.get(path)
            if response.streaming:
                b"".join(response.streaming_content)
        out[path] = statements
    connection.close()
    return out


def explain(statements: list[dict], top: int = 3) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the slowest SELECTs among a page's ``statements``."""
    from django.db import connection

    selects = [s for s in statements if s["sql"].lstrip().upper().startswith("SELECT")]
    out = []
    with connection.cursor() as cur:
        for statement in sorted(selects, key=lambda s: -s["ms"])[:top]:
            # No parameters: the driver leaves any % (a LIKE pattern) alone.
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement["sql"])
            plan = "\n".join(row[0] for row in cur.fetchall())
            out.append(
                f"-- {statement['ms']:.1f} ms in the page's request\n{statement['sql']}\n{plan}"
            )
    return out


# --- Main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", default="bench_ui", help="the bench's own database (kept)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows behind each list")
    parser.add_argument("--reseed", action="store_true", help="seed again even if seeded")
    parser.add_argument("--requests", type=int, default=30, help="timed requests per page")
    parser.add_argument("--warmups", type=int, default=3, help="untimed requests first")
    parser.add_argument(
        "--page-seconds", type=float, default=90, help="time cap of one page's timed requests"
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers")
    parser.add_argument("--no-admin", action="store_true", help="skip the Django admin peer")
    parser.add_argument("--drop-db", action="store_true", help="drop the database at the end")
    parser.add_argument(
        "--target-ms", type=float, default=TARGET_MS, help="the p95 a page must stay under"
    )
    args = parser.parse_args()

    started = time.monotonic()
    load_before = os.getloadavg()
    db_url = bench_database_url(args.db)
    try:
        ensure_database(db_url)
    except subprocess.CalledProcessError:
        # The kept database was migrated with migrations that have since changed.
        log("migrating the kept database failed; making it again (and seeding it)")
        recreate_database(db_url)
    setup_django(db_url)
    picks = _ui_data.ensure_seeded(_ui_data.Sizes(rows=args.rows), force=args.reseed)
    from django.db import connection

    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    password = secrets.token_urlsafe(16)
    user = bench_user(password)
    connection.close()

    port = free_port()
    server = Service(
        "gunicorn",
        [
            PYTHON,
            "-m",
            "gunicorn",
            "gateway.wsgi:application",
            "--bind",
            f"{LOCALHOST}:{port}",
            "--workers",
            str(args.workers),
            "--timeout",
            "300",
        ],
        gateway_env(db_url),
        port,
    )
    pages = our_pages(picks)
    pairs = [] if args.no_admin else admin_pairs(picks)
    ours: dict[str, Timing] = {}
    admin: dict[str, Timing] = {}
    with server:
        browser = Browser(f"http://{LOCALHOST}:{port}")
        browser.sign_in(BENCH_USER, password)
        for page in pages:
            ours[page.path] = measure(browser, page.path, args, server)
        for _, our_path, admin_path in pairs:
            if our_path not in ours:
                ours[our_path] = measure(browser, our_path, args, server)
            admin[admin_path] = measure(browser, admin_path, args, server)
    load_after = os.getloadavg()

    log("counting each page's SQL statements in this process")
    profiles = sql_profile(user, [*ours, *admin])
    for timing in [*ours.values(), *admin.values()]:
        queries = profiles.get(timing.path, [])
        timing.sql_count = len(queries)
        timing.sql_ms = sum(q["ms"] for q in queries)
    explained = []
    for page in pages:
        timing = ours[page.path]
        if timing.verdict == "MISSED":
            explained.append(
                f"### {page.section}: {page.label}  {page.path}\n"
                + "\n\n".join(explain(profiles.get(page.path, [])))
            )

    text = render(
        args, picks, pages, pairs, ours, admin, load_before, load_after, time.monotonic() - started
    )
    print(text)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUTPUT_DIR / "ui.txt").write_text(text + "\n")
    explain_path = OUTPUT_DIR / "ui-explain.txt"
    explain_path.unlink(missing_ok=True)  # never a previous run's plans next to this run
    if explained:
        explain_path.write_text("\n\n".join(explained) + "\n")
        print(f"EXPLAIN ANALYZE of the slowest statements of each missed page: {explain_path}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    raw = OUTPUT_DIR / f"ui-{stamp}.json"
    raw.write_text(
        json.dumps(
            {
                "at": stamp,
                "picks": picks.__dict__,
                "args": vars(args),
                "ours": {k: v.__dict__ for k, v in ours.items()},
                "admin": {k: v.__dict__ for k, v in admin.items()},
                "sql": {
                    k: [{"ms": q["ms"], "sql": q["sql"]} for q in v] for k, v in profiles.items()
                },
            },
            indent=1,
            default=str,
        )
    )
    print(f"figures written to {OUTPUT_DIR / 'ui.txt'} and {raw}")
    if args.drop_db:
        from django.db import connections

        connections.close_all()
        drop_database(db_url)


def bench_user(password: str):
    """The bench's superuser (an administrator in the UI, staff in the admin), with a new
    password each run."""
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username=BENCH_USER)
    user.is_superuser = user.is_staff = user.is_active = True
    user.set_password(password)
    user.save()
    return user


def render(
    args,
    picks: _ui_data.Picks,
    pages: list[Page],
    pairs,
    ours: dict[str, Timing],
    admin: dict[str, Timing],
    load_before,
    load_after,
    seconds: float,
) -> str:
    c = picks.counts
    title = (
        f"UI benchmark: list pages with {args.rows:,} rows behind each, gunicorn "
        f"{args.workers} workers, {args.requests} requests per page after "
        f"{args.warmups} warm-ups"
    )
    lines = [title, "=" * len(title), ""]
    lines.append(
        f"rows: {c['steps']:,} steps ({c['orders']:,} orders, {c['patients']:,} patients), "
        f"{c['hl7']:,} HL7 messages, {c['studies']:,} studies, {c['instances']:,} instances, "
        f"{c['deliveries']:,} deliveries, {c['audit']:,} audit events, {c['nodes']} nodes, "
        f"{c['rules']} rules; seeded {picks.seeded_at}"
        + (" (this run)" if picks.seeded_now else " (reused)")
    )
    lines.append("")
    lines.append(f"Our pages (target: p95 < {args.target_ms:.0f} ms)")
    lines.append("")
    rows = []
    for page in pages:
        t = ours[page.path]
        rows.append(
            [
                page.section,
                page.label,
                str(t.status),
                _ms(t.p50),
                _ms(t.p95),
                _ms(t.max),
                _size(t.size),
                _ms(t.server_cpu_ms),
                _sql(t),
                t.verdict,
                t.note,
            ]
        )
    lines.append(
        format_table(
            [
                "area",
                "page",
                "HTTP",
                "p50 ms",
                "p95 ms",
                "max ms",
                "size",
                "server CPU ms",
                "SQL n / ms",
                "verdict",
                "note",
            ],
            rows,
        )
    )
    verdicts = [ours[p.path].verdict for p in pages]
    lines.append("")
    lines.append(
        f"target: {verdicts.count('met')} met, {verdicts.count('MISSED')} MISSED, "
        f"{verdicts.count('n/a')} n/a of {len(pages)} pages"
    )
    if pairs:
        lines += [
            "",
            "Side by side: our page and the Django admin's changelist of the same rows "
            "(same gunicorn, same session)",
            "",
        ]
        rows = []
        for what, our_path, admin_path in pairs:
            o, a = ours[our_path], admin[admin_path]
            ratio = f"{a.p95 / o.p95:.1f}x" if a.p95 and o.p95 else "-"
            rows.append(
                [
                    what,
                    _ms(o.p50),
                    _ms(o.p95),
                    _ms(o.server_cpu_ms),
                    _sql(o),
                    _ms(a.p50),
                    _ms(a.p95),
                    _ms(a.server_cpu_ms),
                    _sql(a),
                    ratio,
                    _status(a),
                ]
            )
        lines.append(
            format_table(
                [
                    "list",
                    "ours p50",
                    "ours p95",
                    "ours CPU",
                    "ours SQL n / ms",
                    "admin p50",
                    "admin p95",
                    "admin CPU",
                    "admin SQL n / ms",
                    "admin / ours p95",
                    "admin HTTP",
                ],
                rows,
            )
        )
        lines.append("")
        lines.append("paths: " + "; ".join(f"{w}: {o} vs {a}" for w, o, a in pairs))
    lines.append("")
    lines.append(
        "note: times are to the last byte over a new TCP connection per request, one "
        "request at a time; server CPU is gunicorn's (master and workers) per timed "
        "request, which other work on the machine does not inflate; SQL n / ms is one "
        "request of the page in the bench process (test client, same database), "
        "statements and their time. Our lists show 50 rows, the admin's 100."
    )
    lines.append(
        f"note: load average {load_before[0]:.2f} before and {load_after[0]:.2f} after "
        f"on {os.cpu_count()} CPUs; other work on the machine shares them (server, "
        f"client and PostgreSQL here too)"
    )
    lines.append(
        f"note: run took {seconds:.0f} s; finished {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
    )
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KB" if n >= 10240 else f"{n / 1024:.1f} KB"


def _sql(t: Timing) -> str:
    if t.sql_count is None:
        return "-"
    return f"{t.sql_count} / {_ms(t.sql_ms)}"


def _status(t: Timing) -> str:
    return str(t.status) + (f" ({t.note})" if t.note else "")


if __name__ == "__main__":
    sys.exit(main())
