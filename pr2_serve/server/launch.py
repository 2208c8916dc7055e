"""Start ``pr2-serve`` as a subprocess on loopback (ports chosen by the OS) and wait until it
is ready: used by ``make demo``, ``make experiment``, the benchmarks and the tests.

    server = start_server("models/tiny", "runs/state", api_key=secrets.token_hex(16))
    HttpClient(server.http, api_key=...).generate(...); server.stop()

There is no built-in key: the caller chooses it (``None`` starts a server that refuses pushes).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Server:
    proc: subprocess.Popen
    http: str
    grpc: str
    state_dir: Path
    log: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    model_dir,
    state_dir,
    *extra: str,
    api_key: str | None,
    timeout: float = 180.0,
    dtype: str = "float32",
    env: dict[str, str] | None = None,
    file_size_limit: int | None = None,
) -> Server:
    """Start ``pr2-serve --model model_dir`` and return once it printed its ready line.

    ``file_size_limit`` caps the size of any file the server writes (RLIMIT_FSIZE): writes past
    it fail with EFBIG, which is how the reliability suite simulates a full disk.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("PR2_API_KEY", None)
    if api_key:
        env["PR2_API_KEY"] = api_key

    def limit_files() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    proc = subprocess.Popen(
        server_command(model_dir, state_dir, dtype, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=limit_files if file_size_limit else None,
    )
    log: list[str] = []
    http, grpc = wait_ready(proc, log, timeout)
    return Server(proc, f"http://{http}", grpc, Path(state_dir), log)


def server_command(model_dir, state_dir, dtype: str, *extra: str) -> list[str]:
    """``pr2-serve`` on OS-chosen loopback ports with its own state directory."""
    return [
        sys.executable,
        "-m",
        "pr2_serve.server.main",
        "--model",
        str(model_dir),
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--dtype",
        dtype,
        "--state-dir",
        str(state_dir),
        "--max-model-len",
        "512",
        *extra,
    ]


def wait_ready(proc: subprocess.Popen, log: list[str], timeout: float) -> tuple[str, str]:
    """Collect the output of a ``pr2-serve`` process (stdout piped) into ``log`` until its
    ready line; its (http, grpc) addresses. Any launcher can use it, not only this module's."""
    ready = threading.Event()
    ports: dict[str, str] = {}

    def pump():
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"pr2-serve ready http=(\S+) grpc=(\S+)", line)
            if m:
                ports["http"], ports["grpc"] = m.group(1), m.group(2)
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    t0 = time.time()
    while not ready.wait(0.5):
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            raise RuntimeError("pr2-serve did not become ready:\n" + "".join(log[-60:]))
    return ports["http"], ports["grpc"]
