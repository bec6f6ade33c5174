"""A real Slurm cluster on this one machine, for tests of the sbatch scripts (see tests/test_slurm_launch.py).

:func:`slurm_cluster` installs Debian's Slurm and MUNGE when missing (``apt-get``; needs root), then starts a private
``munged`` (its own key and socket), ``slurmctld`` and one ``slurmd`` per node, all configured from a temporary
directory: clients and jobs find the configuration through ``SLURM_CONF`` (in :meth:`SlurmCluster.env`), so
``/etc/slurm`` and a system ``munged`` are never touched. Ports are picked free, so it can run beside another cluster.

Nodes: ``cpu`` (default partition) holds the real host (``hostname -s``, or ``localhost`` when that does not resolve)
with ``cpus`` CPUs; ``gpu`` holds ``gpu_nodes`` simulated GPU nodes (``gpu1``, ...; 8 GPUs on character devices, 64 CPUs
each, ``SlurmdParameters=config_overrides``) for launching the multi-node scripts with stub programs.

Tear-down cancels every job, waits for the queue to drain and stops only the daemons this harness started (by their
pid files, checking each pid's command line first), then removes the directory.

If Slurm cannot be installed or started here, :class:`SlurmUnavailable` explains why; :func:`require_slurm` turns that
into a skip of the ``slurm`` test tier (a failure under ``LUFFY_REQUIRE_ALL_TIERS=1``, see tests/tiers.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from luffy_megatron.platform.ports import free_port

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN = Path("/usr/sbin")
GPUS_PER_NODE = 8
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the local Slurm cluster (the message says why)."""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = SBIN / name
    return str(candidate) if candidate.is_file() else None


def _missing_binaries() -> list[str]:
    return [b for b in ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "munged", "munge") if not _binary(b)]


def ensure_installed(timeout: float = 300) -> None:
    """Install Slurm and MUNGE with apt-get when any binary is missing (root only)."""
    missing = _missing_binaries()
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
    )
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(
                f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            )
    missing = _missing_binaries()
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but {', '.join(missing)} still missing")


def _host_node_name() -> str:
    """``hostname -s`` when it resolves (jobs use it as MASTER_ADDR), else ``localhost``."""
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


def _own(path: Path, user: str, mode: int) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(mode)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie that is our child counts as gone.
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Daemon:
    name: str  # for messages
    binary: str  # checked against /proc/PID/cmdline before any signal is sent
    pid_file: Path
    pid: int | None = None

    def read_pid(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # IndexError: the pid file exists but the daemon has not written its pid yet.
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(self.pid_file.read_text().split()[0])
                if _pid_alive(pid) and self.binary in _cmdline(pid):
                    self.pid = pid
                    return pid
            time.sleep(0.05)
        raise SlurmUnavailable(f"{self.name} did not start (no live pid in {self.pid_file})")

    def stop(self, timeout: float = 15.0) -> None:
        pid = self.pid
        if pid is None or not _pid_alive(pid) or self.binary not in _cmdline(pid):
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.05)
        self.pid = None


