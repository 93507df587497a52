"""A real Prometheus (Debian package) on loopback scraping a real 2-process training run through the
file-based discovery the run writes: every dashboard panel, recording rule and alert expression returns
data; promtool validates the config and rules and runs the alert unit tests. The run is then resumed from an
older checkpoint: the goodput series count the restart and the re-done steps, as metrics.jsonl and the report do."""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from ddpm_dist.artifacts import committed_checkpoints
from ddpm_dist.goodput import goodput
from tests.support.common import ROOT, free_port, wait_for
from tests.support.report_pages import sections
from tests.support.train_helpers import child_env, train_cmd

pytestmark = pytest.mark.system
OPS = os.path.join(ROOT, "ops")


def promtool(*args):
    r = subprocess.run(
        ["promtool", *args], cwd=os.path.join(OPS, "prometheus"), capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_promtool_config_rules_and_alert_unit_tests():
    promtool("check", "config", "prometheus.yml")
    promtool("check", "rules", "rules.yml")
    assert "SUCCESS" in promtool("test", "rules", "rules_test.yml")


def with_bool(expr: str) -> str:
    """`a > b` -> `a > bool b` at the top level, so an alert's expression returns its value whether or not it fires."""
    depth, i = 0, 0
    while i < len(expr):
        c = expr[i]
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        elif depth == 0:
            m = re.match(r"(==|!=|>=|<=|>|<)", expr[i:])
            if m and not expr[i:].startswith("=~"):
                j = i + len(m.group(1))
                return expr[:j] + " bool" + expr[j:]
        i += 1
    raise ValueError(f"no comparison in {expr}")


def query(port, expr):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_expressions():
    dash = json.load(open(os.path.join(OPS, "grafana", "ddpm_dist.json")))
    out = []
    for panel in dash["panels"]:
        for t in panel["targets"]:
            out.append((panel["title"], t["expr"].replace("$job", ".*").replace("$run", ".*")))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.match(r"label_values\((.*),\s*\w+\)", var["definition"])
            out.append((f"variable {var['name']}", m.group(1).replace("$job", ".*")))
    return out


@pytest.fixture
def prometheus(tmp_path):
    sd = tmp_path / "sd"
    sd.mkdir()
    cfg = yaml.safe_load(open(os.path.join(OPS, "prometheus", "prometheus.yml")))
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [os.path.join(OPS, "prometheus", "rules.yml")]
    cfg["scrape_configs"] = [c for c in cfg["scrape_configs"] if c["job_name"] == "ddpm_slurm"]
    cfg["scrape_configs"][0]["file_sd_configs"][0].update(files=[str(sd / "*.json")], refresh_interval="1s")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),
    )
    try:
        end = time.time() + 30
        while time.time() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise TimeoutError("prometheus not ready")
        yield port, sd
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_panel_and_alert_returns_data_from_a_real_run(tmp_path, prometheus):
    port, sd = prometheus
    exporter = free_port()
    while True:  # two consecutive free ports: one per local rank
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", exporter + 1))
            break
        except OSError:
            exporter = free_port()
    run = tmp_path / "run"
    cmd = train_cmd(
        run,
        100000,
        "parallel.backend=ddp",
        "metrics.prometheus=true",
        "metrics.prometheus_addr=127.0.0.1",
        f"metrics.prometheus_port={exporter}",
        f"metrics.sd_dir={sd}",
        "metrics.job=4242",
        "checkpoint.every_images=320",
        "train.sample_every_images=640",
        "eval.every_images=640",
        "eval.num_images=32",
        "train.max_wall_seconds=240",
        nproc=2,
        launcher="launcher",
    )
    env = child_env(DDPM_CACHE=str(tmp_path / "cache"))

    def start(log):
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    p = start("train.log")
    try:
        exprs = dashboard_expressions()
        rules = yaml.safe_load(open(os.path.join(OPS, "prometheus", "rules.yml")))
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    exprs.append((rule["record"], rule["expr"]))
                    exprs.append((f"{rule['record']} (recorded)", rule["record"]))
                else:
                    exprs.append((rule["alert"], with_bool(rule["expr"])))
        missing = exprs
        end = time.time() + 200
        while time.time() < end and missing:
            assert p.poll() is None, open(tmp_path / "train.log").read()[-3000:]
            missing = [(name, e) for name, e in missing if not query(port, e)]
            time.sleep(2)
        assert not missing, missing
        assert len(list(sd.glob("*.json"))) == 2
        ranks = {r["metric"]["rank"] for r in query(port, "ddpm_world_size")}
        assert ranks == {"0", "1"}
        assert {r["metric"]["job"] for r in query(port, "ddpm_world_size")} == {"4242"}
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=120)
    assert p.returncode == 75  # SIGTERM: saved and asked for a requeue
    assert not list(sd.glob("*.json"))  # targets removed at exit
    resume_from_an_older_checkpoint(tmp_path, port, sd, start)


def resume_from_an_older_checkpoint(tmp_path, port, sd, start):
    """The checkpoint saved on SIGTERM removed (as if the process had been killed before it committed): the relaunch
    resumes from the one before and re-does the steps in between; Prometheus sees 1 restart, those re-done steps and
    a goodput ratio in (0, 1], and metrics.jsonl and the report give the same account."""
    run = tmp_path / "run"
    stopped = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert stopped["event"] == "end", stopped
    newest, *older = committed_checkpoints(str(run / "checkpoints"))[::-1]
    assert older and json.load(open(os.path.join(newest, "meta.json")))["step"] == stopped["step"]
    subprocess.run(["rm", "-r", newest], check=True)
    resumed_at = json.load(open(os.path.join(older[0], "meta.json")))["step"]
    redone = stopped["step"] - resumed_at
    assert redone > 0
    p = start("resumed.log")
    try:

        def resumed_train_row():
            assert p.poll() is None, open(tmp_path / "resumed.log").read()[-3000:]
            events = re.findall(r'^\{"event": "(\w+)"', (run / "metrics.jsonl").read_text(), re.M)
            return events.count("start") == 2 and events[-1] == "train"

        wait_for(resumed_train_row, 120, "a training row of the resumed process")

        def seen():
            got = {
                name: [float(r["value"][1]) for r in query(port, f'{name}{{rank="0"}}')]
                for name in ("ddpm_restarts_total", "ddpm_goodput_redone_steps_total", "ddpm_goodput_ratio")
            }
            return got["ddpm_restarts_total"] == [1.0] and got

        wait_for(seen, 30, "the resumed process's goodput in Prometheus")
        got = seen()
        assert got["ddpm_goodput_redone_steps_total"] == [float(redone)]
        assert 0 < got["ddpm_goodput_ratio"][0] <= 1
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=120)
    assert p.returncode == 75
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    g = goodput(rows)
    assert (g.restarts, g.redone_steps) == (1, redone) and 0 < g.ratio <= 1
    assert g.restart_lost_s > 0 and g.step_s > g.redone_s > 0 and g.data_wait_s > 0 and g.checkpoint_stall_s > 0
    from ddpm_dist.reporting.collect import collect
    from ddpm_dist.reporting.html import render

    text = " ".join(sections(render(collect(str(run)))).text["goodput"].split())
    assert f"goodput ratio {100 * g.ratio:.1f}%" in text and f"re-done steps {redone:,} (" in text
    assert "restarts 1; time lost to them" in text
