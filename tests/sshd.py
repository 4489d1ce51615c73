"""A real OpenSSH server on 127.0.0.1 for the --device tests: throw-away host key, user key and config.

Debian's openssh-server provides /usr/sbin/sshd (.ci/run installs it). The server
runs in the foreground of a child process on a free port and is killed at the end.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclasses.dataclass
class LoopbackSshd:
    port: int
    user: str
    identity: Path  # the user's private key
    known_hosts: Path  # holds the server's real host key
    host_key_pub: str
    process: subprocess.Popen
    log: Path

    @property
    def device(self) -> str:
        return f"{self.user}@127.0.0.1:{self.port}"


def available() -> str | None:
    """None when a loopback sshd can be started here, else the reason it cannot."""
    if not Path(SSHD).is_file():
        return f"{SSHD} is missing (Debian's openssh-server package; .ci/run installs it)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def start(directory: Path) -> LoopbackSshd:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    _keygen(directory / "host_key")
    _keygen(directory / "user_key")
    shutil.copyfile(directory / "user_key.pub", directory / "authorized_keys")
    os.chmod(directory / "authorized_keys", 0o600)
    port = _free_port()
    config = directory / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {directory / 'host_key'}
AuthorizedKeysFile {directory / 'authorized_keys'}
PidFile {directory / 'sshd.pid'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
LogLevel VERBOSE
""")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log = directory / "sshd.log"
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"), start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()[-1000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError(f"sshd did not listen on port {port}: {log.read_text()[-1000:]}")
    host_pub = (directory / "host_key.pub").read_text().split()
    known = directory / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    return LoopbackSshd(port=port, user=getpass.getuser(), identity=directory / "user_key", known_hosts=known,
                        host_key_pub=" ".join(host_pub[:2]), process=proc, log=log)


def stop(server: LoopbackSshd) -> None:
    server.process.kill()
    server.process.wait(timeout=10)