@dataclass
class SlurmCluster:
    root: Path
    host_node: str
    gpu_node_names: list[str]
    daemons: list[Daemon] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def nodes(self) -> list[str]:
        return [self.host_node, *self.gpu_node_names]

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """Environment for Slurm clients (and, since sbatch exports it, for the jobs they start)."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        for key in list(env):  # a surrounding allocation must not leak into this cluster's commands
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del env[key]
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        kwargs.setdefault("env", self.env())
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}\n{self.logs()}")
        return proc

    def node_states(self) -> dict[str, str]:
        proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
        return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as key -> value (JobState, ExitCode, StdOut, NodeList, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        fields = {}
        for token in out.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def submit(
        self, script: str | Path, *args: str, options: tuple[str, ...] = (), cwd: Path, env: dict | None = None
    ) -> subprocess.Popen:
        """Start ``sbatch --wait --parsable OPTIONS SCRIPT ARGS`` from ``cwd``; :meth:`finish` collects it. Jobs
        submitted one after another this way run side by side when the nodes have room."""
        cmd = ["sbatch", "--wait", "--parsable", *options, str(script), *args]
        return subprocess.Popen(
            cmd, cwd=cwd, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def finish(self, proc: subprocess.Popen, timeout: float = 300) -> tuple[int, int, dict[str, str]]:
        """Wait for a :meth:`submit`; returns (job id, sbatch's exit code, the finished job's ``scontrol`` fields)."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"{' '.join(proc.args)}: not done after {timeout:.0f} s: {out}{err}") from None
        first = out.strip().splitlines()[:1]
        if not first or not first[0].split(";")[0].isdigit():
            raise RuntimeError(f"{' '.join(proc.args)}: no job id ({proc.returncode}): {out}{err}")
        job_id = int(first[0].split(";")[0])
        deadline = time.monotonic() + 60
        while True:  # sbatch --wait can return while the job is still COMPLETING (its steps being cleaned up)
            info = self.job(job_id)
            if info.get("JobState") not in ACTIVE_STATES or time.monotonic() > deadline:
                return job_id, proc.returncode, info
            time.sleep(0.1)

    def sbatch(self, script: str | Path, *args: str, timeout: float = 300, **kwargs) -> tuple[int, int, dict]:
        """``sbatch --wait``: (job id, exit code, ``scontrol show job`` fields once the job has finished)."""
        return self.finish(self.submit(script, *args, **kwargs), timeout)

    def logs(self, lines: int = 30) -> str:
        """The tail of every daemon log, for assertion messages."""
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            with contextlib.suppress(OSError):
                parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.node_states()
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            if time.monotonic() > deadline:
                raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")
            time.sleep(0.2)

    def cancel_all(self, timeout: float = 60) -> None:
        """scancel every job and wait for the queue to empty."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
        if jobs:
            self.run("scancel", *jobs, check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
            if proc.returncode != 0 or not proc.stdout.strip():
                return
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel jobs, stop the daemons this harness started (slurmd, slurmctld, munged), remove the directory."""
        try:
            if any(d.pid for d in self.daemons if d.name == "slurmctld"):
                self.cancel_all()
        finally:
            for daemon in reversed(self.daemons):  # slurmd(s), then slurmctld, then munged
                daemon.stop()
            shutil.rmtree(self.root, ignore_errors=True)


