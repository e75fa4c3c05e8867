"""What every benchmark here needs: its own PostgreSQL database, the gateway's commands as
subprocesses on 127.0.0.1, percentiles, and a table of figures with targets and a peer.

Benchmarks are scripts, not tests: ``bench/<name>.py`` imports this module as ``_common``
(``bench/`` is first on ``sys.path`` when a script in it runs).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
OUTPUT_DIR = BENCH_DIR / "output"  # gitignored
PYTHON = sys.executable
MANAGE = str(ROOT / "manage.py")
LOCALHOST = "127.0.0.1"


def log(msg: str) -> None:
    """Progress goes to stderr with a timestamp; figures go to stdout."""
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# --- Database ---------------------------------------------------------------------------


def bench_database_url(db_name: str) -> str:
    """DATABASE_URL's server and user, with ``db_name`` as the database: a benchmark never
    writes into the database the caller named (that one is usually the test database)."""
    base = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    parts = urlsplit(base)
    if parts.scheme not in ("postgres", "postgresql"):
        sys.exit(f"DATABASE_URL must be a postgres:// URL, got {base!r}")
    if parts.hostname not in (LOCALHOST, "localhost"):
        sys.exit("benchmarks only talk to 127.0.0.1: DATABASE_URL must point there")
    return urlunsplit((parts.scheme, parts.netloc, f"/{db_name}", "", ""))


def _admin_connect(url: str):
    import psycopg

    parts = urlsplit(url)
    return psycopg.connect(
        host=parts.hostname,
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password,
        dbname="postgres",
        autocommit=True,
    )


def _database_name(url: str) -> str:
    name = urlsplit(url).path.lstrip("/")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        sys.exit(f"refusing odd database name {name!r}")
    return name


def migrate_database(url: str) -> None:
    """Bring the benchmark database's schema up to date with the gateway's own command."""
    subprocess.run(
        [PYTHON, MANAGE, "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=gateway_env(url),
        check=True,
    )


def recreate_database(url: str) -> None:
    """Drop and create the benchmark database, then migrate it with the gateway's own command."""
    name = _database_name(url)
    with _admin_connect(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    log(f"created database {name}; migrating")
    migrate_database(url)


def ensure_database(url: str) -> bool:
    """Create the benchmark database if it is missing, then migrate it. For data that is slow
    to make and kept between runs; True when the database was created just now."""
    name = _database_name(url)
    with _admin_connect(url) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    log(f"{'created' if not exists else 'found'} database {name}; migrating")
    migrate_database(url)
    return not exists


def drop_database(url: str) -> None:
    name = _database_name(url)
    with _admin_connect(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def gateway_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment every gateway subprocess and DCMTK tool gets: the bench database,
    TCP_NODELAY (Debian's DCMTK honours it; without it Nagle adds ~40-90 ms per exchange),
    and a data directory under bench/output so nothing lands in the developer's var/."""
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        TCP_NODELAY="1",
        DJANGO_SETTINGS_MODULE="gateway.settings",
        DJANGO_SECRET_KEY="bench-only-not-secret",
        GATEWAY_DATA_DIR=str(OUTPUT_DIR / "var"),
        LOG_LEVEL=os.environ.get("BENCH_GATEWAY_LOG_LEVEL", "WARNING"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


def project_importable() -> None:
    """Put the project's root on sys.path (bench/ is first when a script in it runs), so the
    gateway's packages and tests.servers can be imported."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def setup_django(database_url: str) -> None:
    """Configure Django in this process against the bench database (for bulk inserts)."""
    os.environ.update(gateway_env(database_url))
    project_importable()
    import django

    django.setup()


# --- Subprocesses ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args!r} exited with {proc.returncode} before listening"
            )
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {LOCALHOST}:{port} after {timeout:.0f} s")


@dataclass
class Service:
    """A long-lived subprocess (gateway command or peer server) whose output is kept."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    cwd: Path = ROOT
    proc: subprocess.Popen | None = None
    output: deque = field(default_factory=lambda: deque(maxlen=200))

    def start(self, timeout: float = 60) -> Service:
        log(f"starting {self.name}: {' '.join(self.argv)}")
        self.proc = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        try:
            wait_for_port(self.port, self.proc, timeout)
        except Exception:
            self.stop()
            log(f"{self.name} output:\n" + "".join(self.output))
            raise
        return self

    def _drain(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def pid(self) -> int:
        assert self.proc
        return self.proc.pid

    def peak_rss_mb(self) -> float | None:
        """VmHWM (peak resident set) of the process and its children, in MiB."""
        if not self.proc:
            return None
        total = 0
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            kb = _status_field(pid, "VmHWM")
            if kb:
                total += kb
        return total / 1024 if total else None

    def stop(self, grace: float = 15) -> int | None:
        """SIGTERM (the gateway's commands stop cleanly on it), then SIGKILL after ``grace``."""
        if not self.proc or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for {grace:.0f} s; killing it")
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def manage_service(name: str, command: Sequence[str], env: dict[str, str], port: int) -> Service:
    return Service(name, [PYTHON, MANAGE, *command], env, port)


def manage_help(command: str, env: dict[str, str]) -> str | None:
    """The ``--help`` text of a gateway command, or None when the command does not exist yet."""
    res = subprocess.run(
        [PYTHON, MANAGE, command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return res.stdout if res.returncode == 0 else None


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for k in kids:
        out.append(int(k))
        out.extend(_children(int(k)))
    return out


def _status_field(pid: int, name: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- Statistics --------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil
    return ordered[int(min(rank, len(ordered))) - 1]


def summary_ms(seconds: Iterable[float]) -> dict:
    """p50 / p99 / mean / max in milliseconds of durations given in seconds."""
    ms = [s * 1000 for s in seconds]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms),
        "max_ms": max(ms),
    }


# --- Report ------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    metric: str
    value: float | None
    unit: str = ""
    target: str = ""  # e.g. ">= 600" or "<= 5"; empty when the figure is only reported
    peer: float | None = None
    peer_name: str = ""
    note: str = ""

    @property
    def verdict(self) -> str:
        if not self.target:
            return ""
        if self.value is None:
            return "n/a"
        op, bound = self.target.split()
        ok = self.value >= float(bound) if op == ">=" else self.value <= float(bound)
        return "PASS" if ok else "FAIL"


@dataclass
class Report:
    title: str
    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # raw figures for the JSON file
    notes: list[str] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row

    def print(self, out=sys.stdout) -> None:
        w = out.write
        w(f"\n{self.title}\n{'=' * len(self.title)}\n")
        headers = ("metric", "value", "target", "verdict", "peer", "note")
        sections: dict[str, list[Row]] = {}
        for r in self.rows:
            sections.setdefault(r.section, []).append(r)
        for section, rows in sections.items():
            table = [
                (
                    r.metric,
                    _fmt(r.value, r.unit),
                    f"{r.target} {r.unit}".strip() if r.target else "",
                    r.verdict,
                    f"{_fmt(r.peer, r.unit)} ({r.peer_name})" if r.peer_name else "",
                    r.note,
                )
                for r in rows
            ]
            widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
            w(f"\n{section}\n")
            w("  " + "  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)).rstrip() + "\n")
            w("  " + "  ".join("-" * x for x in widths) + "\n")
            for t in table:
                w("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(t)).rstrip() + "\n")
        verdicts = [r.verdict for r in self.rows if r.target]
        w(
            f"\ntargets: {verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, "
            f"{verdicts.count('n/a')} n/a\n"
        )
        for n in self.notes:
            w(f"note: {n}\n")
        out.flush()

    def write_json(self, stem: str) -> Path:
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = OUTPUT_DIR / f"{stem}-{stamp}.json"
        payload = {
            "title": self.title,
            "at": stamp,
            "rows": [{**r.__dict__, "verdict": r.verdict} for r in self.rows],
            "notes": self.notes,
            "data": self.data,
        }
        path.write_text(json.dumps(payload, indent=2, default=str))
        return path


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def format_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table with padded columns, readable as plain text too."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(cells)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its living descendants (e.g. a
    gunicorn master and its workers)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
