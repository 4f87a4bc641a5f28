"""Three "hosts" on this machine for the SSH launcher's tests (see RIG.md, "Other hosts
on one machine"): network namespaces named with this test process's PID, a head
(10.77.0.1, holding a bridge) and two hosts (10.77.0.2, 10.77.0.3) each running its own
sshd (config, host key, pid file and authorized key in one temporary folder; never the
system's sshd config or ``/root/.ssh``). Clients use the ``ssh_config`` written there
(``ssh -F``). Only the namespaces' own addresses are contacted, from inside them.
:meth:`SshHosts.stop` ends the sshds and everything under them by PID and deletes the
namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

SUBNET = "10.77.0"
HEAD_IP, A_IP, B_IP = f"{SUBNET}.1", f"{SUBNET}.2", f"{SUBNET}.3"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
"""What Debian's sshd chroots its unprivileged child into (systemd makes it at boot; a
machine without systemd has none)."""


def missing() -> str | None:
    """Why these hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces and sshd need root"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class SshHosts:
    """pxhead + pxa + pxb, sshd on the last two; :meth:`stop` removes everything."""

    def __init__(self) -> None:
        tag = str(os.getpid())
        self.head, self.a, self.b = f"pxhead{tag}", f"pxa{tag}", f"pxb{tag}"
        self.dir = Path(tempfile.mkdtemp(prefix="px-ssh-"))
        self.config = self.dir / "ssh_config"
        self.sshds: list[subprocess.Popen[bytes]] = []
        self.made: list[str] = []

    def start(self, timeout: float = 15.0) -> None:
        missing_tools = [t for t in ("ip", "ssh", "ssh-keygen", SSHD) if not shutil.which(t)]
        if missing_tools:
            raise RuntimeError(
                f"not installed: {', '.join(missing_tools)} (make system-deps installs "
                "openssh-server)"
            )
        self._network()
        self._keys()
        for ns, ip in ((self.a, A_IP), (self.b, B_IP)):
            self._sshd(ns, ip)
        deadline = time.monotonic() + timeout
        for ns, ip in ((self.a, A_IP), (self.b, B_IP)):
            log = self.dir / f"sshd-{ns}.log"
            while f"Server listening on {ip} port 22" not in _read(log):
                dead = [p for p in self.sshds if p.poll() is not None]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd in {ns} did not start: {_read(log)[-2000:]}")
                time.sleep(0.02)

    def _network(self) -> None:
        for ns in (self.head, self.a, self.b):
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.head, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.head, "addr", "add", f"{HEAD_IP}/24", "dev", "br0")
        _ip("-n", self.head, "link", "set", "br0", "up")
        for ns, ip, port in ((self.a, A_IP, "va"), (self.b, B_IP, "vb")):
            # one veth pair per host: one end on the head's bridge, the other the host's eth0
            _ip(
                "-n", self.head, "link", "add", port, "type", "veth",
                "peer", "name", "eth0", "netns", ns,
            )  # fmt: skip
            _ip("-n", self.head, "link", "set", port, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _keys(self) -> None:
        d = self.dir
        for name in ("host_key", "id_ed25519"):
            subprocess.run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "px-test",
                    "-f",
                    str(d / name),
                ],
                check=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
            )
        (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
        self.config.write_text(
            "Host *\n"
            "  User root\n"
            f"  IdentityFile {d / 'id_ed25519'}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {d / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking accept-new\n"
            "  LogLevel ERROR\n"
        )
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

    def _sshd(self, ns: str, ip: str) -> None:
        d = self.dir
        conf = d / f"sshd-{ns}.conf"
        conf.write_text(
            f"ListenAddress {ip}\n"
            "Port 22\n"
            f"HostKey {d / 'host_key'}\n"
            f"PidFile {d / f'sshd-{ns}.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "MaxStartups 50\n"
        )
        # a host name of its own too (a UTS namespace): its engines are remote to the
        # controller, as on another machine
        script = f'hostname "$1" && exec {SSHD} -D -e -f "$2"'
        cmd = ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", script, "sshd"]
        with open(d / f"sshd-{ns}.log", "ab") as log:
            self.sshds.append(
                subprocess.Popen(
                    [*cmd, ns, str(conf)],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            )

    def run_in_head(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a command "on" the head host; killed by PID (with what it started) if it
        takes longer than ``timeout``."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.head, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = _tree(process.pid)
            for p in tree:
                _kill(p)
            process.kill()
            out, err = process.communicate()
            err += f"\n(killed after {timeout} s)"
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def under_sshd(self) -> list[int]:
        """Processes started through the sshds (sessions, engines), by PID."""
        return [p for s in self.sshds for p in _tree(s.pid)]

    def stop(self) -> list[int]:
        """End the sshds and everything under them, delete the namespaces; the PIDs that
        were still running under the sshds (a test should have left none)."""
        left = self.under_sshd()
        for pid in left:
            _kill(pid)
        for process in self.sshds:
            if process.poll() is None:
                process.kill()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        psutil.wait_procs([psutil.Process(p) for p in left if psutil.pid_exists(p)], timeout=5)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
        return left


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _tree(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.Error:
        pass
