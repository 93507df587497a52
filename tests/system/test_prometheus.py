"""A real Prometheus (Debian package) on loopback scraping a real 2-process training run through the
file-based discovery the run writes: every dashboard panel, recording rule and alert expression returns
data; promtool validates the config and rules and runs the alert unit tests."""

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

from tests.support.common import ROOT, free_port
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
    p = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "train.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
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
