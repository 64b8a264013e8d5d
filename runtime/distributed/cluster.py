"""Connecting to Ray: an existing cluster, or a local one started on this machine.

``address=None`` starts a local cluster (unless ``RAY_ADDRESS`` names one);
``"auto"`` joins the cluster this machine belongs to (``ray start --head`` /
``ray start --address=...``); ``"host:6379"`` or ``"ray://host:10001"`` join
a given one. Every node needs the same tiermem installed and the store at the
same path (a shared file system, or a copy per node).
"""

from __future__ import annotations

import os
from typing import Any

from tiermem.errors import ConfigError

__all__ = ["connect", "import_ray", "shutdown"]

_started_here = False


def import_ray() -> Any:
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("sharded inference needs Ray: pip install 'tiermem[ray]'") from None
    return ray


def _bind_loopback(ray: Any) -> None:
    """Make a new local cluster use 127.0.0.1 as its node address, so its servers listen on
    loopback only. Ray resolves a ``_node_ip_address`` of 127.0.0.1 to the machine's address;
    it keeps loopback where clusters are off (its macOS/Windows default), a switch read from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when ``ray`` is imported (set here for the processes
    it starts, and on the module already imported)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    except AttributeError:  # another Ray layout: its defaults apply
        pass


def connect(address: str | None = None, *, num_cpus: int | None = None,
            temp_dir: str | os.PathLike[str] | None = None,
            namespace: str = "tiermem", loopback: bool = True) -> bool:
    """Make sure this process is connected to Ray; True if this call started a local cluster.

    A process already connected (``ray.init`` called by the user) is left as it
    is. ``num_cpus``, ``temp_dir`` and ``loopback`` only apply to a new local cluster;
    ``loopback`` (the default) keeps its servers on 127.0.0.1, unreachable from other hosts.
    """
    global _started_here
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"namespace": namespace, "logging_level": "WARNING",
                              "log_to_driver": True}
    local = address is None and not os.environ.get("RAY_ADDRESS")
    if local:
        kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
        if loopback:
            _bind_loopback(ray)
        if temp_dir is not None:
            kwargs["_temp_dir"] = str(temp_dir)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except ConnectionError as e:
        raise ConfigError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    _started_here = local
    return local


def shutdown() -> None:
    """Disconnect; a local cluster this module started is stopped."""
    global _started_here
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()
    _started_here = False
