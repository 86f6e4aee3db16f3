"""Deployment, exercised for real without a Docker engine (see README, "Deploy"): the compose file with the
Compose v2 binary, the Dockerfile with hadolint, Prometheus' own checks, a real Prometheus scraping a
live server under load (every dashboard query must return data), and the scale-out nginx config in
front of three local replicas. These need Debian's `prometheus` and `nginx`: `make test-deploy`
installs them (CI runs it); without them the tests skip and say why."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from server_utils import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.deploy


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(BIN))
    if path is None:
        pytest.skip(f"{name} is not installed (run `make test-deploy`, which installs it)")
    return path


def _run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 120), check=False, **kw)


def _start_server(port: int, log: Path, **env) -> subprocess.Popen:
    full = {**os.environ, "TOYLLM_PRESET": "tiny", "TOYLLM_WARMUP": "false", "TOYLLM_MAX_CONCURRENT_REQUESTS": "4",
            "TOYLLM_SESSION_DIR": str(log.parent / f"sessions-{port}"), **{k: str(v) for k, v in env.items()}}
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port)], env=full,
                                stdout=out, stderr=subprocess.STDOUT)


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready: {log.read_text()[-2000:]}")


# ------------------------------------------------------------------------------------ static checks
@pytest.mark.parametrize("profile", [None, "scale"])
def test_compose_file_is_valid_and_its_bind_mounts_exist(profile):
    compose = _tool("docker-compose")
    args = [compose, "-f", str(ROOT / "docker-compose.yml")] + (["--profile", profile] if profile else [])
    assert _run(*args, "config", "-q", cwd=ROOT).returncode == 0
    done = _run(*args, "config", "--format", "json", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    services = config["services"]
    assert {"toyllm", "prometheus", "grafana"} <= set(services)
    if profile == "scale":
        assert {"toyllm-a", "toyllm-b", "toyllm-c", "nginx"} <= set(services)
    mounts = [v for s in services.values() for v in s.get("volumes", []) if v.get("type") == "bind"]
    assert mounts
    for mount in mounts:
        assert Path(mount["source"]).exists(), mount["source"]
    assert services["toyllm"]["healthcheck"]["test"]


def test_dockerfile_lints_clean():
    done = _run(_tool("hadolint"), str(ROOT / "Dockerfile"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_config_is_valid():
    done = _run(_tool("promtool"), "check", "config", str(ROOT / "deploy/prometheus/prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def _dashboard() -> dict:
    return json.loads((ROOT / "deploy/grafana/dashboards/toyllm.json").read_text())


def _queries() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_grafana_datasource_uid_matches_the_dashboard():
    provisioned = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    used = {p["datasource"]["uid"] for p in _dashboard()["panels"] if "datasource" in p}
    used |= {t["datasource"]["uid"] for p in _dashboard()["panels"] for t in p.get("targets", [])}
    assert used and used <= uids
    rows = [p["title"] for p in _dashboard()["panels"] if p["type"] == "row"]
    assert rows == ["Traffic", "Latency", "Throughput", "KV cache", "Cache tiers", "Sessions", "Engine"]


# ------------------------------------------------------------------ live server + real Prometheus
@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("live") / "server.log"
    proc = _start_server(port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url + "/ready", proc, log)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_promtool_accepts_the_live_metrics(live_server):
    httpx.post(live_server + "/generate", json={"prompt": "warm", "max_new_tokens": 3, "stream": False}, timeout=120)
    text = httpx.get(live_server + "/metrics").text
    done = _run(_tool("promtool"), "check", "metrics", input=text)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_the_server_and_every_dashboard_query_has_data(live_server, tmp_path):
    promtool = _tool("promtool")
    prometheus = _tool("prometheus")
    shipped = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    shipped["global"]["scrape_interval"] = "1s"
    job = next(j for j in shipped["scrape_configs"] if j["job_name"] == "toyllm")
    job["static_configs"][0]["targets"] = [live_server.removeprefix("http://")]
    shipped["scrape_configs"] = [job]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(shipped))
    assert _run(promtool, "check", "config", str(config)).returncode == 0
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("w") as out:
        prom = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    load = None
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        _wait(f"http://127.0.0.1:{port}/-/ready", prom, log, timeout=60)
        # Traffic while Prometheus scrapes: multi-turn sessions, some compressing, and some evictions.
        load = subprocess.Popen([sys.executable, "-m", "server.cli", "loadtest", "--url", live_server,
                                 "--concurrency", "3", "--requests", "24", "--turns", "3", "--prompt-tokens", "40",
                                 "--max-new-tokens", "40", "--budget", "32", "--temperature", "0.8"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        queries = _queries()
        deadline = time.time() + 240
        missing = queries
        while missing and time.time() < deadline:
            time.sleep(2)
            missing = []
            for expr in queries:
                result = httpx.get(api + "/query", params={"query": expr}).json()
                assert result["status"] == "success", (expr, result)
                if not result["data"]["result"]:
                    missing.append(expr)
        assert not missing, f"dashboard queries without data: {missing}"
        up = httpx.get(api + "/query", params={"query": 'up{job="toyllm"}'}).json()["data"]["result"]
        assert up and up[0]["value"][1] == "1"
    finally:
        if load is not None:
            load.wait(300)
        prom.terminate()
        prom.wait(30)


# ----------------------------------------------------------------------------------- scale-out
def test_nginx_routes_sessions_to_their_replica(tmp_path):
    nginx = _tool("nginx")
    ports = [free_port() for _ in range(3)]
    procs = [_start_server(p, tmp_path / f"replica-{p}.log", TOYLLM_TRUSTED_PROXY="true") for p in ports]
    nginx_proc = None
    try:
        for p, proc in zip(ports, procs, strict=True):
            _wait(f"http://127.0.0.1:{p}/ready", proc, tmp_path / f"replica-{p}.log")
        conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
        upstreams = re.findall(r"server (toyllm-[abc]):8000;", conf)
        assert upstreams == ["toyllm-a", "toyllm-b", "toyllm-c"]
        for name, port in zip(upstreams, ports, strict=True):
            conf = conf.replace(f"server {name}:8000;", f"server 127.0.0.1:{port};")
        front = free_port()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{front};")
        conf = f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n" + conf
        conf = conf.replace("http {", f"http {{\n    access_log {tmp_path}/access.log;\n"
                                      f"    client_body_temp_path {tmp_path}/body;\n    proxy_temp_path {tmp_path}/proxy;", 1)
        (tmp_path / "nginx.conf").write_text(conf)
        assert _run(nginx, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)).returncode == 0
        nginx_proc = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path),
                                       "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{front}"
        _wait(url + "/health", nginx_proc, tmp_path / "error.log", timeout=30)
        upstream_of = {}
        with httpx.Client(base_url=url, timeout=120) as c:
            for i in range(20):
                first = c.post("/generate", json={"prompt": f"session {i} starts", "max_new_tokens": 3,
                                                  "stream": False})
                assert first.status_code == 200, first.text
                sid = first.headers["x-session-id"]
                upstream_of[sid] = first.headers["x-upstream"]
                for turn in range(2):
                    r = c.post("/generate", json={"prompt": f" turn {turn}", "max_new_tokens": 3, "stream": False},
                               headers={"X-Session-ID": sid})
                    assert r.status_code == 200, (sid, r.status_code, r.text)  # never 404: the same replica
                    assert r.headers["x-upstream"] == upstream_of[sid]
                assert c.get(f"/sessions/{sid}").json()["turns"] == 3
            created = c.post("/sessions")
            assert created.status_code == 201
            assert c.get(f"/sessions/{created.json()['session_id']}").status_code == 200
        assert len(set(upstream_of.values())) > 1, "new sessions all landed on one replica"
    finally:
        if nginx_proc is not None:
            nginx_proc.terminate()
            nginx_proc.wait(10)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
