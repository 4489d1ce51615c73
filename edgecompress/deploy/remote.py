"""Benchmark an artifact on the device it is for, over SSH.

``--device user@host[:port]`` copies the artifact and the stand-alone runner
(``edgecompress/runtimes/runner.py``, numpy and the runtime are all it needs)
into a fresh temporary directory on the device, runs it there, brings back its
JSON and its raw log, and removes the directory, whatever happened. How a
runtime measures on the device is its own (``Runtime.benchmark_on_device``):
TensorRT runs ``trtexec`` there and parses its summary (edgecompress.deploy.trtexec).

Security: the host key is checked against known_hosts (``~/.ssh/known_hosts``
or ``--known-hosts FILE``); an unknown host is refused unless
``--accept-new-host-key`` is given, which records the key in that file. A key
that differs from the recorded one is always refused. Remote commands are
built with ``shlex.join`` from separate arguments, so no file or model name
reaches the remote shell unquoted. Nothing about keys or passwords is written
to reports or logs.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import socket
import time
from pathlib import Path

from edgecompress.core.errors import DeviceError, UsageError

RUNNER = Path(__file__).parents[1] / "runtimes" / "runner.py"
COPY_RETRIES = 3
_DEVICE = re.compile(r"^(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>\d+))?$")


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


def parse_device(text: str) -> DeviceSpec:
    m = _DEVICE.match(text or "")
    if not m:
        raise UsageError(f"--device {text!r}: expected user@host or user@host:port (IPv6 as user@[::1]:2222)")
    port = int(m["port"] or 22)
    if not 0 < port < 65536:
        raise UsageError(f"--device {text!r}: port {port} is out of range")
    return DeviceSpec(m["user"], m["host"].strip("[]"), port)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SshOptions:
    identity: Path | None = None
    known_hosts: Path | None = None
    accept_new_host_key: bool = False
    python: str = "python3"  # the device's interpreter (a venv's python on many boards)
    trtexec: str | None = None  # trtexec on the device; None: PATH, then JetPack's /usr/src/tensorrt/bin
    connect_timeout: float = 10.0

    def __post_init__(self):
        if self.identity is not None and not Path(self.identity).is_file():
            raise UsageError(f"--identity {self.identity}: no such file")
        if self.known_hosts is not None and not self.accept_new_host_key and not Path(self.known_hosts).is_file():
            raise UsageError(f"--known-hosts {self.known_hosts}: no such file (pass --accept-new-host-key to create it)")

    def known_hosts_path(self) -> Path:
        return Path(self.known_hosts) if self.known_hosts else Path.home() / ".ssh" / "known_hosts"


class Connection:
    """One SSH connection to the device (paramiko), with errors turned into one clear line."""

    def __init__(self, device: DeviceSpec, options: SshOptions):
        self.device, self.options = device, options
        self.client = None

    def __enter__(self) -> "Connection":
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self) -> None:
        import paramiko

        client = paramiko.SSHClient()
        known = self.options.known_hosts_path()
        if self.options.accept_new_host_key:
            known.parent.mkdir(parents=True, exist_ok=True)
            known.touch(exist_ok=True)  # loaded below, so new keys are saved to this file
        if known.is_file():
            client.load_host_keys(str(known))
        client.set_missing_host_key_policy(
            paramiko.AutoAddPolicy() if self.options.accept_new_host_key else paramiko.RejectPolicy())
        d = self.device
        try:
            client.connect(
                d.host, port=d.port, username=d.user,
                key_filename=str(self.options.identity) if self.options.identity else None,
                look_for_keys=self.options.identity is None, allow_agent=self.options.identity is None,
                timeout=self.options.connect_timeout, banner_timeout=self.options.connect_timeout,
                auth_timeout=self.options.connect_timeout,
            )
        except paramiko.BadHostKeyException:
            raise DeviceError(f"{d}: the host key does not match the one recorded in {known}; refusing to connect "
                              "(if the device was reinstalled, remove its old entry with ssh-keygen -R)") from None
        except paramiko.AuthenticationException:
            how = f"key {self.options.identity}" if self.options.identity else "your SSH agent and default keys"
            raise DeviceError(f"{d}: authentication failed with {how}") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise DeviceError(f"{d}: host key not in {known}; check it and add it (ssh-keyscan -p {d.port} {d.host}), "
                                  "or pass --accept-new-host-key") from None
            raise DeviceError(f"{d}: SSH failed: {exc}") from None
        except (OSError, socket.timeout, EOFError) as exc:
            raise DeviceError(f"{d}: cannot connect: {exc.strerror or exc}" if isinstance(exc, OSError) and exc.strerror
                              else f"{d}: cannot connect: {exc or type(exc).__name__}") from None
        self.client = client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self, args: list[str], *, timeout: float = 600.0) -> tuple[int, str, str]:
        """Run one command built from separate arguments (quoted; no shell injection)."""
        return self.run_shell(shlex.join(args), timeout=timeout)

    def run_shell(self, command: str, *, timeout: float = 600.0) -> tuple[int, str, str]:
        try:
            _, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            out = stdout.read().decode(errors="replace")
            err = stderr.read().decode(errors="replace")
            return stdout.channel.recv_exit_status(), out, err
        except (OSError, EOFError, socket.timeout) as exc:
            raise DeviceError(f"{self.device}: connection lost while running {command.split()[0]}: {exc}") from None

    def put(self, local: Path, remote: str) -> None:
        """Copy one file, reconnecting and retrying when the connection drops mid-copy."""
        import paramiko

        for attempt in range(1, COPY_RETRIES + 1):
            try:
                with self.client.open_sftp() as sftp:
                    sftp.put(str(local), remote)
                    if sftp.stat(remote).st_size != local.stat().st_size:
                        raise EOFError("size mismatch after copy")
                return
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if attempt == COPY_RETRIES:
                    raise DeviceError(f"{self.device}: copying {local.name} failed {COPY_RETRIES} times: "
                                      f"{exc or type(exc).__name__}") from None
                time.sleep(0.5 * attempt)
                self.close()
                self.connect()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceJob:
    """What to measure on the device."""

    artifact: Path  # the local artifact (the runtime reads its precision and shape where it needs them)
    warmup: int
    runs: int
    rounds: int = 10
    precision: str | None = None  # None: the runtime reads it from the artifact
    sparse: bool = False  # build with the device's sparse kernels
    eval_npz: Path | None = None  # images and labels to score there (runtimes that can)
    log_dir: Path | None = None  # where the device's raw log is kept


def remote_benchmark(device: DeviceSpec, options: SshOptions, runtime, job: DeviceJob) -> dict:
    """Copy the artifact's files to a fresh directory on the device, let the runtime measure there, clean up."""
    with Connection(device, options) as conn:
        rc, out, err = conn.run(["mktemp", "-d", "/tmp/edgecompress.XXXXXXXX"], timeout=30)
        workdir = out.strip()
        if rc != 0 or not workdir.startswith("/tmp/edgecompress."):
            raise DeviceError(f"{device}: cannot create a temporary directory: {err.strip() or out.strip()}")
        try:
            for f in runtime.artifact_files(job.artifact):
                conn.put(f, f"{workdir}/{f.name}")
            result = runtime.benchmark_on_device(conn, workdir, f"{workdir}/{job.artifact.name}", job)
        finally:
            conn.run(["rm", "-rf", "--", workdir], timeout=60)
    return {**result, "device": str(device)}


def run_runner_on_device(conn: "Connection", workdir: str, runtime_name: str, remote_artifact: str, job: DeviceJob) -> dict:
    """The stand-alone runner on the device (numpy and the runtime are all it needs); returns its JSON."""
    import json

    conn.put(RUNNER, f"{workdir}/runner.py")
    args = [conn.options.python, f"{workdir}/runner.py", "--runtime", runtime_name, "--artifact", remote_artifact,
            "--warmup", str(job.warmup), "--runs", str(job.runs), "--rounds", str(job.rounds)]
    if job.eval_npz is not None:
        conn.put(job.eval_npz, f"{workdir}/eval.npz")
        args += ["--eval-npz", f"{workdir}/eval.npz"]
    rc, out, err = conn.run(args)
    keep_log(job.log_dir, args, out, err)
    if rc != 0:
        raise DeviceError(f"{conn.device}: the benchmark runner failed (exit {rc}): {last_line(err or out)}")
    return json.loads(out.strip().splitlines()[-1])


def keep_log(log_dir: Path | None, args: list[str], out: str, err: str) -> None:
    if log_dir is not None:
        (log_dir / "device.log").write_text(f"$ {shlex.join(args)}\n{out}{err}")


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
