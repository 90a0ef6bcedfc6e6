"""Multi-node runs for real: two "hosts" on this machine, reached over ssh by pdsh, and the no-ssh mode.

Each host is a network namespace (its own address on a veth link named `vimpac0` on both sides) with its own
sshd, started in its own PID namespace, so that what DeepSpeed's launcher runs "on a host" (its pkill -f
included) sees that host's processes only. Code, venv and data are shared through the file system, as a shared
home or NFS would be on a cluster. The launches go through scripts/multinode/launch.sh.

Checked: a pdsh launch over the two hosts trains with world size 2 and ranks on both hosts, and its loss curve is
the one of a 2-rank run on one host; the no-ssh mode (the same command on each host with its node rank) gives
the same curve; launch.sh refuses, before anything starts, a hostfile that does not parse and a host that does
not answer ssh; when one host's rank is killed mid-run the other host stops within a bound and the last
checkpoint is complete.

Needs root, `ip netns`, sshd and pdsh (.ci/run installs them); the tests that need the two hosts skip without
them. Gloo takes the address its hostname resolves to unless GLOO_SOCKET_IFNAME names the interface; the
namespaces share this machine's hostname (127.0.x.x), hence GLOO_SOCKET_IFNAME=vimpac0 on both hosts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers import DEEPSPEED, REPO
from tests.synthetic_codes import FRAME_SIZE, VOCAB, write_code_database
from vimpac.checkpoint import checkpoint_root, latest_tag
from vimpac.dist_setup import free_port
from vimpac.metrics import read_metrics

LAUNCH = REPO / "scripts" / "multinode" / "launch.sh"
IFNAME = "vimpac0"  # the veth end in each namespace: the same name on both hosts, for GLOO_SOCKET_IFNAME
MODEL = ["--layers", "2", "--hid-dim", "64", "--heads", "2", "--clip-len", "4", "--nce-proj-hid-dim", "64"]
MODEL += ["--vocab-size", str(VOCAB), "--frame-size", str(FRAME_SIZE), "--mask-blocks", "2"]
RUN = ["--deepspeed_config", "ds_configs/cpu.json", "--zero-stage", "2", "--batch-size", "16", "--bs-per-gpu", "4"]
RUN += ["--num-workers", "0", "--lr", "1e-2", "--warm-up", "0.1"]
EPOCHS = ["--epochs", "3"]  # 16 videos, batches of 16: one step per epoch
LOSSES = ("loss/total", "loss/mlm", "loss/nce", "accuracy/mlm", "accuracy/nce")
TOOLS = ("ip", "unshare", "ssh", "ssh-keygen", "pdsh")
SSHD = "/usr/sbin/sshd"


def run_quiet(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def base_environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=str(Path(sys.prefix) / "torch_extensions"),  # one build of DeepSpeed's ops per venv
        PYTHON=sys.executable,
        HOME=str(home),  # no ~/.deepspeed_env of the person running the tests
    )
    return env


@dataclass
class Hosts:
    """Two namespaces with an sshd each; `env` makes pdsh and launch.sh use the test's ssh client settings."""

    names: tuple[str, str]
    addresses: tuple[str, str]
    unreachable: str  # an address on the link where nothing answers
    env: dict[str, str]
    tmp: Path

    def hostfile(self, text: str | None = None) -> Path:
        path = self.tmp / f"hostfile-{time.monotonic_ns()}"
        path.write_text(text if text is not None else "".join(f"{a} slots=1\n" for a in self.addresses))
        return path

    def inside(self, node: int, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.names[node], *argv]

    def pids(self, node: int) -> list[int]:
        result = run_quiet("ip", "netns", "pids", self.names[node], check=False)
        return [int(pid) for pid in result.stdout.split()]


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root (ip netns, sshd)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None] + ([] if os.path.exists(SSHD) else [SSHD])
    if missing:
        return f"missing {', '.join(missing)} (apt-get install openssh-server pdsh)"
    probe = run_quiet("unshare", "--pid", "--fork", "--mount-proc", "true", check=False)
    if probe.returncode != 0:
        return f"cannot make a PID namespace: {probe.stderr.strip()}"
    return None