def _write_conf(root: Path, host: str, cpus: int, gpu_nodes: list[str], munge_socket: Path) -> None:
    ctld_port, ports = free_port(), [free_port() for _ in range(1 + len(gpu_nodes))]
    lines = [
        "ClusterName=luffytest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=slurm",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobCompType=jobcomp/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "GresTypes=gpu",
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "KillWait=5",
        "MinJobAge=300",
        f"NodeName={host} NodeAddr=127.0.0.1 Port={ports[0]} CPUs={cpus} RealMemory=1000 State=UNKNOWN",
    ]
    gres = []
    for name, port in zip(gpu_nodes, ports[1:]):
        lines.append(
            f"NodeName={name} NodeAddr=127.0.0.1 Port={port} CPUs=64 RealMemory=1000 "
            f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN"
        )
        gres.append(f"NodeName={name} Name=gpu File={root}/dev/nvidia[0-{GPUS_PER_NODE - 1}]")
    lines.append(f"PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP")
    if gpu_nodes:
        lines.append(f"PartitionName=gpu Nodes={','.join(gpu_nodes)} MaxTime=INFINITE State=UP")
    (root / "etc" / "slurm.conf").write_text("\n".join(lines) + "\n")
    (root / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")


def start_cluster(cpus: int = 4, gpu_nodes: int = 0, timeout: float = 60) -> SlurmCluster:
    """Install when needed, then start munged, slurmctld and the slurmd(s); returns once every node is idle."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the local Slurm cluster needs root (slurmd runs jobs as their users)")
    ensure_installed()
    for user in ("slurm", "munge"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise SlurmUnavailable(f"user {user!r} does not exist (the Debian packages create it)") from None
    root = Path(tempfile.mkdtemp(prefix="luffy-slurm-"))
    root.chmod(0o755)  # the slurm and munge users must reach their directories
    host = _host_node_name()
    cluster = SlurmCluster(root, host, [f"gpu{i + 1}" for i in range(gpu_nodes)])
    try:
        _start(cluster, cpus, timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start(cluster: SlurmCluster, cpus: int, timeout: float) -> None:
    root = cluster.root
    # A private munged: its own key, socket and pid file; a system one (if any) is left alone.
    munge_dir = root / "munge"
    munge_dir.mkdir()
    key = munge_dir / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    _own(key, "munge", 0o400)
    _own(munge_dir, "munge", 0o755)  # slurm reaches the socket; the key stays 0400
    sock = munge_dir / "munge.socket"
    munged = Daemon("munged", "munged", munge_dir / "munged.pid")
    cluster.daemons.append(munged)
    subprocess.run(
        [
            "runuser",
            "-u",
            "munge",
            "--",
            _binary("munged"),
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--pid-file={munged.pid_file}",
            f"--seed-file={munge_dir / 'munged.seed'}",
            f"--log-file={munge_dir / 'munged.log'}",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    munged.read_pid()
    cred = subprocess.run([_binary("munge"), "-n", "-S", str(sock)], capture_output=True, timeout=10)
    check = subprocess.run(["unmunge", "-S", str(sock)], input=cred.stdout, capture_output=True, timeout=10)
    if check.returncode != 0:
        raise SlurmUnavailable(f"munge does not work: {check.stderr.decode(errors='replace')}")

    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir()
        _own(root / sub, "slurm", 0o755)
    for node in cluster.nodes:
        (root / "spool" / node).mkdir()
    (root / "etc").mkdir(mode=0o755)
    if cluster.gpu_node_names:
        (root / "dev").mkdir()
        for i in range(GPUS_PER_NODE):  # slurmd accepts character devices only; these are copies of /dev/null
            os.mknod(root / "dev" / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    _write_conf(root, cluster.host_node, cpus, cluster.gpu_node_names, sock)
    env = cluster.env()

    ctld = Daemon("slurmctld", "slurmctld", root / "run" / "slurmctld.pid")
    cluster.daemons.append(ctld)
    subprocess.run([_binary("slurmctld"), "-f", str(cluster.conf)], check=True, env=env, timeout=30)
    ctld.read_pid()
    for node in cluster.nodes:
        slurmd = Daemon(f"slurmd {node}", "slurmd", root / "run" / f"slurmd-{node}.pid")
        cluster.daemons.append(slurmd)
        subprocess.run([_binary("slurmd"), "-f", str(cluster.conf), "-N", node], check=True, env=env, timeout=30)
        slurmd.read_pid()
    cluster.wait_idle(timeout)


@contextlib.contextmanager
def slurm_cluster(cpus: int = 4, gpu_nodes: int = 0, timeout: float = 60) -> Iterator[SlurmCluster]:
    cluster = start_cluster(cpus=cpus, gpu_nodes=gpu_nodes, timeout=timeout)
    try:
        yield cluster
    finally:
        cluster.stop()


def require_slurm(**kwargs) -> contextlib.AbstractContextManager[SlurmCluster]:
    """:func:`slurm_cluster` for pytest: on a machine that cannot run it, the ``slurm`` tier is skipped with the
    reason (or fails, when every tier is required)."""
    from tests.tiers import skip_tier

    try:
        cluster = start_cluster(**kwargs)
    except SlurmUnavailable as e:
        skip_tier("slurm", f"cannot run a local Slurm cluster: {' '.join(str(e).split())[:300]}")

    @contextlib.contextmanager
    def managed() -> Iterator[SlurmCluster]:
        try:
            yield cluster
        finally:
            cluster.stop()

    return managed()
