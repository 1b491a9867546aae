"""A multi-host test bench on one machine: each "host" is a Linux network namespace on a
private bridge, with its own address, hostname and mount namespace.

What a host sees: its own working folder (``Host.home``, fresh and empty), a private ``/tmp``,
the rest of the machine's files (the interpreter, the code, the data) with the paths given as
``readonly`` read-only; not the other hosts' folders, which live under the bench's base folder
that a tmpfs covers on every host. On the network it reaches the other hosts and the test
process (the root namespace, ``Bench.gateway``), nothing else: the bridge has no uplink and the
machine does not forward.

    with Bench(readonly=[data_dir]) as bench:
        db = bench.host("db")
        pg = Postgres(db).start()
        server = MlflowServer(db, pg).start()    # deploy/mlflow-server.sh, basic-auth
        worker = bench.host("w1")
        worker.run(["python", "-c", "print(1)"], env={...})
        worker.down(); worker.up()            # cut and restore its link
    # everything stopped and deleted here, also when the block raised

Processes run through ``nsenter`` into a *holder* process per host that owns the host's
mount and UTS namespaces (made by ``ip netns exec NS unshare -m -u``), so every command of one
host shares its mounts and ``/tmp``, as on a machine. Names carry ``mo-<pid>-`` so two runs do
not clash, and a run removes what a crashed run (a pid no longer alive) left behind.

Needs root (``ip netns``, mounts); :func:`namespaces_work` says whether this machine allows it.
Where it does not, :class:`LoopbackBench` gives each host an address of its own on the loopback
(``127.K.0.N``) and TCP relays between hosts that can be cut; :func:`make_bench` picks the one
this machine allows (``MNIST_OPT_BENCH`` chooses). Tests reach a server with ``reach``:

    seen = worker.reach(db, 5432, 5000)      # db's address as worker reaches it
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

import psutil

PREFIX = "mo-"  # namespaces, links and folders: mo-<pid>-…
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
SUBNETS = ipaddress.ip_network("10.213.0.0/16")  # a /24 of it per bench, one not routed here
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@functools.cache
def namespaces_work() -> bool:
    """Whether this process may make network namespaces (``unshare -n true``): root on Linux,
    outside a container that forbids it."""
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    except FileNotFoundError:  # no iproute2: no namespaces or links of ours either
        if check:
            raise
        return subprocess.CompletedProcess(["ip", *args], 1, "", "ip: not installed")
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def _netns_names() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names() -> list[str]:
    out = _ip("-j", "link", "show", check=False).stdout or "[]"
    return [link["ifname"] for link in json.loads(out)]


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL every process still in network namespace ``ns`` (daemons included)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove(ns: Sequence[str], links: Sequence[str], dirs: Sequence[Path]) -> None:
    """Delete links (a veth's peer goes with it), then namespaces, then folders; wait until
    the kernel has let go of the links (deleting a namespace frees its devices later)."""
    for link in links:
        _ip("link", "del", link, check=False)
    for name in ns:
        _kill_netns_pids(name)
        _ip("netns", "del", name, check=False)
    for folder in dirs:
        shutil.rmtree(folder, ignore_errors=True)
    end = time.monotonic() + 10
    while time.monotonic() < end and set(links) & set(_link_names()):
        time.sleep(0.1)


def _dead(name: str) -> bool:
    """Whether ``name`` is a bench's (``mo-<pid>-…``) whose process is gone."""
    return (m := _NAME.match(name)) is not None and not psutil.pid_exists(int(m[1]))


def clean_leftovers() -> list[str]:
    """Remove the namespaces, links and folders of benches whose process is gone (a crashed
    or killed run); returns their names."""
    ns = [n for n in _netns_names() if _dead(n)]
    links = [link.split("@")[0] for link in _link_names() if _dead(link)]
    dirs = [p for p in Path(tempfile.gettempdir()).glob(f"{PREFIX}*") if _dead(p.name)]
    _remove(ns, links, dirs)
    return [*ns, *links, *(str(d) for d in dirs)]


def leftovers(pid: int | None = None) -> list[str]:
    """Namespaces, links and folders of the bench of process ``pid`` (default: this one)."""
    tag = f"{PREFIX}{pid or os.getpid()}-"
    return ([n for n in _netns_names() if n.startswith(tag)]
            + [link for link in _link_names() if link.startswith(tag)]
            + [str(p) for p in Path(tempfile.gettempdir()).glob(f"{tag}*")])


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for args in (("-j", "-4", "route", "show", "table", "all"),):
        for route in json.loads(_ip(*args).stdout or "[]"):
            dst = route.get("dst", "")
            if dst and dst != "default":
                used.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(_ip("-j", "-4", "addr", "show").stdout or "[]"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    return used


@contextlib.contextmanager
def _machine_lock() -> Iterator[None]:
    """Serialise choosing a subnet among benches starting at once (a lock on the temp folder
    itself: nothing to create, nothing to leave behind)."""
    fd = os.open(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# The holder of a host's mount and UTS namespaces. Run by `ip netns exec NS unshare -m -u
# --propagation private`, so nothing it mounts reaches the machine: it names the host, covers
# the bench's base folder and /tmp with empty tmpfs, puts the host's own folder back at its
# path (a bind of a descriptor opened before it was covered), makes the given paths read-only,
# says "ready" and waits for its stdin to close.
_HOLDER = r'''
import ctypes, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
def mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)
hostname, home, covered, readonly = sys.argv[1], sys.argv[2], sys.argv[3].split(":"), sys.argv[4:]
socket.sethostname(hostname)
own = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
for path in sorted(covered, key=len):
    if os.path.isdir(path):
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777" if path == "/tmp" else "mode=755")
os.makedirs(home, exist_ok=True)
mount(f"/proc/self/fd/{own}", home, None, MS_BIND)
os.close(own)
for path in readonly:
    mount(path, path, None, MS_BIND | MS_REC)
    mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
print("ready", flush=True)
sys.stdin.read()
'''


class Host:
    """One machine of the bench: a network namespace with address ``addr`` on the bridge,
    hostname ``hostname``, working folder ``home`` (seen by no other host). Make with
    :meth:`Bench.host`."""

    def __init__(self, bench: Bench, name: str, index: int):
        self.bench, self.name, self.index = bench, name, index
        self.ns = f"{bench.tag}{name}"
        self.veth = f"{bench.tag}v{index}"  # the bridge's end; the host's end is eth0
        self.addr = str(bench.subnet.network_address + index + 1)  # .1 is the gateway
        self.hostname = f"{name}.bench"
        self.home = bench.base / name
        self.procs: list[subprocess.Popen] = []
        self._holder: subprocess.Popen | None = None

    def _start(self) -> None:
        b = self.bench
        self.home.mkdir(parents=True)
        _ip("netns", "add", self.ns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        _ip("link", "set", self.veth, "master", b.bridge, "up")
        _ip("-n", self.ns, "addr", "add", f"{self.addr}/{b.subnet.prefixlen}", "dev", "eth0")
        _ip("-n", self.ns, "link", "set", "eth0", "up")
        _ip("-n", self.ns, "link", "set", "lo", "up")
        covered = ":".join(["/tmp", str(b.base)])
        self._holder = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "unshare", "-m", "-u", "--propagation", "private",
             sys.executable, "-I", "-c", _HOLDER, self.hostname, str(self.home), covered,
             *map(str, b.readonly)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        line = self._holder.stdout.readline()
        if line.strip() != "ready":
            self._holder.kill()
            raise RuntimeError(f"host {self.name}: its namespaces did not start: "
                               f"{line}{self._holder.stderr.read()}")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A machine's bare environment (PATH, HOME = its folder, a locale) plus ``extra``:
        nothing of the test process's own leaks in."""
        return {"PATH": BASE_PATH, "HOME": str(self.home), "LANG": "C.UTF-8",
                "TMPDIR": "/tmp", **(extra or {})}

    def _spawn(self, cmd: Sequence[str], env: dict[str, str] | None, cwd: str | Path | None,
               **popen) -> subprocess.Popen:
        """``cmd`` started inside the host's namespaces, in a process group of its own."""
        if self._holder is None or self._holder.poll() is not None:
            raise RuntimeError(f"host {self.name} is not running")
        return subprocess.Popen(["nsenter", "-t", str(self._holder.pid), "-n", "-m", "-u",
                                 f"--wdns={cwd or self.home}", "--", *map(str, cmd)],
                                env=self.env(env), stdin=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True, **popen)

    def reach(self, server: Host, *ports: int) -> str:
        """The address at which this host reaches ``server`` on ``ports``: here its own."""
        return server.addr

    def ran(self, trial) -> bool:
        """Whether a process of this host ran Optuna ``trial`` (its owner's host name)."""
        return trial.user_attrs.get("host") == self.hostname

    @property
    def localhost(self) -> str:
        """The address at which this host's processes reach its own services."""
        return "localhost"

    def http_names(self, port: int) -> str:
        """The Host headers by which clients ask for this host's ``port`` (``--allowed-hosts``)."""
        return f"{self.addr}:{port},{self.addr}"

    def popen(self, cmd: Sequence[str], env: dict[str, str] | None = None,
              cwd: str | Path | None = None, log: str | None = None) -> subprocess.Popen:
        """Start ``cmd`` on this host in its own process group (``env`` over :meth:`env`'s),
        output to the bench's log ``log`` (default: the program's name); stopped at teardown
        if still running. ``proc.log`` is the log file's path."""
        path = self.bench.log_path(f"{self.name}-{log or Path(str(cmd[0])).name}")
        with open(path, "ab") as out:
            proc = self._spawn(cmd, env, cwd, stdout=out)
        proc.log = path
        self.procs.append(proc)
        return proc

    def run(self, cmd: Sequence[str], env: dict[str, str] | None = None,
            cwd: str | Path | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` on this host and wait; its output (stdout and stderr together) comes
        back as text. ``check``: raise with that output when it exits non-zero."""
        proc = self._spawn(cmd, env, cwd, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace=0)
            out, _ = proc.communicate()
            raise RuntimeError(f"host {self.name}: {' '.join(map(str, cmd))} ran past {timeout} s:"
                               f"\n{out[-3000:]}") from None
        result = subprocess.CompletedProcess(list(cmd), proc.returncode, out)
        if check and proc.returncode != 0:
            raise RuntimeError(f"host {self.name}: {' '.join(map(str, cmd))} exited "
                               f"{proc.returncode}:\n{out[-3000:]}")
        return result

    def sees(self, path: str | Path) -> bool:
        """Whether ``path`` exists for this host's processes."""
        return self.run(["test", "-e", str(path)], check=False).returncode == 0

    def down(self) -> None:
        """Cut this host's link to the bridge (its processes stay up, its packets go nowhere)."""
        _ip("link", "set", self.veth, "down")

    def up(self) -> None:
        """Restore the link :meth:`down` cut."""
        _ip("link", "set", self.veth, "up")

    def stop(self, grace: float = 10) -> None:
        """Stop every process started on this host (SIGTERM to its group, SIGKILL after
        ``grace`` s), then anything left in its network namespace, then its holder."""
        for proc in self.procs:
            stop_group(proc, grace)
        _kill_netns_pids(self.ns)
        if self._holder is not None:
            with contextlib.suppress(OSError):
                self._holder.stdin.close()
            stop_group(self._holder, grace=2)
            for stream in (self._holder.stdout, self._holder.stderr):
                stream.close()


def stop_group(proc: subprocess.Popen, grace: float = 10, sig: int = signal.SIGTERM) -> int | None:
    """Send ``sig`` to ``proc``'s process group, SIGKILL it after ``grace`` s; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig if grace > 0 else signal.SIGKILL)
        try:
            proc.wait(timeout=grace if grace > 0 else 10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):  # its children too
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return proc.returncode


class Bench:
    """A private bridge ``mo-<pid>-br`` on a free 10.213.N.0/24, the root namespace at ``.1``
    (``gateway``: the test process reaches every host), and the hosts :meth:`host` adds at
    ``.2``, ``.3``, …. ``readonly``: paths every host sees read-only (the data, the code).
    :meth:`close` (or leaving the ``with`` block) removes all of it, whatever was set up."""

    kind = "netns"
    isolates_files = True  # a host sees neither another's folder nor the bench's logs
    host_class = Host

    def __init__(self, readonly: Sequence[str | Path] = ()):
        self.tag = f"{PREFIX}{os.getpid()}-"
        self.bridge = f"{self.tag}br"
        self.readonly = [Path(p) for p in readonly]
        self.hosts: dict[str, Host] = {}
        self.services: list = []  # Postgres / MlflowServer: stopped gently before the kill
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway: str | None = None
        self.base: Path | None = None

    def __enter__(self) -> Bench:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        clean_leftovers()
        self.base = Path(tempfile.mkdtemp(prefix=self.tag))
        self.base.chmod(0o755)  # PostgreSQL's user must reach its folder in it
        (self.base / "logs").mkdir()
        with _machine_lock():
            used = _used_networks()
            self.subnet = next((net for net in SUBNETS.subnets(new_prefix=24)
                                if not any(net.overlaps(u) for u in used)), None)
            if self.subnet is None:
                raise RuntimeError(f"no free /24 in {SUBNETS} on this machine")
            self.gateway = str(self.subnet.network_address + 1)
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")

    def host(self, name: str) -> Host:
        """A new host ``name`` (a fresh, empty ``home``), up and reachable."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name) or name in self.hosts:
            raise ValueError(f"host name {name!r}: new, lower-case letters and digits")
        host = self.host_class(self, name, len(self.hosts) + 1)
        self.hosts[name] = host
        host._start()
        return host

    def log_path(self, stem: str) -> Path:
        """A log file of the bench (outside every host's view), new for each ``stem``."""
        path, n = self.base / "logs" / f"{stem}.log", 1
        while path.exists():
            n += 1
            path = self.base / "logs" / f"{stem}.{n}.log"
        return path

    def close(self) -> None:
        """Stop the services, every process and holder, delete the namespaces, links and
        folders. Safe to call on a bench half set up, and twice."""
        errors = self._stop_services()
        _remove([h.ns for h in self.hosts.values()],
                [h.veth for h in self.hosts.values()] + [self.bridge],
                [self.base] if self.base else [])
        self.hosts.clear()
        _report(errors)

    def _stop_services(self) -> list[str]:
        """Stop the services gently, then every host's processes; what would not stop."""
        errors = []
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception as exc:  # noqa: BLE001 - the rest must go regardless
                errors.append(f"{service}: {exc}")
        self.services.clear()
        for host in self.hosts.values():
            host.stop(grace=5)
        return errors


def _report(errors: list[str]) -> None:
    if errors:  # after the teardown: a service that would not stop gently is worth a look
        print("bench teardown:", *errors, sep="\n  ", file=sys.stderr)


class _Proxy(threading.Thread):
    """A TCP relay from ``listen`` to ``target``, connecting from the address ``source`` (so
    that the target sees the client host's address). While :attr:`open` is clear, the link is
    down: bytes in flight and new connections wait, as packets on a cut link wait for TCP to
    send them again. Unlike a cut link, this machine's kernel still acknowledges them, so the
    client's TCP keepalive and ``tcp_user_timeout`` never fire: a call waits until the link is
    back (or its own timeout), where on the namespaced bench the connection breaks after 25 s."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], source: str):
        super().__init__(daemon=True, name=f"proxy {listen} -> {target}")
        self.target, self.source = target, source
        self.open = threading.Event()
        self.open.set()
        self.server = socket.create_server(listen)
        self.sockets: set[socket.socket] = set()  # of the connections not ended yet
        self.closed = False
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self.open.wait()
        try:
            if self.closed:
                raise OSError("closed")
            upstream = socket.create_connection(self.target, timeout=30,
                                                source_address=(self.source, 0))
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        pair, pumps = (client, upstream), [2]
        self.sockets.update(pair)
        for src, dst in (pair, pair[::-1]):
            threading.Thread(target=self._pump, args=(src, dst, pair, pumps), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair, pumps: list[int]) -> None:
        try:
            while data := src.recv(65536):
                self.open.wait()
                dst.sendall(data)
            self.open.wait()  # a closed connection is news that a cut link holds back too
            dst.shutdown(socket.SHUT_WR)  # pass the end of one direction on
        except OSError:  # one side is gone: so is the connection (wakes the other pump)
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            pumps[0] -= 1
            if pumps[0]:
                return
        for sock in pair:  # both directions ended
            sock.close()
            self.sockets.discard(sock)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)  # wakes accept(); close alone does not
        self.server.close()
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.open.set()  # let waiting threads see the closed sockets and end


class LoopbackHost(Host):
    """A host of a :class:`LoopbackBench`: its own address ``127.K.0.N`` and folder; its
    processes run on this machine as the test's user, with the machine's host name, and see
    every file. Other hosts reach it only at the addresses :meth:`reach` gives them, through
    relays that :meth:`down` holds."""

    def __init__(self, bench: LoopbackBench, name: str, index: int):
        super().__init__(bench, name, index)
        self.addr = f"{bench.prefix}.0.{index + 1}"
        self.hostname = socket.gethostname()

    def _start(self) -> None:
        self.home.mkdir(parents=True)

    def _spawn(self, cmd: Sequence[str], env: dict[str, str] | None, cwd: str | Path | None,
               **popen) -> subprocess.Popen:
        return subprocess.Popen(list(map(str, cmd)), cwd=cwd or self.home, env=self.env(env),
                                stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                start_new_session=True, **popen)

    def reach(self, server: Host, *ports: int) -> str:
        """``127.K.<this host's number>.<server's last byte>``: relays on ``ports`` to the
        server's address, from this host's."""
        if server is self:
            return self.addr
        view = f"{self.bench.prefix}.{self.index}.{server.index + 1}"
        for port in ports:
            self.bench.relay(self, server, view, port)
        return view

    def ran(self, trial) -> bool:
        # every host has the machine's name: the owner's process tells them apart
        return trial.user_attrs.get("pid") in {proc.pid for proc in self.procs}

    @property
    def localhost(self) -> str:
        return self.addr  # the machine's localhost is every host's

    def http_names(self, port: int) -> str:
        return f"{self.bench.prefix}.*"  # its own address and every host's view of it

    def down(self) -> None:
        self.bench.cut(self, True)

    def up(self) -> None:
        self.bench.cut(self, False)

    def stop(self, grace: float = 10) -> None:
        for proc in self.procs:
            stop_group(proc, grace)


class LoopbackBench(Bench):
    """The bench where network namespaces cannot be had (``unshare -n`` fails): every host
    is a loopback address ``127.K.0.N`` of this machine (K free, per bench), and a host
    reaches another only through a TCP relay of its own (:meth:`Host.reach`), which
    :meth:`Host.down` holds to cut its links. What it does not give: hosts see each other's
    files (``readonly`` is not applied) and share a host name and ``/tmp``; it runs as root,
    for PostgreSQL's own user. After a crash, the next bench removes its folders only: its
    servers' processes are left to whoever killed the run."""

    kind = "loopback"
    isolates_files = False
    host_class = LoopbackHost

    def __init__(self, readonly: Sequence[str | Path] = ()):
        super().__init__(readonly)
        self.prefix: str | None = None
        self.relays: dict[tuple[str, int], _Proxy] = {}
        self.ends: dict[tuple[str, int], set[str]] = {}
        self.held: set[str] = set()

    def start(self) -> None:
        for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
            if _dead(folder.name):
                shutil.rmtree(folder, ignore_errors=True)
        self.base = Path(tempfile.mkdtemp(prefix=self.tag))
        self.base.chmod(0o755)
        (self.base / "logs").mkdir()
        with _machine_lock():
            busy = {c.laddr.ip.split(".")[1] for c in psutil.net_connections("inet4")
                    if c.laddr and c.laddr.ip.startswith("127.")}
            first = 100 + os.getpid() % 150
            k = next((k for k in [*range(first, 250), *range(100, first)]
                      if str(k) not in busy), None)
            if k is None:
                raise RuntimeError("no free 127.K.0.0/16 on this machine (K 100-249 all in use)")
        self.prefix = f"127.{k}"
        # who may connect, for PostgreSQL's pg_hba.conf: only this machine reaches loopback
        self.subnet = ipaddress.ip_network("127.0.0.0/8")
        self.gateway = "127.0.0.1"  # the test process connects from there

    def relay(self, client: Host, server: Host, view: str, port: int) -> None:
        """A relay at ``view``:``port`` to ``server`` (once), cut while either end is down."""
        if (view, port) not in self.relays:
            self.relays[view, port] = _Proxy((view, port), (server.addr, port), client.addr)
            self.ends[view, port] = {client.name, server.name}
            self._apply()

    def cut(self, host: Host, down: bool) -> None:
        (self.held.add if down else self.held.discard)(host.name)
        self._apply()

    def _apply(self) -> None:
        for key, relay in self.relays.items():
            (relay.open.clear if self.ends[key] & self.held else relay.open.set)()

    def close(self) -> None:
        errors = self._stop_services()
        for relay in self.relays.values():
            relay.close()
        self.relays.clear()
        if self.base:
            shutil.rmtree(self.base, ignore_errors=True)
        self.hosts.clear()
        _report(errors)


def make_bench(readonly: Sequence[str | Path] = (), kind: str | None = None) -> Bench:
    """A bench of ``kind`` (default :func:`bench_kind`)."""
    kind = kind or bench_kind()
    return {"netns": Bench, "loopback": LoopbackBench}[kind](readonly)


def bench_kind() -> str | None:
    """``MNIST_OPT_BENCH`` (netns or loopback) if set; else netns where namespaces can be
    made, else loopback for root (PostgreSQL runs as its own user); else None: no bench."""
    kind = os.environ.get("MNIST_OPT_BENCH")
    if kind not in (None, "", "netns", "loopback"):
        raise ValueError(f"MNIST_OPT_BENCH={kind!r}: use netns or loopback")
    if kind:
        return kind
    return "netns" if namespaces_work() else "loopback" if os.geteuid() == 0 else None


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers 200 (or raise, also when ``proc`` exits first)."""
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: its process exited {proc.returncode} before answering:\n"
                               f"{tail(proc)}")
        if time.monotonic() > end:
            raise RuntimeError(f"{url} did not answer within {timeout} s" +
                               (f":\n{tail(proc)}" if proc is not None else ""))
        time.sleep(0.5)


def tail(proc: subprocess.Popen, chars: int = 3000) -> str:
    """The end of the log of a process started with :meth:`Host.popen`."""
    path = getattr(proc, "log", None)
    return Path(path).read_text(errors="replace")[-chars:] if path and Path(path).exists() else ""


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): "
                           "run `make pg` first")
    return found[-1].parent


DEPLOY = Path(__file__).resolve().parent.parent / "deploy"  # the recipe the bench runs


def recipe_env(db_host: str, mlflow_password: str) -> dict[str, str]:
    """``deploy/worker.env``, the variables the README tells every worker to set, with the
    database host's address for ``dbhost`` and the MLflow user's password filled in."""
    found = {}
    for line in (DEPLOY / "worker.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            found[key] = value.replace("dbhost", db_host)
    found["MLFLOW_TRACKING_PASSWORD"] = mlflow_password
    return found


# The recipe's postgresql.conf lines (README "Many machines", deploy/compose.yaml). Keepalives:
# a worker whose link died is noticed within 25 s, not the kernel's 2 hours, and its
# connection's locks (the study's lock, between two trials) go with it. max_connections: a
# worker holds up to 3 (its storage's and its heartbeat's pooled ones, one for the study's
# lock), the tracking server up to 15 per process; the default 100 is full before 64 workers
# (make bench-scale).
SERVER_SETTINGS = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5,
                   "tcp_keepalives_count": 3, "max_connections": 300}


class Postgres:
    """A throw-away PostgreSQL server on ``host``, set up as the README's many-machine recipe
    sets one up (``deploy/postgres.sql``): role ``mnist_opt`` with ``password`` owns the
    databases ``optuna`` and ``mlflow``; it listens on the host's address and on localhost,
    and asks every TCP client for the password (SCRAM). Only the superuser ``postgres``, over
    the server's own socket, gets in without one (the bench's administration, as Debian's
    ``peer``)."""

    USER = "mnist_opt"  # the role deploy/postgres.sql makes
    DATABASES = ("optuna", "mlflow")

    def __init__(self, host: Host, port: int = 5432, password: str | None = None):
        self.host, self.port = host, port
        self.password = password or secrets.token_urlsafe(18)  # no ':' or '\\': .pgpass-safe
        self.data = host.home / "postgres"
        self.bindir = _pg_bin()
        self._initialised = False

    def __str__(self) -> str:
        return f"PostgreSQL on {self.host.name} ({self.host.addr}:{self.port})"

    def url(self, database: str) -> str:
        """``postgresql://mnist_opt@ADDR:PORT/DATABASE``: no password, a client finds it in
        its ``.pgpass`` (:meth:`pgpass`)."""
        return f"postgresql://{self.USER}@{self.host.addr}:{self.port}/{database}"

    def pgpass(self, path: str | Path, hostname: str | None = None) -> Path:
        """Write a ``.pgpass`` at ``path`` (mode 0600: libpq ignores a file others may read)
        that gives the password for ``hostname`` (default: this server's address)."""
        path = Path(path)
        path.write_text(f"{hostname or self.host.addr}:{self.port}:*:{self.USER}:{self.password}\n")
        path.chmod(0o600)
        return path

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> str:
        return self.host.run(["runuser", "-u", "postgres", "--", str(self.bindir / tool), *args],
                             timeout=timeout).stdout

    def start(self, timeout: float = 120) -> Postgres:
        """Create the cluster, its role and databases the first time; start (again) the server."""
        if self not in self.host.bench.services:
            self.host.bench.services.append(self)
        if not self._initialised:
            self.data.mkdir()
            shutil.chown(self.data, "postgres", "postgres")
            self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                     "--auth-host=scram-sha-256", "--no-sync")
            with open(self.data / "pg_hba.conf", "a") as hba:  # the recipe's line
                hba.write(f"host {','.join(self.DATABASES)} {self.USER} "
                          f"{self.host.bench.subnet} scram-sha-256\n")
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w",
                 "-t", str(int(timeout)), "start", "-o",
                 f"-h {','.join({self.host.addr, self.host.localhost})} -p {self.port} "
                 f"-k {self.data} -F "
                 + " ".join(f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()),
                 timeout=timeout + 10)
        if not self._initialised:
            sql = DEPLOY / "postgres.sql"  # read as root: the postgres user need not see it
            self.host.run(["sh", "-c", f"runuser -u postgres -- {self.bindir / 'psql'} -X -q "
                                       f"-h {self.data} -p {self.port} -U postgres "
                                       f"-v ON_ERROR_STOP=1 < {sql}"],
                          env={"DB_PASSWORD": self.password})
            self._initialised = True
        return self

    def running(self) -> bool:
        return self.host.run(["runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"),
                              "-D", str(self.data), "status"], check=False).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (smart, fast, immediate); nothing if it is not running."""
        if self._initialised and self.running():
            self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")


class MlflowServer:
    """The tracking server as ``deploy/mlflow-server.sh`` starts it on ``host``: runs and
    registry in ``pg``'s ``mlflow`` database (over localhost, the password from the server
    host's ``.pgpass``), artifacts proxied by the server (clients get ``mlflow-artifacts:/``
    URIs) into ``host.home/mlflow/artifacts``, which no other host can see; MLflow's basic
    authentication with admin password ``admin_password``. :meth:`add_user` makes the user
    that clients sign in as (``deploy/mlflow-user.sh``)."""

    def __init__(self, host: Host, pg: Postgres, port: int = 5000, workers: int = 1,
                 env: dict[str, str] | None = None, allowed_hosts: str | None = ""):
        self.host, self.pg, self.port, self.workers = host, pg, port, workers
        # the Host headers it answers (--allowed-hosts): "" its own address, None MLflow's
        # default (localhost and private addresses)
        self.allowed_hosts = (host.http_names(port) if allowed_hosts == "" else allowed_hosts)
        self.dir = host.home / "mlflow"
        self.artifacts = self.dir / "artifacts"
        self.admin_password = secrets.token_urlsafe(18)
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def __str__(self) -> str:
        return f"mlflow server on {self.host.name} ({self.uri})"

    @property
    def uri(self) -> str:
        return f"http://{self.host.addr}:{self.port}"

    def start(self, timeout: float = 180) -> MlflowServer:
        """Start it and wait for ``/health`` (which needs no credentials) from the test
        process (through the bridge)."""
        if self not in self.host.bench.services:
            self.host.bench.services.append(self)
        self.pg.pgpass(self.host.home / ".pgpass", hostname=self.host.localhost)  # HOME is home
        env = {"PATH": f"{Path(sys.executable).parent}:{BASE_PATH}",  # it starts uvicorn from PATH
               # the test's own interpreter and import path stand for the server's install
               **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
               "MLFLOW_DIR": str(self.dir), "MLFLOW_BIND": self.host.addr,
               "MLFLOW_PORT": str(self.port),
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "bench-" + self.admin_password,
               "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
               "MLFLOW_SERVER_WORKERS": str(self.workers), **self.env}
        if self.host.localhost != "localhost":  # the recipe's default
            env["DB_HOST"] = self.host.localhost
        if self.allowed_hosts is not None:
            env["MLFLOW_ALLOWED_HOSTS"] = self.allowed_hosts
        self.proc = self.host.popen(["sh", str(DEPLOY / "mlflow-server.sh")], env=env,
                                    log="mlflow-server")
        wait_http(f"{self.uri}/health", timeout, self.proc)
        return self

    def add_user(self, username: str, password: str) -> None:
        """Create an MLflow user, as the admin, with the recipe's script."""
        self.host.run(["sh", str(DEPLOY / "mlflow-user.sh")], env={
            "PATH": f"{Path(sys.executable).parent}:{BASE_PATH}", "MLFLOW_TRACKING_URI": self.uri,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.admin_password,
            "MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password})

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15) -> None:
        """Stop it (its whole process group: uvicorn, its workers, the job runner);
        ``sig=SIGKILL`` kills it outright."""
        if self.proc is not None:
            stop_group(self.proc, grace if sig != signal.SIGKILL else 0, sig)
            self.proc = None
