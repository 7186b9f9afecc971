"""Periodic runs: intervals and 5-field cron expressions (pure functions), and the equivalent
crontab line or Kubernetes CronJob for a schedule."""

from __future__ import annotations

import re
import shlex
from datetime import datetime, timedelta

import yaml

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# (name, lowest, highest) of the five cron fields
_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]


def parse_every(text: str) -> int:
    """'90s', '15m', '1h', '2d' -> seconds (> 0). Raises ValueError naming the problem."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"--every {text!r}: expected a positive number and a unit s, m, h or d (e.g. 1h, 15m)")
    return int(m.group(1)) * _UNITS[m.group(2)]


def every_as_cron(seconds: int) -> str:
    """The cron expression of an interval that cron can express (whole minutes dividing an hour,
    whole hours dividing a day, or one day). Raises ValueError otherwise."""
    if seconds % 60 == 0 and 60 * 60 % seconds == 0:
        n = seconds // 60
        return "* * * * *" if n == 1 else f"*/{n} * * * *" if n < 60 else "0 * * * *"
    if seconds % 3600 == 0 and 24 * 3600 % seconds == 0:
        n = seconds // 3600
        return f"0 */{n} * * *" if n < 24 else "0 0 * * *"
    raise ValueError(f"an interval of {seconds}s has no cron equivalent; give --cron instead")


def _field(text: str, name: str, lo: int, hi: int) -> frozenset[int]:
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
        if not m:
            raise ValueError(f"cron {name} field {text!r}: cannot read {part!r}")
        rng, step = m.group(1), int(m.group(2) or 1)
        a, b = (lo, hi) if rng == "*" else (int(rng.split("-")[0]), int(rng.split("-")[-1]))
        if not (lo <= a <= b <= hi) or step < 1:
            raise ValueError(f"cron {name} field {text!r}: {part!r} is outside {lo}-{hi}")
        out.update(range(a, b + 1, step))
    if name == "day of week" and 7 in out:  # 7 is Sunday too
        out = (out - {7}) | {0}
    return frozenset(out)


class Cron:
    """A 5-field cron expression (minute hour day-of-month month day-of-week; *, lists, ranges,
    steps). Day of month and day of week combine as in cron: either matches when both are set."""

    def __init__(self, expr: str) -> None:
        parts = expr.split()
        if len(parts) != 5:
            raise ValueError(f"cron {expr!r}: expected 5 fields (minute hour day month weekday), got {len(parts)}")
        self.expr = expr
        self.minute, self.hour, self.dom, self.month, self.dow = (_field(p, *f) for p, f in zip(parts, _FIELDS))
        self._dom_any, self._dow_any = parts[2] == "*", parts[4] == "*"

    def day_matches(self, t: datetime) -> bool:
        dow = (t.weekday() + 1) % 7  # cron: Sunday = 0
        if self._dom_any or self._dow_any:
            return t.day in self.dom and dow in self.dow
        return t.day in self.dom or dow in self.dow

    def matches(self, t: datetime) -> bool:
        return t.minute in self.minute and t.hour in self.hour and t.month in self.month and self.day_matches(t)

    def next_after(self, t: datetime) -> datetime:
        """The first matching minute strictly after ``t``. Raises ValueError if none within 5 years."""
        n = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = n + timedelta(days=366 * 5)
        while n < end:
            if n.month not in self.month:
                n = (n.replace(day=1, hour=0, minute=0) + timedelta(days=32)).replace(day=1)
            elif not self.day_matches(n):
                n = n.replace(hour=0, minute=0) + timedelta(days=1)
            elif n.hour not in self.hour:
                n = n.replace(minute=0) + timedelta(hours=1)
            elif n.minute not in self.minute:
                n += timedelta(minutes=1)
            else:
                return n
        raise ValueError(f"cron {self.expr!r} never fires")


def command(workflow: str, sets: list[str], *, submit_address: str | None = None) -> list[str]:
    """The segpipe command one scheduled run executes."""
    cmd = ["segpipe", "submit", workflow, "--address", submit_address, "--wait"] if submit_address else ["segpipe", "run", workflow]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def crontab_line(cron: str, workflow: str, sets: list[str], *, cwd: str, log: str) -> str:
    """A crontab entry running the workflow from ``cwd``, appending its output to ``log``."""
    Cron(cron)
    run = " ".join(shlex.quote(a) for a in command(workflow, sets))
    return f"{cron} cd {shlex.quote(cwd)} && {run} >> {shlex.quote(log)} 2>&1"


def kubernetes_cronjob(cron: str, workflow: str, sets: list[str], *, name: str, image: str, address: str) -> str:
    """A batch/v1 CronJob that submits the workflow to the Ray cluster at ``address`` (its job
    server) with the segpipe image, one run at a time."""
    Cron(cron)
    args = command(workflow, sets, submit_address=address)[1:] + ["--no-ship-code"]
    doc = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "segpipe"}},
        "spec": {
            "schedule": cron,
            "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 1, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "segpipe", "image": image, "args": args,
                                "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}}}],
            }}}},
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)
