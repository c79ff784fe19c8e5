"""Connecting this process to a Ray cluster (or starting the embedded one), and saying in one line why it cannot.

Ray 2.60 token authentication, as its code does it:
- `ray start --head` turns it on when a token exists (RAY_AUTH_MODE unset); every other node, driver and job
  submitter then needs RAY_AUTH_MODE=token and the same token. Ray finds a process's token in RAY_AUTH_TOKEN, else in
  the file RAY_AUTH_TOKEN_PATH names, else in ~/.ray/auth_token.
- `ray.init(address=...)` sends the token only when RAY_AUTH_MODE=token, or for `auto`/no address when a token
  exists (it never offers one to an explicit address by itself); without it a cluster that wants one makes
  `ray.init` retry for 20 s and fail with `Failed to connect to Ray cluster at IP:PORT`, the reason only in Ray's
  native log lines. A cluster that is not there makes it retry for minutes.

So before `ray.init` the GCS is asked for its cluster id, first without a token and then, when Ray would send one,
with it: the answers (UNAUTHENTICATED, OK, connection refused) say in a second what the cluster needs and whether
this process has it. This follows Ray's rule on sending the token rather than sending it to any address given.

A `ray.init()` that starts a local Ray turns token authentication on and, when the user has no token, writes a new
one to ~/.ray/auth_token, which switches authentication on for every later `ray start --head` of that user. The
embedded Ray here gets a token of its own in its environment instead (no file; its processes inherit it), and the
environment is restored when it stops.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN = "~/.ray/auth_token"
TOKEN_PLACES = f"{DEFAULT_TOKEN} (mode 600), a file named by {TOKEN_PATH_ENV}, or {TOKEN_ENV}"
HEAD_TOKEN = "the head's token (`ray get-auth-token` on the head)"
PROBE_TIMEOUT_S = 10.0


class RayConnectError(RuntimeError):
    """This process cannot join the cluster; the message is one line saying why and what to do."""


def auth_mode() -> str:
    """This process's RAY_AUTH_MODE ('token', 'disabled', or '' when unset)."""
    return os.environ.get(MODE_ENV, "").strip().lower()


