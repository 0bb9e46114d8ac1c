"""The socket audit of test servers: ``netaudit.c`` built into a shared library that the server
loads with LD_PRELOAD (see there why not a Python audit hook), and its log read back.

Every name lookup and every connect/sendto with an address, by any thread or library of the
server, is a line ``<pid> <call> <target>``; ``outbound()`` keeps those that would leave the
machine (the library refuses them, so nothing is sent: ``is_local`` mirrors its rule).
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from .paths import CACHE

SOURCE = Path(__file__).with_name("netaudit.c")
LOCAL_NAMES = {"(none)", "localhost", "ip6-localhost", "ip6-loopback", "::1"}


def build() -> tuple[Path | None, str | None]:
    """(the shared library, None), or (None, why it cannot be built) without a C compiler."""
    source = SOURCE.read_bytes()
    library = CACHE / "netaudit" / f"netaudit-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if library.is_file():
        return library, None
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) to build the socket audit tests/idf_testlib/netaudit.c"
    library.parent.mkdir(parents=True, exist_ok=True)
    tmp = library.with_suffix(".tmp")
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(tmp), str(SOURCE), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None, f"building the socket audit failed: {done.stderr[-2000:]}"
    tmp.rename(library)
    return library, None


def is_local(call: str, target: str) -> bool:
    """Whether one audited call stays on the machine (loopback, a Unix socket, no address)."""
    if call in ("getaddrinfo", "gethostbyname"):
        name = target.split(" ")[0]
        return name in LOCAL_NAMES or name.startswith("127.")
    kind, _, rest = target.partition(" ")
    address = rest.split(" ")[0]
    if kind in ("unix", "none") or (kind == "family" and address == "0"):           # AF_UNSPEC: a disconnect
        return True
    if kind == "inet":
        return address.startswith("127.")
    if kind == "inet6":
        return address == "::1" or address.startswith("::ffff:127.")
    return False


def entries(log: Path) -> list[tuple[str, str, str]]:
    """(pid, call, target) of every audited call so far."""
    if not log.is_file():
        return []
    found = []
    for line in log.read_text(errors="replace").splitlines():
        pid, call, target = (line.split(" ", 2) + ["", ""])[:3]
        found.append((pid, call, target))
    return found


def outbound(log: Path) -> list[str]:
    """The audited calls that would leave the machine, as log lines."""
    return [f"{pid} {call} {target}" for pid, call, target in entries(log) if not is_local(call, target)]
