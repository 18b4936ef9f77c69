"""What the real node needs from this machine, and what it changes there, undone.

The node is machine-wide by nature: kube-proxy's rules, containerd's shims and cgroups, the
kernel settings the kubelet adjusts. So there is one node per machine at a time (a lock), its
state lives at fixed paths (so that the leftovers of a run that died, even by SIGKILL, are
found and cleaned by the next one), and everything it changed is recorded before the change
and undone on teardown:

- a bridge of its own, `offload0` (10.88.0.1/16): the node's address, the CNI bridge, and the
  route of the Service range, so that no node or pod traffic uses the machine's interfaces;
- iptables chains that drop pod traffic routed anywhere but the bridge, and pod traffic to
  the host other than to the API server and metrics-server;
- the kernel settings the kubelet, kube-proxy and the CNI bridge plugin set (ip_forward,
  panic, overcommit, ...), restored to the values they had;
- directories the kubelet and libcni create outside their configured roots.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

BRIDGE = "offload0"
NODE_IP = "10.88.0.1"
POD_CIDR = "10.88.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
APISERVER_PORT = 6443
METRICS_SERVER_PORT = 4443

STATE_DIR = Path("/var/lib/offload-e2e-node")  # containerd's root, the kubelet's, CNI's
RUN_DIR = Path("/run/offload-e2e-node")  # sockets and runtime state (short paths)
LOCK_FILE = Path("/run/offload-e2e-node.lock")
RECORD = Path("/run/offload-e2e-node.json")  # what was there before: restored on cleanup

CHAIN_FORWARD = "OFFLOAD-E2E-FORWARD"
CHAIN_INPUT = "OFFLOAD-E2E-INPUT"

# Kernel settings that the kubelet (protectKernelDefaults: false), kube-proxy or the CNI bridge
# plugin set: saved before the node starts, restored after.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "kernel/panic",
    "kernel/panic_on_oops",
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)

# Paths written outside the configured roots: removed afterwards if the node created them.
OUTSIDE_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
    Path("/run/netns"),
    Path("/etc/kubernetes"),
)

# command -> the Debian package that has it
COMMANDS = {
    "containerd": "containerd",
    "containerd-shim-runc-v2": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "iptables": "iptables",
    "ip": "iproute2",
    "conntrack": "conntrack",
    "buildah": "buildah",
    "mmdebstrap": "mmdebstrap",
    "gcc": "gcc",
    "umount": "mount",
}
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")


class NodePrerequisiteMissing(RuntimeError):
    """The machine lacks something the real node needs; the message says what and how to get it."""


def missing_prerequisites() -> list[str]:
    """Everything the real node needs and does not find, each with how to get it."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("must run as root (containerd, the kubelet, iptables and bridges need it)")
    packages = sorted({pkg for cmd, pkg in COMMANDS.items() if shutil.which(cmd) is None})
    if packages:
        missing = sorted(cmd for cmd in COMMANDS if shutil.which(cmd) is None)
        problems.append(f"commands {missing} not found: apt-get install -y {' '.join(packages)}")
    if not Path("/usr/lib/x86_64-linux-gnu/libc.a").exists() and not list(Path("/usr/lib").glob("*/libc.a")):
        problems.append("no static libc for the pause binary: apt-get install -y libc6-dev")
    plugins = [p for p in CNI_PLUGINS if not (CNI_BIN_DIR / p).is_file()]
    if plugins:
        problems.append(
            f"CNI plugins {plugins} not in {CNI_BIN_DIR}: apt-get install -y containernetworking-plugins"
        )
    if not (Path("/sys/fs/cgroup/cpu").is_dir() or Path("/sys/fs/cgroup/cgroup.controllers").is_file()):
        problems.append("no cpu cgroup controller mounted under /sys/fs/cgroup (cgroup v1 or v2 needed)")
    if "overlay" not in Path("/proc/filesystems").read_text():
        problems.append("the kernel has no overlay filesystem (containerd's overlayfs snapshotter needs it)")
    if not Path("/proc/sys/net/bridge").is_dir():
        problems.append("no br_netfilter in the kernel (/proc/sys/net/bridge): modprobe br_netfilter")
    return problems


