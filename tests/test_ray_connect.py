"""Joining a Ray cluster, with and without Ray 2.60's token authentication: real clusters (a head and a second node,
each `ray start --block`), the README's recipe run on them (`ripper-dist separate --address`, `ray job submit ...
jobs/separate.py`, `ripper-dist doctor --address`), and the one line a driver without the token gets.

Each node runs in a session of its own and is stopped by killing that session's processes: never `ray stop`, which
ends every Ray on the machine. Every Ray process here has its own HOME: a token in the real ~/.ray/auth_token would
switch authentication on for every `ray start` of this user."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from ray_nodes import AUTH_VARS, BIN, Node, node_env, free_ports, wait_for
from ripper_dist import ray_connect
from ripper_export.identity import make_identity_graph
from upstream import write_tone

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ripper_dist.cli"]
TOKEN = "5e1f" * 16


def _alive_nodes(gcs: str, token: str | None) -> int:
    """ALIVE nodes the GCS lists (-1 while it does not answer)."""
    import grpc
    from ray.core.generated import gcs_pb2, gcs_service_pb2, gcs_service_pb2_grpc
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(gcs) as ch:
        try:
            reply = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(ch).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), timeout=5, metadata=metadata)
        except grpc.RpcError:
            return -1
    return sum(n.state == gcs_pb2.GcsNodeInfo.ALIVE for n in reply.node_info_list)


def _jobs_api(dashboard: str, token: str | None) -> int:
    """HTTP status of the job API's list call (0 while nothing answers)."""
    req = urllib.request.Request(f"http://{dashboard}/api/jobs/",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A graph that costs nothing (ONNX, no torch on the workers) and two short tracks."""
    d = tmp_path_factory.mktemp("connect")
    graph = make_identity_graph(d / "id.onnx", chunk_samples=44100)
    write_tone(d / "in" / "a.wav", 1.5, seed=1)
    write_tone(d / "in" / "b.wav", 1.2, seed=2)
    return d, graph


@pytest.fixture(scope="module", params=["token", "open"])
def cluster(request):
    """A head (dashboard on) and a second node on free ports. `token`: the token in the nodes' ~/.ray/auth_token
    (mode 600) and RAY_AUTH_MODE=token on both, as cluster.yaml starts them; `open`: no token anywhere."""
    tmp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))  # short: Ray's socket paths live under it
    home = tmp / "home"
    token = TOKEN if request.param == "token" else None
    (home / ".ray").mkdir(parents=True)
    if token:
        (home / ".ray" / "auth_token").write_text(token)
        os.chmod(home / ".ray" / "auth_token", 0o600)
    env = node_env(home, **({"RAY_AUTH_MODE": "token"} if token else {}))
    gcs, dash, *ports = free_ports(15)
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 2**20), "--min-worker-port", "0",
              "--max-worker-port", "0"]

    def agents(p):
        return ["--dashboard-agent-listen-port", p[0], "--dashboard-agent-grpc-port", p[1],
                "--runtime-env-agent-port", p[2], "--metrics-export-port", p[3], "--node-manager-port", p[4],
                "--object-manager-port", p[5]]

    nodes = []
    try:
        nodes.append(Node("head", ["--head", "--port", gcs, "--include-dashboard", "true", "--dashboard-port", dash,
                                   "--ray-client-server-port", ports[12], "--temp-dir", tmp / "ray",
                                   *agents(ports[:6]), *common], env, tmp))
        wait_for("head GCS", lambda: _alive_nodes(f"127.0.0.1:{gcs}", token) >= 1, nodes)
        nodes.append(Node("node2", ["--address", f"127.0.0.1:{gcs}", "--temp-dir", tmp / "ray",
                                    *agents(ports[6:12]), *common], env, tmp))
        wait_for("second node", lambda: _alive_nodes(f"127.0.0.1:{gcs}", token) == 2, nodes)
        wait_for("job API", lambda: _jobs_api(f"127.0.0.1:{dash}", token) == 200, nodes)
        yield dict(kind=request.param, token=token, home=home, env=env, address=f"127.0.0.1:{gcs}",
                   dashboard=f"127.0.0.1:{dash}", tmp=tmp, nodes=nodes)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _stringify(args) -> list[str]:
    return [str(a) for a in args]


def _done_rows(out: Path, n: int) -> pd.DataFrame:
    rows = pd.read_parquet(out / "metadata.parquet")
    assert len(rows) == n and (rows.status == "done").all(), rows[["input_path", "status", "error"]]
    for paths in rows.stem_paths:
        stems = dict(paths)
        assert sorted(stems) == ["bass", "drums", "other", "vocals"]
        assert all((out / p).stat().st_size > 1000 for p in stems.values())
    return rows


def test_cli_and_job_submit_run_on_the_cluster(cluster, work):
    """The README recipe on both kinds of cluster: the CLI driver joins with --address, `ray job submit` runs
    jobs/separate.py; the token cluster needs RAY_AUTH_MODE=token and the token for both (as documented)."""
    d, graph = work
    env = cluster["env"]  # RAY_AUTH_MODE=token and the token in HOME on the token cluster; nothing on the open one
    out = cluster["tmp"] / "cli"
    r = subprocess.run(CLI + _stringify(["separate", "--no-progress", "--address", cluster["address"], "-n", graph,
                                         "-o", out, d / "in"]),
                       env=env, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr + "\n".join(n.tail() for n in cluster["nodes"])
    assert (_done_rows(out, 2).engine == "ray").all()

    out = cluster["tmp"] / "job"
    r = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://{cluster['dashboard']}",
                        "--working-dir", str(ROOT), "--", "python", "jobs/separate.py", str(d / "in"), "-o", str(out),
                        "-n", str(graph), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    _done_rows(out, 2)


def test_a_driver_without_the_token_gets_one_line(cluster, work, monkeypatch):
    """On the token cluster: a driver with the token file but no RAY_AUTH_MODE exits 2 in seconds with one line
    (Ray itself retries for 20 s and says only `Failed to connect`); no token, a wrong token, a token path that
    is not there: each says so. On the open cluster nothing is needed, and the probe says it is open."""
    d, graph = work
    address = cluster["address"]
    for k in AUTH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(cluster["home"]))
    if cluster["kind"] == "open":
        auth = ray_connect.probe(address)
        assert auth.required is False and not auth.problem() and auth.describe().startswith("none: anyone")
        return

    assert _jobs_api(cluster["dashboard"], None) == 401  # the job API is closed without the token
    assert _jobs_api(cluster["dashboard"], "wrong") == 403
    env = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    t0 = time.monotonic()
    r = subprocess.run(CLI + _stringify(["separate", "--no-progress", "--address", address, "-n", graph,
                                         "-o", cluster["tmp"] / "refused", d / "in"]),
                       env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and time.monotonic() - t0 < 15, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"ripper-dist: error: the Ray cluster at {address} requires token authentication; set RAY_AUTH_MODE=token "
        "so that Ray sends this process's token (from ~/.ray/auth_token): Ray sends it to an explicit address only "
        "then"], r.stderr

    auth = ray_connect.probe(address)  # token file, no RAY_AUTH_MODE: the same verdict in process
    assert auth.required and auth.source == "~/.ray/auth_token" and not auth.sends
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    auth = ray_connect.probe(address)
    assert auth.accepted and not auth.problem() and "is accepted" in auth.describe()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 64)  # wins over the file, as in Ray
    assert "rejected this process's token (from RAY_AUTH_TOKEN)" in ray_connect.probe(address).problem()
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster["tmp"] / "missing"))
    assert "RAY_AUTH_TOKEN_PATH is set but file cannot be opened" in ray_connect.probe(address).problem()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("HOME", str(cluster["tmp"]))  # no token anywhere
    problem = ray_connect.probe(address).problem()
    assert "requires token authentication; this process has no token: put the head's token" in problem
    assert problem.endswith("or RAY_AUTH_TOKEN")  # RAY_AUTH_MODE=token is already set
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert ray_connect.probe(address).problem().endswith("or RAY_AUTH_TOKEN, and set RAY_AUTH_MODE=token")


def test_doctor_reports_the_clusters_authentication(cluster):
    env = cluster["env"]
    r = subprocess.run(CLI + ["doctor", "--address", cluster["address"]], env=env, capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    lines = {x.split(": ", 1)[0]: x for x in r.stdout.splitlines() if x.startswith("Ray")}
    assert r.returncode == 0, r.stdout + r.stderr
    assert lines["Ray"].startswith(f"Ray: cluster at {cluster['address']}: 0 GPUs; workers at nice")
    if cluster["kind"] == "open":
        assert lines["Ray auth"].startswith(f"Ray auth: none: anyone who can reach {cluster['address']}")
        return
    assert lines["Ray auth"] == "Ray auth: token required; this process's token (from ~/.ray/auth_token) is accepted"
    r = subprocess.run(CLI + ["doctor", "--address", cluster["address"]],
                       env={k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}, capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    lines = {x.split(": ", 1)[0]: x for x in r.stdout.splitlines() if x.startswith("Ray")}
    assert r.returncode == 1 and "not joined" in lines["Ray"], r.stdout
    assert lines["Ray auth"].startswith("Ray auth: token required; set RAY_AUTH_MODE=token"), r.stdout


def test_no_cluster_there_is_one_line_at_once(work, tmp_path):
    """Nothing listens at the address: one line in seconds, before the model is loaded (Ray would retry for
    minutes)."""
    d, graph = work
    (port,) = free_ports(1)
    t0 = time.monotonic()
    r = subprocess.run(CLI + _stringify(["separate", "--no-progress", "--address", f"127.0.0.1:{port}", "-n", graph,
                                         "-o", tmp_path / "out", d / "in"]),
                       env=node_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and time.monotonic() - t0 < 30, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"ripper-dist: error: no Ray cluster answers at 127.0.0.1:{port} ("), line


def test_embedded_ray_writes_no_token_file_and_restores_the_environment(work, tmp_path):
    """Ray's local ray.init() turns token auth on and would write a new ~/.ray/auth_token (switching auth on for
    every later `ray start --head` of the user): the embedded Ray gets a token of its own in its environment."""
    d, graph = work
    script = f"""
import os, sys
from ripper_dist.cli import main
rc = main(["separate", "--no-progress", "--engine", "ray", "--num-cpus", "1", "-n", {str(graph)!r},
           "-o", {str(tmp_path / 'out')!r}, {str(d / 'in' / 'a.wav')!r}])
print(rc, os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN"))
"""
    r = subprocess.run([sys.executable, "-c", script], env=node_env(tmp_path), capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    assert r.stdout.split() == ["0", "None", "None"], r.stdout + r.stderr
    assert not (tmp_path / ".ray").exists()
    _done_rows(tmp_path / "out", 1)
