"""A second "host" on this machine: a network namespace joined to the host by
a veth pair, with private addresses only. Processes started through
`launcher` live in it; `cut()` takes its end of the link down (the host's
end stays up, so the host's own traffic to its address is untouched) and
`heal()` brings it back."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


class NetnsHost:
    def __init__(self, tag: str = "") -> None:
        n = os.getpid() % 250
        self.name = f"cellmesh-{tag or os.getpid()}"
        self.host_if = f"cmh{os.getpid()}"
        self.ns_if = f"cmn{os.getpid()}"
        # 10.231.n.0/30: the host side is .1, the namespace side .2.
        self.host_addr = f"10.231.{n}.1"
        self.ns_addr = f"10.231.{n}.2"

    @property
    def launcher(self) -> tuple[str, ...]:
        """Prefix that runs a command inside the namespace (`ip netns exec`
        execs it in place, so its pid is the command's)."""
        return ("ip", "netns", "exec", self.name)

    def create(self) -> None:
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        _ip("link", "set", self.ns_if, "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_if)
        _ip("link", "set", self.host_if, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if)
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("-n", self.name, "link", "set", self.ns_if, "up")

    def cut(self) -> None:
        _ip("-n", self.name, "link", "set", self.ns_if, "down")

    def heal(self) -> None:
        _ip("-n", self.name, "link", "set", self.ns_if, "up")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", self.host_if)  # takes its peer with it
        with contextlib.suppress(RuntimeError):
            _ip("netns", "del", self.name)

    @contextlib.contextmanager
    def running(self) -> Iterator[NetnsHost]:
        if os.geteuid() != 0:
            raise RuntimeError("network namespace tests need root (ip netns, veth pairs)")
        self.remove()  # leftovers of a killed run of this pid
        self.create()
        try:
            yield self
        finally:
            self.remove()