def check_prerequisites() -> None:
    problems = missing_prerequisites()
    if problems:
        raise NodePrerequisiteMissing(
            "the e2e tier's real node cannot start on this machine:\n  - " + "\n  - ".join(problems)
        )


@contextmanager
def node_lock(timeout: float = 1800.0) -> Iterator[None]:
    """Holds the machine's real-node lock (waiting up to `timeout` s for another run's node)."""
    LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_FILE, "a+") as handle:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log.warning("another run holds the real node's lock %s; waiting", LOCK_FILE)
                    announced = True
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the real node's lock {LOCK_FILE} stayed taken for {timeout:.0f}s"
                    ) from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _read_sysctl(name: str) -> str | None:
    try:
        return (Path("/proc/sys") / name).read_text().strip()
    except OSError:
        return None


def _write_sysctl(name: str, value: str) -> None:
    try:
        (Path("/proc/sys") / name).write_text(value)
    except OSError as exc:
        log.warning("could not restore %s=%s: %s", name, value, exc)


@dataclass
class HostRecord:
    """What the machine had before the node changed it."""

    sysctls: dict[str, str]
    absent_paths: list[str]

    def save(self) -> None:
        RECORD.write_text(json.dumps({"sysctls": self.sysctls, "absent_paths": self.absent_paths}))

    @classmethod
    def load(cls) -> HostRecord | None:
        try:
            data = json.loads(RECORD.read_text())
        except (OSError, ValueError):
            return None
        return cls(data["sysctls"], data["absent_paths"])

    @classmethod
    def take(cls) -> HostRecord:
        sysctls = {name: value for name in SYSCTLS if (value := _read_sysctl(name)) is not None}
        return cls(sysctls, [str(p) for p in OUTSIDE_PATHS if not p.exists()])


