"""Shared test setup: every test starts its own Ray, never one another process left on this machine, and no Ray
setting of the user's applies.

HOME is a folder of the test session's: Ray 2.60 turns token authentication on for every `ray start` and
`ray.cluster_utils.Cluster` head as soon as `~/.ray/auth_token` exists, so a token the user (or any earlier local
`ray.init`) left there would change what the tests see; and nothing a test does may write one into the user's home.
The caller's RAY_AUTH_* variables go for the same reason. Tests of authentication set their own.

The test process ends with the session's exit status once pytest has reported, without the interpreter's teardown.
This one process has loaded Ray (whose gRPC/GCS client threads outlive `ray.shutdown`), OpenVINO (TBB workers),
ONNX Runtime, torch and PyAV side by side, about 50 native threads at the end; CI once saw it die with SIGSEGV
(exit 139) while finalising, after "512 passed". What it holds beyond any run of the program is every earlier
test's leftovers; the program itself is run as users run it (exports included) in processes of its own by
`tests/test_newcomer_cli.py`, which checks their exit codes, so a crash at a real program's exit still fails a test.
"""
import os
import sys
import tempfile

import pytest

_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@pytest.fixture(autouse=True, scope="session")
def _own_home():
    saved = {k: os.environ.get(k) for k in ("HOME", *_AUTH_VARS)}
    with tempfile.TemporaryDirectory(prefix="ripper-home-") as home:
        os.environ["HOME"] = home
        for k in _AUTH_VARS:
            os.environ.pop(k, None)
        try:
            yield home
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(autouse=True)
def _no_inherited_ray_address(monkeypatch):
    # A RAY_ADDRESS from the caller's shell would make the embedded engine join a foreign cluster.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    session.config._ripper_session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    session = getattr(config, "_ripper_session", None)
    if session is None:  # no session ran (--help, --version)
        return
    status = int(session.exitstatus)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():  # a Ray a test left running: its processes must not outlive us
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
