"""Several hosts on this one machine, for tests that cross a network. Each host is a network namespace with
its own address on a bridge (198.18.0.0/15, the range set aside for network benchmarks), its own hostname
(a UTS namespace) and an /etc/hosts naming every host (a mount namespace; the same file is in
/etc/netns/<ns>/hosts for `ip netns exec`). The root namespace is the controller `ctl` at .1 (Prometheus,
slurmctld). The filesystem is shared, as a cluster's shared filesystem is. Everything made is named by a
tag and removed by name and PID, also when a test fails. Needs root and iproute2.

    python -m tests.support.netns_cluster up --hosts 2         # prints the tag, the hosts, how to run on one
    python -m tests.support.netns_cluster exec TAG n1 -- hostname
    python -m tests.support.netns_cluster down TAG
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

STATE_ROOT = "/run/ddpm-netns"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check)


@dataclass
class Host:
    name: str  # n1, n2, ...: hostname and node name
    addr: str
    netns: str
    veth: str  # the root namespace's end, on the bridge


class Cluster:
    def __init__(self, hosts: int = 2, tag: str = ""):
        # the system's randomness, not `random`'s: test plugins seed that alike in every pytest-xdist worker, and two
        # workers then made clusters of the same tag
        self.tag = tag or f"{random.SystemRandom().randrange(16**5):05x}"
        self.dir = os.path.join(STATE_ROOT, self.tag)
        self.bridge = f"ddpm{self.tag}"
        self._layout(self._free_subnet(), hosts)

    def _layout(self, subnet: int, hosts: int) -> None:
        self.subnet, self.ctl = subnet, f"198.18.{subnet}.1"
        self.hosts = [
            Host(f"n{i}", f"198.18.{subnet}.{i + 1}", f"ddpm{self.tag}-n{i}", f"v{self.tag}n{i}")
            for i in range(1, hosts + 1)
        ]

    @staticmethod
    def _subnet_used(subnet: int) -> bool:
        return f"198.18.{subnet}." in sh("ip", "-br", "addr").stdout

    def _free_subnet(self) -> int:
        return next(s for s in random.SystemRandom().sample(range(256), 256) if not self._subnet_used(s))

    # -- naming ---------------------------------------------------------------------------------------
    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def prefix(self, host: Host, cwd: str = "") -> list[str]:
        """Run a command on `host` (its network, hostname and /etc/hosts) in `cwd` (default: this one)."""
        return [
            "nsenter",
            f"--net=/var/run/netns/{host.netns}",
            f"--uts={self.dir}/{host.name}.uts",
            f"--mount={self.dir}/{host.name}.mnt",
            f"--wd={cwd or os.getcwd()}",
            "--",
        ]

    def popen(self, host: Host, cmd: list[str], cwd: str = "", **kw) -> subprocess.Popen:
        return subprocess.Popen(self.prefix(host, cwd) + cmd, **kw)

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost", f"{self.ctl} ctl"] + [f"{h.addr} {h.name}" for h in self.hosts]
        return "\n".join(lines) + "\n"

    # -- life cycle -----------------------------------------------------------------------------------
    def up(self) -> "Cluster":
        try:
            self._up()
        except BaseException:
            self.down()
            raise
        return self

    def _up(self) -> None:
        os.makedirs(self.dir)
        sh("mount", "--bind", self.dir, self.dir)  # namespace files need a private mount to be bound on
        sh("mount", "--make-private", self.dir)
        lock = os.open(STATE_ROOT, os.O_RDONLY)  # one cluster at a time takes a subnet (a lock on the folder)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._subnet_used(self.subnet):  # another cluster took it since __init__
                self._layout(self._free_subnet(), len(self.hosts))
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{self.ctl}/24", "dev", self.bridge)
        finally:
            os.close(lock)
        with open(os.path.join(self.dir, "cluster.json"), "w") as f:
            json.dump({"tag": self.tag, "hosts": len(self.hosts), "subnet": self.subnet}, f)
        sh("ip", "link", "set", self.bridge, "up")
        for h in self.hosts:
            etc = f"/etc/netns/{h.netns}"
            os.makedirs(etc, exist_ok=True)
            with open(f"{etc}/hosts", "w") as f:
                f.write(self.hosts_file())
            sh("ip", "netns", "add", h.netns)
            sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
            sh("ip", "link", "set", h.veth, "master", self.bridge, "up")
            ns = ["ip", "netns", "exec", h.netns]
            sh(*ns, "ip", "addr", "add", f"{h.addr}/24", "dev", "eth0")
            sh(*ns, "ip", "link", "set", "eth0", "up")
            sh(*ns, "ip", "link", "set", "lo", "up")
            for kind in ("uts", "mnt"):
                open(f"{self.dir}/{h.name}.{kind}", "w").close()
            sh("unshare", f"--uts={self.dir}/{h.name}.uts", "hostname", h.name)
            sh(
                "unshare",
                f"--mount={self.dir}/{h.name}.mnt",
                "--propagation",
                "private",
                "mount",
                "--bind",
                f"{etc}/hosts",
                "/etc/hosts",
            )
        with socket.create_server((self.ctl, 0)) as server:  # every host resolves `ctl` and reaches it
            for h in self.hosts:
                sh(
                    *self.prefix(h),
                    sys.executable,
                    "-c",
                    "import socket, sys; socket.create_connection(('ctl', "
                    f"{server.getsockname()[1]}), timeout=10).close(); assert socket.gethostname() == '{h.name}'",
                )

    def pids(self, host: Host) -> list[int]:
        r = sh("ip", "netns", "pids", host.netns, check=False)
        return [int(p) for p in r.stdout.split()]

    def kill_host(self, host: Host, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        """Every process of the host, by PID, until none is left (bounded)."""
        end = time.time() + timeout
        while self.pids(host) and time.time() < end:
            for pid in self.pids(host):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        if self.pids(host):
            raise TimeoutError(f"processes left on {host.name}: {self.pids(host)}")

    def link_bytes(self, host: Host) -> int:
        """Bytes through the host's cable so far (both directions)."""
        stats = f"/sys/class/net/{host.veth}/statistics"
        return sum(int(open(f"{stats}/{d}_bytes").read()) for d in ("rx", "tx"))

    def set_link(self, host: Host, up: bool) -> None:
        """The host's cable: its port on the bridge up or down (packets are dropped, nothing is reset)."""
        sh("ip", "link", "set", host.veth, "up" if up else "down")

    def down(self) -> None:
        """Remove every process, namespace, link and file of this cluster (safe to call twice)."""
        for h in self.hosts:
            if os.path.exists(f"/var/run/netns/{h.netns}"):
                self.kill_host(h)
            for kind in ("uts", "mnt"):
                path = f"{self.dir}/{h.name}.{kind}"
                if os.path.exists(path):
                    sh("umount", path, check=False)
            sh("ip", "netns", "del", h.netns, check=False)
            sh("ip", "link", "del", h.veth, check=False)
            shutil.rmtree(f"/etc/netns/{h.netns}", ignore_errors=True)
        sh("ip", "link", "del", self.bridge, check=False)
        if os.path.isdir(self.dir):
            sh("umount", self.dir, check=False)
            shutil.rmtree(self.dir, ignore_errors=True)
        for parent in (STATE_ROOT, "/etc/netns"):  # made for us if empty now
            try:
                os.rmdir(parent)
            except OSError:
                pass

    @classmethod
    def load(cls, tag: str) -> "Cluster":
        with open(os.path.join(STATE_ROOT, tag, "cluster.json")) as f:
            state = json.load(f)
        c = cls.__new__(cls)
        c.tag, c.dir, c.subnet = tag, os.path.join(STATE_ROOT, tag), state["subnet"]
        c.ctl, c.bridge = f"198.18.{c.subnet}.1", f"ddpm{tag}"
        c.hosts = [
            Host(f"n{i}", f"198.18.{c.subnet}.{i + 1}", f"ddpm{tag}-n{i}", f"v{tag}n{i}")
            for i in range(1, state["hosts"] + 1)
        ]
        return c


@contextlib.contextmanager
def running(hosts: int):
    """A cluster of `hosts` for a test or a benchmark: up, then removed by name and PID, also when the test fails."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"):
        raise RuntimeError("the multi-host tests need root, iproute2 and nsenter (`make system-deps` installs them)")
    c = Cluster(hosts).up()
    try:
        yield c
    finally:
        c.down()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.support.netns_cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--hosts", type=int, default=2)
    ex = sub.add_parser("exec")
    ex.add_argument("tag")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    dn = sub.add_parser("down")
    dn.add_argument("tag")
    args = p.parse_args(argv)
    if args.cmd == "up":
        c = Cluster(args.hosts).up()
        print(f"cluster {c.tag}: ctl {c.ctl} (this namespace)")
        for h in c.hosts:
            print(f"  {h.name} {h.addr}   run on it: {' '.join(c.prefix(h))} COMMAND")
        print(f"remove it: python -m tests.support.netns_cluster down {c.tag}")
        return 0
    c = Cluster.load(args.tag)
    if args.cmd == "exec":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        return subprocess.call(c.prefix(c.host(args.host)) + command)
    c.down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
