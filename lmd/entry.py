"""What every command-line entry point shares: one-line failures, exit codes, connecting to Ray.

`lmd`, `tune/ablation.py`, `tune/search.py` and `analysis/dashboard.py` end every expected failure
with one `<prog>: error: ...` line and a documented exit code, never a traceback; and they start
or join Ray with the same options, failing in seconds (not minutes of retries) on a wrong address.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import NoReturn

EXIT_RUNTIME = 1  # the run itself failed (diverged, corrupt checkpoint, unusable folder, unreachable cluster)
EXIT_USAGE = 2  # bad flags or config values
# A run stopped by SIGTERM/SIGINT after checkpointing (preemption): resumable, not finished, not failed.
EXIT_PREEMPTED = 3


def fail(message: str, code: int = EXIT_RUNTIME, prog: str = "lmd") -> NoReturn:
    """Print `<prog>: error: <first line of message>` to stderr and exit with `code`."""
    first = str(message).splitlines()[0] if str(message) else "failed"
    print(f"{prog}: error: {first}", file=sys.stderr)
    sys.exit(code)


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answers at the given address; the message names it."""


class NotEnoughResources(ValueError):
    """A local Ray cannot hold what one trial or worker group asks for (it would wait forever)."""


def local_ray(address: str | None) -> bool:
    """Whether `init_ray(address)` starts a Ray on this machine (no address, no RAY_ADDRESS) rather than joining one."""
    return not address and not os.environ.get("RAY_ADDRESS")


def check_cluster_resources(need: dict[str, tuple[str, float]], address: str | None, what: str) -> str | None:
    """After `init_ray`: is `need` (resource -> (the flag that asked, amount)) within the cluster's total?

    A local Ray never grows, so a shortfall raises NotEnoughResources naming the flag; a cluster may
    (an autoscaler adds nodes on demand, as cluster/gpu.yaml's GPU workers start from zero), so a
    shortfall there is returned as a warning to print, not refused.
    """
    import ray

    total = ray.cluster_resources()
    short = [f"{flag} (the {'cluster' if not local_ray(address) else 'local Ray'} has {total.get(name, 0):g} {name})"
             for name, (flag, amount) in need.items() if amount > total.get(name, 0)]
    if not short:
        return None
    if local_ray(address):
        raise NotEnoughResources(f"{what} asks for more than this machine has: {'; '.join(short)}")
    return (f"{what} asks for more than the cluster holds now: {'; '.join(short)}; trials wait until its autoscaler "
            "adds nodes (Ctrl-C if it has none)")


def check_reachable(address: str) -> None:
    """Fail in seconds on a wrong `host:port` (ray.init would retry for minutes)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as err:
        raise ClusterUnreachable(f"--address={address}: no Ray cluster reachable there ({err})") from None


def init_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Start a local Ray (address None) or join a cluster, with the house's options (no dashboard, our logging).

    Raises ClusterUnreachable naming the address when it cannot connect.
    """
    import ray

    if ray.is_initialized():
        return
    if address:
        check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ClusterUnreachable(f"--address={address}: cannot connect to a Ray cluster "
                                 f"({str(err).splitlines()[0]})") from None


def shutdown_ray() -> None:
    """Shut down Ray if this process imported it (a run that started Ray, e.g. for a streamed store)."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()
