"""segpipe schedule: interval and cron parsing (pure), the printed crontab line and Kubernetes
CronJob, and two scheduled runs of an incremental workflow in the foreground."""

from __future__ import annotations

import shlex
from datetime import datetime

import pytest
import yaml
from typer.testing import CliRunner

from segpipe.cli import app
from segpipe.schedule import Cron, every_as_cron, parse_every

from conftest import REPO

runner = CliRunner()
WF = REPO / "workflows" / "label-incremental.yaml"


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800)])
def test_parse_every(text, seconds):
    assert parse_every(text) == seconds


@pytest.mark.parametrize("bad", ["", "1", "0h", "1w", "-5m", "h"])
def test_parse_every_refuses(bad):
    with pytest.raises(ValueError, match="--every"):
        parse_every(bad)


def test_every_as_cron():
    assert [every_as_cron(s) for s in (60, 900, 3600, 7200, 86400)] == \
        ["* * * * *", "*/15 * * * *", "0 * * * *", "0 */2 * * *", "0 0 * * *"]
    with pytest.raises(ValueError, match="--cron"):
        every_as_cron(420)


@pytest.mark.parametrize("expr, after, expected", [
    ("0 * * * *", datetime(2026, 11, 22, 7, 24), datetime(2026, 11, 22, 8, 0)),
    ("*/15 9-17 * * 1-5", datetime(2026, 11, 22, 7, 24), datetime(2026, 11, 23, 9, 0)),  # Sunday -> Monday 9:00
    ("*/15 9-17 * * 1-5", datetime(2026, 11, 23, 17, 45), datetime(2026, 11, 24, 9, 0)),
    ("30 2 * * 7", datetime(2026, 11, 22, 7, 24), datetime(2026, 11, 29, 2, 30)),  # 7 = Sunday
    ("0 0 29 2 *", datetime(2026, 11, 22), datetime(2028, 2, 29)),  # leap day
    ("0 12 1 * 3", datetime(2026, 11, 22), datetime(2026, 11, 25, 12, 0)),  # day-of-month OR weekday
    ("5,10 0 * * *", datetime(2026, 11, 22, 0, 5), datetime(2026, 11, 22, 0, 10)),
])
def test_cron_next_after(expr, after, expected):
    assert Cron(expr).next_after(after) == expected


@pytest.mark.parametrize("bad", ["* * * *", "60 * * * *", "* 24 * * *", "* * 0 * *", "*/0 * * * *", "a * * * *"])
def test_cron_refuses(bad):
    with pytest.raises(ValueError, match="cron"):
        Cron(bad)


def test_print_kubernetes_is_a_cronjob_submitting_the_workflow():
    r = runner.invoke(app, ["schedule", str(WF), "--every", "1h", "--print", "kubernetes", "--set", "source.uri=s3://b/i",
                            "--set", "output.uri=s3://b/l", "--address", "http://segpipe-gpu-head-svc:8265"])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(r.output)
    assert (doc["apiVersion"], doc["kind"], doc["spec"]["schedule"]) == ("batch/v1", "CronJob", "0 * * * *")
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    c = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert c["args"][:5] == ["submit", "/opt/segpipe/workflows/label-incremental.yaml", "--address",
                             "http://segpipe-gpu-head-svc:8265", "--wait"]
    assert "source.uri=s3://b/i" in c["args"] and "env" not in c  # no credentials in the job


def test_print_cron_is_a_crontab_line():
    r = runner.invoke(app, ["schedule", str(WF), "--cron", "*/30 * * * *", "--print", "cron"])
    assert r.exit_code == 0, r.output
    line = r.output.strip()
    assert line.startswith("*/30 * * * * cd ")
    words = shlex.split(line[len("*/30 * * * * "):])
    assert words[3:6] == ["segpipe", "run", str(WF.resolve())]


def test_schedule_needs_exactly_one_of_every_and_cron():
    assert runner.invoke(app, ["schedule", str(WF)]).exit_code == 2
    assert runner.invoke(app, ["schedule", str(WF), "--every", "1h", "--cron", "0 * * * *"]).exit_code == 2
    r = runner.invoke(app, ["schedule", str(WF), "--cron", "61 * * * *"])
    assert r.exit_code == 2 and "minute" in r.output


@pytest.mark.slow
def test_two_scheduled_runs_label_then_find_nothing_new(ray_local, tiny_card, shapes_data, tmp_path):
    out = tmp_path / "labels"
    r = runner.invoke(app, ["schedule", str(WF), "--every", "1s", "--max-runs", "2",
                            "--set", f"source.uri={shapes_data / 'images'}", "--set", f"output.uri={out}",
                            "--set", f"models.0.model={tiny_card}", "--set", "ensemble=null",
                            "--set", "models=[{model: " + str(tiny_card) + ", num_cpus: 0.5}]"])
    assert r.exit_code == 0, r.output
    assert r.output.count("schedule: run ") >= 4  # two starts, two ends
    assert "nothing new to label" in r.output
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 2
    led = runner.invoke(app, ["ledger", str(out)])
    assert "new 8" in led.output and "skipped 8" in led.output