def token_source() -> tuple[str, str]:
    """(where Ray finds this process's token, '' when nowhere; the error Ray raises loading it, '' when none).
    The order is Ray's: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the environment may have changed since Ray last looked
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return "", ""
    except AuthenticationError as e:  # e.g. RAY_AUTH_TOKEN_PATH names a missing or empty file
        return "", str(getattr(e, "message", e)).split(". ")[0].strip() + "."
    if os.environ.get(TOKEN_ENV, "").strip():
        return TOKEN_ENV, ""
    if os.environ.get(TOKEN_PATH_ENV):
        return f"{TOKEN_PATH_ENV}={os.environ[TOKEN_PATH_ENV]}", ""
    return DEFAULT_TOKEN, ""


def _token_metadata() -> tuple:
    from ray._raylet import AuthenticationTokenLoader
    return tuple(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True).items())


@dataclass(frozen=True)
class ClusterAuth:
    """What the cluster at `address` asks for and what this process would give it."""

    address: str              # as given (the GCS's host:port for `auto`)
    required: bool | None     # the GCS refused a call without a token (None: it gave another answer)
    mode: str                 # this process's RAY_AUTH_MODE
    source: str               # where this process's token is ('' none)
    sends: bool               # ray.init would send the token
    accepted: bool | None     # the GCS took it (None: not tried)
    token_error: str = ""     # Ray cannot load the token it was pointed at

    def _missing(self) -> str:
        """What this process lacks for a cluster that wants a token ('' nothing)."""
        if not self.source:
            return (f"this process has no token: put {HEAD_TOKEN} in {TOKEN_PLACES}"
                    + ("" if self.mode == "token" else f", and set {MODE_ENV}=token"))
        if self.mode == "disabled":
            return f"{MODE_ENV}=disabled here: set {MODE_ENV}=token (the token is taken from {self.source})"
        if not self.sends:
            return (f"set {MODE_ENV}=token so that Ray sends this process's token (from {self.source}): Ray sends "
                    "it to an explicit address only then")
        if self.accepted is False:
            return f"it rejected this process's token (from {self.source}): put {HEAD_TOKEN} in {TOKEN_PLACES}"
        return ""

    def problem(self) -> str:
        """The one line saying why ray.init would fail on authentication ('' when it would not)."""
        if self.token_error and (self.required or self.mode == "token"):
            return f"{self.token_error} Put {HEAD_TOKEN} in {TOKEN_PLACES} (for the Ray cluster at {self.address})"
        if self.required and self._missing():
            return f"the Ray cluster at {self.address} requires token authentication; {self._missing()}"
        if self.mode == "token" and not self.source:
            return (f"{MODE_ENV}=token but this process has no token: put {HEAD_TOKEN} in {TOKEN_PLACES} "
                    f"(Ray would not connect to {self.address} without one)")
        return ""

    def describe(self) -> str:
        """One line for `ripper-dist doctor`."""
        if self.required is None:
            return f"unknown (the GCS at {self.address} did not say)"
        if not self.required:
            return (f"none: anyone who can reach {self.address} can run code on this cluster (a token on the head "
                    f"turns it on: README, 'Running at scale')")
        if self.problem() and not self._missing():
            return f"token required; {self.problem()}"
        return "token required; " + (self._missing() or f"this process's token (from {self.source}) is accepted")


def _channel(address: str):
    """A plain gRPC channel (TLS when RAY_USE_TLS, as Ray's own) without Ray's token interceptor: the probe
    decides itself what it sends."""
    import grpc
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        from ray._common.tls_utils import load_certs_from_env
        chain, key, ca = load_certs_from_env()
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(
            certificate_chain=chain, private_key=key, root_certificates=ca))
    return grpc.insecure_channel(address)


def _why(details: str) -> str:
    """gRPC's 'failed to connect to all addresses; last error: UNKNOWN: ipv4:h:p: Failed to connect to remote
    host: Connection refused' -> 'Connection refused'."""
    return (details or "").rsplit(": ", 1)[-1].strip() or "no answer"


def gcs_address(address: str | None) -> str:
    """The host:port of the GCS `address` names (`auto` finds the cluster on this machine), as ray.init does."""
    from ray._private.services import canonicalize_bootstrap_address
    try:
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError as e:
        raise RayConnectError(str(e).strip().splitlines()[0]) from None
    if resolved is None:
        raise RayConnectError(f"--address {address}: not the address of a Ray cluster")
    return resolved


def probe(address: str | None, timeout: float = PROBE_TIMEOUT_S) -> ClusterAuth:
    """Ask the GCS at `address` whether it needs a token and whether it takes this process's. Raises
    RayConnectError when nothing answers there as a Ray GCS."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    gcs = gcs_address(address)
    shown = address if address not in (None, "auto") else gcs  # what the user typed, in messages
    mode = auth_mode()
    source, token_error = token_source()
    # Ray's rule (worker.init): an explicit address gets the token only with RAY_AUTH_MODE=token; `auto` also when
    # a token exists and the mode is unset.
    sends = bool(source) and (mode == "token" or (not mode and address in (None, "auto")))
    with _channel(gcs) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)

        def answer(metadata) -> grpc.StatusCode:
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
                return grpc.StatusCode.OK
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    raise RayConnectError(f"no Ray cluster answers at {shown} ({_why(e.details())}): start one with "
                                          "`ray start --head`, or give its GCS address (HEAD_IP:6379)") from None
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise RayConnectError(f"no Ray cluster answers at {shown} (nothing in {timeout:g} s): check the "
                                          "address (HEAD_IP:6379) and that the port is open") from None
                return e.code()

        first = answer(None)
        required = {grpc.StatusCode.OK: False, grpc.StatusCode.UNAUTHENTICATED: True}.get(first)
        accepted = None
        if required and sends:
            accepted = answer(_token_metadata()) == grpc.StatusCode.OK
    return ClusterAuth(address=shown, required=required, mode=mode, source=source, sends=sends, accepted=accepted,
                       token_error=token_error)


def check(address: str) -> ClusterAuth | None:
    """Raise RayConnectError (one line) unless a cluster answers at `address` and takes what this process would
    send; None for a `ray://` (Ray Client) address, which is left to Ray, or when this process has joined one."""
    import ray
    if "://" in address or ray.is_initialized():
        return None
    auth = probe(address)
    if auth.problem():
        raise RayConnectError(auth.problem())
    return auth


def connect(address: str, log_hint: str = "", **init_kwargs) -> ClusterAuth | None:
    """Join the cluster at `address` (host:port, `auto`, `ray://`) with `ray.init`, after `check`; its
    ConnectionError becomes one line too, with `log_hint` saying where Ray's own log lines are."""
    import ray
    auth = check(address)
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as e:
        hint = f" ({log_hint})" if log_hint else ""
        raise RayConnectError(f"{str(e).strip().splitlines()[0]}{hint}") from None
    return auth


_saved_env: dict | None = None  # what start_local changed, restored by disconnect


def _reset_ray_auth() -> None:
    """Make Ray read RAY_AUTH_MODE and the token from the environment again (as Ray's own _enable_token_auth)."""
    from ray._raylet import AuthenticationTokenLoader, Config
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _reset_ray_auth()


def start_local(**init_kwargs) -> None:
    """Start the embedded Ray (`ray.init(address="local")`). Ray turns token authentication on for it (unless
    RAY_AUTH_MODE=disabled); when this user has no token it gets one for this process only, so Ray writes none to
    ~/.ray/auth_token."""
    global _saved_env
    import ray
    saved = {MODE_ENV: os.environ.get(MODE_ENV), TOKEN_ENV: os.environ.get(TOKEN_ENV)}
    if auth_mode() in ("", "token"):
        source, error = token_source()
        if not source and not error:
            os.environ[TOKEN_ENV] = secrets.token_hex(32)
            _reset_ray_auth()
    try:
        ray.init(address="local", **init_kwargs)
    except BaseException:
        _restore(saved)
        raise
    _saved_env = saved


def disconnect() -> None:
    """ray.shutdown(), and the environment as it was before start_local."""
    global _saved_env
    import ray
    try:
        ray.shutdown()
    finally:
        if _saved_env is not None:
            saved, _saved_env = _saved_env, None
            _restore(saved)