def _remove_stale_namespaces() -> None:
    """Namespaces left by an earlier session of this module that was killed before its teardown."""
    for line in run_quiet("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        prefix, _, pid = name.rpartition("-")
        if prefix in ("vimpac-n0", "vimpac-n1") and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for process in run_quiet("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(process), signal.SIGKILL)
            run_quiet("ip", "netns", "delete", name, check=False)


def _sshd_config(tmp: Path, node: int, address: str) -> Path:
    path = tmp / f"sshd{node}.conf"
    path.write_text(
        f"ListenAddress {address}\nPort 22\nHostKey {tmp / 'host_key'}\nPidFile {tmp / f'sshd{node}.pid'}\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nAuthorizedKeysFile {tmp / 'authorized_keys'}\nStrictModes no\n"
        "UsePAM no\nPrintMotd no\nMaxStartups 100\nLogLevel ERROR\n"
    )
    return path


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    _remove_stale_namespaces()
    pid = os.getpid()
    names = (f"vimpac-n0-{pid}", f"vimpac-n1-{pid}")
    subnet = f"10.213.{pid % 250}"
    addresses = (f"{subnet}.1", f"{subnet}.2")
    tmp = tmp_path_factory.mktemp("hosts")
    created: list[str] = []
    sshds: list[subprocess.Popen] = []
    try:
        for name in names:
            result = run_quiet("ip", "netns", "add", name, check=False)
            if result.returncode != 0:
                pytest.skip(f"ip netns add failed: {result.stderr.strip()}")
            created.append(name)
        # One veth pair, created straight inside the namespaces, each end then renamed to the same IFNAME.
        run_quiet("ip", "link", "add", "vmpa", "netns", names[0], "type", "veth", "peer", "vmpb", "netns", names[1])
        for name, end, address in zip(names, ("vmpa", "vmpb"), addresses):
            run_quiet("ip", "-n", name, "link", "set", end, "name", IFNAME)
            run_quiet("ip", "-n", name, "addr", "add", f"{address}/24", "dev", IFNAME)
            run_quiet("ip", "-n", name, "link", "set", IFNAME, "up")
            run_quiet("ip", "-n", name, "link", "set", "lo", "up")

        run_quiet("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / "host_key"))
        run_quiet("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vimpac-test", "-f", str(tmp / "client_key"))
        shutil.copy(tmp / "client_key.pub", tmp / "authorized_keys")
        ssh_config = tmp / "ssh_config"
        ssh_config.write_text(
            f"Host *\n  IdentityFile {tmp / 'client_key'}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
        )
        try:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        except OSError as error:
            pytest.skip(f"cannot create /run/sshd: {error}")
        for node, (name, address) in enumerate(zip(names, addresses)):
            config = _sshd_config(tmp, node, address)
            # Its own PID namespace (sshd is its init: killing it kills whatever runs "on that host").
            argv = ["ip", "netns", "exec", name, "unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
            with open(tmp / f"sshd{node}.log", "w") as log:
                sshds.append(subprocess.Popen([*argv, SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log))

        home = tmp / "home"
        home.mkdir()
        env = base_environment(home)
        # pdsh's ssh module appends these to every ssh it runs; launch.sh uses them for its own ssh checks. (A
        # HOME holding .ssh/config does not work: ssh reads the home directory of the passwd entry, not $HOME.)
        env.update(PDSH_SSH_ARGS_APPEND=f"-F {ssh_config}", GLOO_SOCKET_IFNAME=IFNAME)
        found = Hosts(names, addresses, f"{subnet}.99", env, tmp)
        deadline = time.monotonic() + 20
        for address in addresses:
            probe = found.inside(0, "ssh", "-F", str(ssh_config), "-o", "ConnectTimeout=2", address, "true")
            while subprocess.run(probe, capture_output=True, timeout=30).returncode != 0:
                logs = "".join((tmp / f"sshd{n}.log").read_text() for n in range(2))
                assert time.monotonic() < deadline, f"sshd on {address} does not answer: {logs}"
                time.sleep(0.2)
        yield found
    finally:
        for sshd in sshds:
            sshd.kill()  # unshare --kill-child: sshd, init of its PID namespace, dies, and with it that "host"
            sshd.wait(timeout=30)
        for name in created:
            for process in run_quiet("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(process), signal.SIGKILL)  # started by these tests (the namespace is ours)
            run_quiet("ip", "netns", "delete", name, check=False)  # deletes the veth pair with it


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    return write_code_database(tmp_path_factory.mktemp("db") / "db", videos=16)


def entry_flags(database: Path, output: Path, *extra: str) -> list[str]:
    return ["vimpac/pretrain.py", "--data", str(database), "--output", str(output), *MODEL, *RUN, *extra]


@pytest.fixture(scope="module")
def single_host(database, tmp_path_factory):
    """The same run as 2 ranks on one host (deepspeed --num_gpus 2): the curve the two-host runs must follow."""
    root = tmp_path_factory.mktemp("single")
    command = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port())]
    command += entry_flags(database, root / "out", *EPOCHS)
    start = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=base_environment(root), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(f"single host, 2 ranks: {time.monotonic() - start:.1f} s")
    return read_metrics(root / "out")


def assert_same_curve(actual: dict[int, dict], expected: dict[int, dict], rtol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected) and expected
    for step in expected:
        for name in LOSSES:
            assert actual[step][name] == pytest.approx(expected[step][name], rel=rtol, abs=rtol * 1e-3), (step, name)


def launch(hosts: Hosts, hostfile: Path, *flags: str, node: int = 0) -> list[str]:
    """launch.sh run on a host (the first one for a pdsh launch, which starts every host from there)."""
    return hosts.inside(node, "bash", str(LAUNCH), str(hostfile), hosts.addresses[0], *flags)


@pytest.mark.slow
def test_pdsh_launch_over_two_hosts_matches_one_host(hosts, database, single_host, tmp_path):
    output = tmp_path / "out"
    env = {**hosts.env, "MASTER_PORT": "29510"}
    start = time.monotonic()
    result = subprocess.run(
        launch(hosts, hosts.hostfile(), *entry_flags(database, output, *EPOCHS)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    (tmp_path / "launch.log").write_text(log)
    print(f"pdsh over two hosts: {time.monotonic() - start:.1f} s")
    assert result.returncode == 0, log[-5000:]
    assert json.loads((output / "run_config.json").read_text())["world_size"] == 2
    # launch.sh's .deepspeed_env reached the remote command
    assert "export DS_ACCELERATOR=cpu;" in log and f"export GLOO_SOCKET_IFNAME={IFNAME};" in log
    # pdsh prefixes every line with the host it came from: each host's launcher started its rank, and it ended well
    for node, address in enumerate(hosts.addresses):
        lines = [line for line in log.splitlines() if line.startswith(f"{address}: ")]
        assert any(f"nnodes=2, num_local_procs=1, node_rank={node}" in line for line in lines), log[-5000:]
        assert any("exits successfully" in line for line in lines), log[-5000:]
    assert_same_curve(read_metrics(output), single_host)


@pytest.mark.slow
def test_no_ssh_mode_runs_the_same_command_on_each_host(hosts, database, single_host, tmp_path):
    output = tmp_path / "out"
    hostfile = hosts.hostfile()
    start = time.monotonic()
    processes = [
        subprocess.Popen(
            launch(hosts, hostfile, *entry_flags(database, output, *EPOCHS), node=node),
            cwd=REPO,
            env={**hosts.env, "MASTER_PORT": "29520", "NO_SSH": "1", "NODE_RANK": str(node)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    logs = [process.communicate(timeout=300)[0] for process in processes]
    print(f"no-ssh, two hosts: {time.monotonic() - start:.1f} s")
    for process, log in zip(processes, logs):
        assert process.returncode == 0, log[-4000:]
    assert "node rank 1 of 2" in logs[1] and "exits successfully" in logs[1]
    assert json.loads((output / "run_config.json").read_text())["world_size"] == 2
    assert_same_curve(read_metrics(output), single_host)


@pytest.mark.slow
def test_unreachable_host_is_refused_before_anything_starts(hosts, database, tmp_path):
    output = tmp_path / "out"
    hostfile = hosts.hostfile(f"# the second node is down\n{hosts.addresses[0]} slots=1\n{hosts.unreachable} slots=1\n")
    start = time.monotonic()
    result = subprocess.run(
        launch(hosts, hostfile, *entry_flags(database, output, *EPOCHS)),
        cwd=REPO,
        env=hosts.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    print(f"unreachable host refused in {elapsed:.1f} s")
    assert result.returncode != 0 and elapsed < 30
    assert f"host {hosts.unreachable} does not answer" in result.stderr
    assert "not launching" in result.stderr and "deepspeed.launcher" not in result.stdout + result.stderr
    assert not output.exists()


@pytest.mark.slow
def test_host_filters_choose_where_the_ranks_run(hosts):
    """EXCLUDE drops the dead host from the checks and the run; INCLUDE / NUM_NODES leaving one host run there
    through pdsh (launch.sh passes --force_multi: DeepSpeed would otherwise run a one-host job locally)."""
    first, second = hosts.addresses
    hostfile = hosts.hostfile(f"{first} slots=1\n{hosts.unreachable} slots=1\n{second} slots=1\n")
    for extra, expected in (({"EXCLUDE": hosts.unreachable}, [first, second]), ({"INCLUDE": second}, [second])):
        result = subprocess.run(
            hosts.inside(0, "bash", str(LAUNCH), str(hostfile), first, "vimpac/pretrain.py", "--help"),
            cwd=REPO,
            env={**hosts.env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, (extra, result.stdout[-3000:] + result.stderr[-3000:])
        usage = [line for line in result.stdout.splitlines() if "usage: vimpac/pretrain.py" in line]
        # pdsh prefixes each line with its host; a local run would print "usage: ..." bare
        assert sorted(line.split(": ", 1)[0] for line in usage) == expected, (extra, result.stdout[-3000:])


@pytest.mark.slow
def test_killed_rank_on_one_host_stops_the_other_and_keeps_the_checkpoint(hosts, database, tmp_path):
    output = tmp_path / "out"
    env = {**hosts.env, "MASTER_PORT": "29530", "FAILURE_GRACE_S": "20"}
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            launch(hosts, hosts.hostfile(), *entry_flags(database, output, "--epochs", "40", "--save-steps", "1")),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        while latest_tag(output) is None:
            assert process.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        ranks = [pid for pid in hosts.pids(1) if "--local_rank=" in _cmdline(pid)]
        assert len(ranks) == 1, ranks
        os.kill(ranks[0], signal.SIGKILL)
        killed = time.monotonic()
        process.wait(timeout=150)
        stopped = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    print(f"rank on host 2 killed: launch.sh ended {stopped:.1f} s later")
    assert process.returncode != 0, log[-4000:]
    assert stopped < 120, log[-4000:]
    assert not [pid for node in range(2) for pid in hosts.pids(node) if _is_training(pid)], "ranks left running"
    assert max(read_metrics(output)) < 40, "the run went on"
    # The newest complete checkpoint loads: every rank's files, DeepSpeed's and ours.
    tag = latest_tag(output)
    assert tag is not None
    folder = checkpoint_root(output) / tag
    files = sorted(folder.iterdir())
    names = {file.name for file in files}
    assert {"rng_rank0.pt", "rng_rank1.pt", "mp_rank_00_model_states.pt"} <= names, names
    assert sum(name.endswith("optim_states.pt") for name in names) == 2, names
    for file in files:
        if file.suffix == ".pt":
            torch.load(file, map_location="cpu", weights_only=False)


@pytest.mark.slow
def test_node_failing_at_start_up_is_stopped_on_every_host(hosts, database, tmp_path):
    """Gloo on the wrong interface (lo: each rank offers 127.0.0.1 to the other host): one host's rank fails to
    connect, the other waits for it past DeepSpeed's 10-minute timeout. pdsh waits for that host; launch.sh
    stops every host FAILURE_GRACE_S after the first failure (the runner's SIGTERM handler: pkill on each host)."""
    output = tmp_path / "out"
    env = {**hosts.env, "MASTER_PORT": "29540", "FAILURE_GRACE_S": "5", "GLOO_SOCKET_IFNAME": "lo"}
    start = time.monotonic()
    result = subprocess.run(
        launch(hosts, hosts.hostfile(), *entry_flags(database, output, *EPOCHS)),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.monotonic() - start
    log = result.stdout + result.stderr
    (tmp_path / "launch.log").write_text(log)
    print(f"start-up failure: every host stopped after {elapsed:.1f} s")
    assert result.returncode != 0, log[-4000:]
    assert "ssh exited with exit code" in log and "stopping every node" in log, log[-4000:]
    assert elapsed < 120, log[-4000:]
    deadline = time.monotonic() + 30  # the node launchers give their ranks SIGTERM, then SIGKILL after 30 s
    while [pid for node in range(2) for pid in hosts.pids(node) if _is_training(pid)]:
        assert time.monotonic() < deadline, "ranks left running"
        time.sleep(0.2)
    assert not output.joinpath("metrics.jsonl").exists()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:  # gone meanwhile
        return ""


def _is_training(pid: int) -> bool:
    return "vimpac/pretrain.py" in _cmdline(pid)


# --- hostfile checks: no host, no root needed ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node1 slots=2\nnode2\n", "2: expected 'HOST slots=N', got: node2"),
        ("node1 slots=two\n", "1: expected 'HOST slots=N'"),
        ("node1 slots=1 node2 slots=1\n", "1: expected 'HOST slots=N'"),
        ("# nothing here\n\n", "names no host"),
        ("node1 slots=1\nnode1 slots=2\n", "host node1 is listed twice"),
        ("node1 slots=0\n", "host node1 has slots=0"),
    ],
)
def test_hostfile_that_does_not_parse_is_refused(tmp_path, text, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    env = base_environment(tmp_path)
    result = subprocess.run(
        ["bash", str(LAUNCH), str(hostfile), "node1", "vimpac/pretrain.py", "--output", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "launch.sh: error:" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_hostfile_and_bad_filters_are_refused(tmp_path):
    """DeepSpeed's runner trains on this machine alone when the hostfile is missing; launch.sh refuses."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    cases = [
        ({}, str(tmp_path / "nowhere"), "does not exist"),
        ({"INCLUDE": "node3"}, str(hostfile), "host 'node3' in 'node3' is not in"),
        ({"NUM_NODES": "3"}, str(hostfile), "NUM_NODES=3 but"),
        ({"NUM_NODES": "1", "EXCLUDE": "node2"}, str(hostfile), "set only one of"),
        ({"NO_SSH": "1"}, str(hostfile), "NO_SSH=1 needs NODE_RANK"),
        ({"NO_SSH": "1", "NODE_RANK": "2"}, str(hostfile), "NODE_RANK=2 but the run has 2 nodes"),
        ({"NO_SSH": "1", "NODE_RANK": "1", "EXCLUDE": "node2"}, str(hostfile), "the run has 1 nodes"),
    ]
    for extra, path, message in cases:
        env = {**base_environment(tmp_path), **extra}
        result = subprocess.run(
            ["bash", str(LAUNCH), path, "node1", "vimpac/pretrain.py"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
