"""Joining a Ray cluster for `--executor ray`, and failing fast, naming the address, when there is none.

    ray = connect("head:6379")   # or None: RAY_ADDRESS, else a local cluster started for the run
    check_address("head:6379")   # the check alone (the stages call it before they write anything)

`ray.init` given an address where no Ray cluster answers retries for many minutes (20 attempts of
about 40 s, to an address it may have rewritten: 127.0.0.1 and localhost become this node's own
IP). So the address is checked first, each probe given RPT_RAY_CONNECT_TIMEOUT seconds (default
5): for host:port and "auto" (a GCS), a TCP connection to the address Ray will dial, then Ray's
own GCS client connecting there; for ray://host:port (a Ray client server), a TCP connection and
the Ray client's package (`ray[client]`, which the `ray` extra does not install). A failed check,
and an error of `ray.init` itself, is RayUnreachable naming the address as given (--ray-address
or RAY_ADDRESS) and, when Ray rewrote it, what Ray dialed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading

from rptdata.errors import BadOption, MissingDependency, RptError

log = logging.getLogger(__name__)

RAY_ADVICE = "pip install -e '.[ray]' (the pinned Ray of the `ray` extra)"
CONNECT_TIMEOUT_S = 5.0  # each probe of a cluster address (RPT_RAY_CONNECT_TIMEOUT overrides it)
GCS_ADVICE = (
    "Give the address of a running cluster's head: host:PORT (the GCS port, 6379 unless `ray start --head "
    "--port` chose another) or ray://host:10001 (its Ray client server, with ray[client] installed); "
    "or leave --ray-address and RAY_ADDRESS unset to start a local cluster for the run."
)


class RayUnreachable(RptError):
    """No Ray cluster answers at the address given (--ray-address or RAY_ADDRESS); the message names it."""


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise MissingDependency(f"--executor ray needs the ray package ({e}): {RAY_ADVICE}") from e
    return ray


def connect(address: str | None):
    """The ray module, connected: to an already initialized Ray (tests, a driver inside a Ray job),
    to `address`, to RAY_ADDRESS, or to a local cluster started now with this machine's CPUs and GPUs.
    An address that does not answer is RayUnreachable, at once (`check_address`), naming it."""
    ray = import_ray()
    if not ray.is_initialized():
        target = check_address(address)
        log.info("ray: %s", "starting a local cluster" if target is None else f"connecting to {target[1]}")
        try:
            ray.init(address=target[1] if target else "local", include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, TimeoutError, ValueError) as e:
            if target is None:
                raise RayUnreachable(f"could not start a local Ray cluster for the run: {_text(e)}") from e
            raise RayUnreachable(
                f"could not connect to the Ray cluster at {_named(*target)}: {_text(e)}. {GCS_ADVICE}"
            ) from e
    return ray


def cluster_address(address: str | None) -> tuple[str, str] | None:
    """(where it was given, the address) of the cluster to join, as `ray.init` picks it: `address`
    (--ray-address), else RAY_ADDRESS (which Ray also prefers to "auto"); None: a local cluster.

    >>> cluster_address("head:6379")
    ('--ray-address', 'head:6379')
    """
    env = os.environ.get("RAY_ADDRESS")
    if address and address != "auto":
        return "--ray-address", address
    if env:
        return "RAY_ADDRESS", env
    if address == "auto":
        return "--ray-address", "auto"
    return None


def check_address(address: str | None) -> tuple[str, str] | None:
    """`cluster_address(address)`, once it answers: RayUnreachable naming the address given when no
    Ray cluster can be reached there within RPT_RAY_CONNECT_TIMEOUT seconds (default 5) per probe.

    host:port (a GCS): the address Ray dials (it rewrites 127.0.0.1 and localhost to this node's
    own IP) must accept a TCP connection, and Ray's GCS client connect there (`_probe_gcs`);
    "auto": a cluster started on this machine must be found, then the same; ray://host:port (a
    Ray client server): a TCP connection, and the Ray client's package (else MissingDependency).
    Nothing is checked for a local cluster, or when Ray is already initialized in this process."""
    target = cluster_address(address)
    ray = import_ray()
    if target is None or ray.is_initialized():
        return target
    given, value = target
    timeout = _connect_timeout()
    scheme, sep, rest = value.partition("://")
    if sep:
        if scheme == "ray":
            host, port = _host_port(target, rest, default_port=10001)
            _probe_tcp(target, host, port, timeout)
            if importlib.util.find_spec("grpc") is None:  # what Ray's client checks for
                raise MissingDependency(
                    f"{_named(given, value)} is a Ray client address; the Ray client needs "
                    f"`pip install 'ray[client]=={ray.__version__}'` (the `ray` extra installs Ray core alone). "
                    "Or give the head's GCS address, host:6379."
                )
        elif scheme in ("http", "https"):  # the dashboard's, for `ray job submit`
            raise RayUnreachable(f"{_named(given, value)} is an HTTP address (the dashboard's). {GCS_ADVICE}")
        return target  # another scheme: Ray's own (`connect` names the address in its error)
    try:
        from ray._private.services import canonicalize_bootstrap_address

        dialed = canonicalize_bootstrap_address(value) or value
    except (ConnectionError, ValueError) as e:  # "auto" and no cluster here; or not host:port
        raise RayUnreachable(f"no Ray cluster at {_named(given, value)}: {_text(e)}. {GCS_ADVICE}") from None
    host, port = _host_port(target, dialed)
    _probe_tcp(target, host, port, timeout, dialed=dialed)
    _probe_gcs(target, dialed, timeout)
    return target


def _connect_timeout() -> float:
    value = os.environ.get("RPT_RAY_CONNECT_TIMEOUT", "")
    try:
        seconds = float(value) if value else CONNECT_TIMEOUT_S
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise BadOption(f"RPT_RAY_CONNECT_TIMEOUT must be a number of seconds above 0, not {value!r}")
    return seconds


def _text(error: BaseException) -> str:
    """An error's message on one line, without its final period (or the error's type)."""
    text = " ".join(str(error).split())
    return text.rstrip(".") if text else type(error).__name__


def _named(given: str, value: str, dialed: str | None = None) -> str:
    """'127.0.0.1:1 (--ray-address; Ray dials it as 10.0.0.5:1)'"""
    return f"{value} ({given}" + (f"; Ray dials it as {dialed}" if dialed and dialed != value else "") + ")"


def _host_port(target: tuple[str, str], address: str, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port:  # no port (or an IPv6 address without one)
        host, port = address, str(default_port) if default_port else ""
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise RayUnreachable(f"{_named(*target)} is not host:port. {GCS_ADVICE}") from None


def _probe_tcp(target: tuple[str, str], host: str, port: int, timeout: float, dialed: str | None = None) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        why = "nothing listens there (connection refused)"
    except socket.gaierror as e:
        why = f"the host name does not resolve ({e.strerror or e})"
    except TimeoutError:
        why = f"no answer within {timeout:g} s"
    except OSError as e:
        why = e.strerror or str(e)
    else:
        return
    raise RayUnreachable(f"no Ray cluster at {_named(*target, dialed)}: {why}. {GCS_ADVICE}")


def _probe_gcs(target: tuple[str, str], dialed: str, timeout: float) -> None:
    """Ray's own GCS client (`ray._raylet.GcsClient`, which fetches the cluster id) to `dialed`, given
    `timeout` seconds: RayUnreachable when it fails or has not connected by then (a listener that is
    not a Ray GCS, a head that is not up). It runs on a daemon thread (it releases the GIL), left to
    end by itself: its own timeouts are fixed when ray is imported, at 40 s and more."""
    try:
        from ray._raylet import GcsClient
    except ImportError as e:  # another Ray layout: ray.init alone decides
        log.debug("ray: no GCS probe (%s)", e)
        return
    outcome: dict = {}

    def attempt() -> None:
        try:
            GcsClient(address=dialed)
            outcome["ok"] = True
        except Exception as e:  # any failure to connect is the answer
            outcome["error"] = e

    thread = threading.Thread(target=attempt, name="rpt-ray-gcs-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if outcome.get("ok"):
        return
    error = outcome.get("error")
    why = (
        f"Ray's GCS client failed: {_text(error)}"
        if error is not None
        else f"something listens there, but no Ray GCS answered within {timeout:g} s"
    )
    raise RayUnreachable(f"no Ray cluster at {_named(*target, dialed)}: {why}. {GCS_ADVICE}")