def setup_network() -> None:
    """The bridge, its address, the Service range's route, and the traffic fences."""
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{NODE_IP}/16", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    # Service traffic from the host leaves from the node address, over the bridge, never eth0.
    run("ip", "route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)
    _write_sysctl("net/ipv4/ip_forward", "1")  # a pod reaching a Service's pod is routed on the host
    _write_sysctl("net/bridge/bridge-nf-call-iptables", "1")
    for table_chain in (CHAIN_FORWARD, CHAIN_INPUT):
        run("iptables", "-N", table_chain)
    # Routed traffic between the bridge and any other interface: dropped both ways.
    run("iptables", "-A", CHAIN_FORWARD, "-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP")
    run("iptables", "-A", CHAIN_FORWARD, "-o", BRIDGE, "!", "-i", BRIDGE, "-j", "DROP")
    run("iptables", "-I", "FORWARD", "1", "-j", CHAIN_FORWARD)
    # Pods may reach the host only for the API server and metrics-server (through their
    # Services), and answer what the host asked them.
    rules = [
        ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-p", "tcp", "-d", NODE_IP, "--dport", str(APISERVER_PORT), "-j", "ACCEPT"],
        ["-p", "tcp", "-d", NODE_IP, "--dport", str(METRICS_SERVER_PORT), "-j", "ACCEPT"],
        ["-j", "DROP"],
    ]
    for rule in rules:
        run("iptables", "-A", CHAIN_INPUT, "-i", BRIDGE, *rule)
    run("iptables", "-I", "INPUT", "1", "-j", CHAIN_INPUT)


def _proc_cmdlines() -> Iterator[tuple[int, str]]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield (
                    int(entry.name),
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"),
                )
            except OSError:
                continue


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_node_processes() -> None:
    """SIGKILLs what a node run left behind: containerd, its shims, the kubelet, kube-proxy
    and metrics-server (recognised by the node's own paths on their command line), and every
    process in the kubelet's pod cgroups (the containers)."""
    own = os.getpid()
    for pid, cmdline in _proc_cmdlines():
        if pid != own and (str(STATE_DIR) in cmdline or str(RUN_DIR) in cmdline):
            _kill(pid)
    for _ in range(20):
        pids = _pod_cgroup_pids()
        if not pids:
            break
        for pid in pids:
            _kill(pid)
        time.sleep(0.2)
    _remove_pod_cgroups()


def _pod_cgroup_roots() -> list[Path]:
    roots = [p / "kubepods" for p in Path("/sys/fs/cgroup").iterdir() if (p / "kubepods").is_dir()]
    if Path("/sys/fs/cgroup/kubepods").is_dir():
        roots.append(Path("/sys/fs/cgroup/kubepods"))
    return roots


def _pod_cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for root in _pod_cgroup_roots():
        for procs in root.rglob("cgroup.procs"):
            try:
                pids.update(int(line) for line in procs.read_text().split())
            except OSError:
                continue
    return pids


def _remove_pod_cgroups() -> None:
    for root in _pod_cgroup_roots():
        for directory in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            try:
                directory.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError as exc:
            log.warning("could not remove cgroup %s: %s", root, exc)


def _unescape_mount_path(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def unmount_node_mounts() -> None:
    """Detaches every mount under the node's directories and the pods' network namespaces."""
    prefixes = (str(STATE_DIR) + "/", str(RUN_DIR) + "/", "/run/netns/cni-", "/var/run/netns/cni-",
                "/run/containerd/")  # fmt: skip
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape_mount_path(line.split()[4])
        if point.startswith(prefixes):
            mounts.append(point)
    for point in sorted(set(mounts), key=lambda p: -len(Path(p).parts)):
        run("umount", "-l", point, check=False)
    for netns in list(Path("/run/netns").glob("cni-*")) if Path("/run/netns").is_dir() else []:
        netns.unlink(missing_ok=True)


# The chains the kubelet itself makes (kube-proxy --cleanup removes kube-proxy's, not these):
# table -> chains, in both iptables and ip6tables.
KUBELET_CHAINS = {
    "filter": ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY"),
    "nat": ("KUBE-KUBELET-CANARY",),
    "mangle": ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"),
}


def _remove_chain(tool: str, table: str, chain: str) -> None:
    """Deletes every rule jumping to `chain` in `table`, then the chain itself."""
    listed = run(tool, "-t", table, "-S", check=False).stdout.splitlines()
    for rule in listed:
        if rule.startswith("-A ") and rule.endswith(f"-j {chain}"):
            run(tool, "-t", table, "-D", *rule[3:].split(), check=False)
    if f"-N {chain}" in listed:
        run(tool, "-t", table, "-F", chain, check=False)
        run(tool, "-t", table, "-X", chain, check=False)


def teardown_network() -> None:
    for chain in (CHAIN_FORWARD, CHAIN_INPUT):
        _remove_chain("iptables", "filter", chain)
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool):
            for table, chains in KUBELET_CHAINS.items():
                for chain in chains:
                    _remove_chain(tool, table, chain)
    if run("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        for line in run("ip", "-o", "link", "show", "master", BRIDGE, check=False).stdout.splitlines():
            port = line.split(":")[1].strip().split("@")[0]
            run("ip", "link", "delete", port, check=False)
        run("ip", "link", "delete", BRIDGE, check=False)


def restore_host() -> None:
    """Puts back what the record says the machine had, and forgets the record."""
    record = HostRecord.load()
    if record is None:
        return
    for name, value in record.sysctls.items():
        if _read_sysctl(name) != value:
            _write_sysctl(name, value)
    for path in map(Path, record.absent_paths):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    RECORD.unlink(missing_ok=True)


def clean_host(kube_proxy: Path | None = None) -> None:
    """Removes everything a node run leaves on the machine, whether it ended well or died:
    processes, containers, mounts, kube-proxy's and this harness's rules, the bridge, the
    kernel settings and the directories created outside the node's roots."""
    kill_node_processes()
    unmount_node_mounts()
    if kube_proxy is not None and kube_proxy.is_file():
        # kube-proxy's own cleanup of its iptables and nftables rules.
        run(str(kube_proxy), "--cleanup", "--v=0", check=False)
    teardown_network()
    restore_host()
    for directory in (STATE_DIR, RUN_DIR):
        shutil.rmtree(directory, ignore_errors=True)


def prepare_host() -> None:
    """Records the machine's state, then makes the node's network. Call with the lock held,
    after clean_host()."""
    HostRecord.take().save()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    setup_network()
