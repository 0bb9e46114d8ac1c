"""The real ComfyUI server as a subprocess on 127.0.0.1, with the pack loaded by ComfyUI's
own custom-node loader (through the checkout's ``.cache/custom_nodes/IDFusion`` link, added
to the server's custom_nodes folders by its extra_model_paths file).

Every server runs under the socket audit (``netaudit``: each name lookup and connection, native
ones included, logged to ``netaudit.log``) with a home and a temporary folder of its own, empty
at the start, so tests can check that nothing leaves the machine and nothing is written outside
ComfyUI's folders. ``ORT_DISABLE_TELEMETRY`` is removed from its environment: the pack must set
it itself; so are the CI markers (``CI`` and the like), which switch onnxruntime's telemetry off
on their own and would hide what a user's server does."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import requests

from . import netaudit
from .paths import ARTIFACTS, CACHE, COMFY, CUSTOM_NODES, ensure_pack_link

#: A terminal colour code, e.g. "\x1b[32m".
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
#: Seconds to wait for an answer while the server may be busy: loading a 2 GB checkpoint can hold
#: Python's GIL, and so the server's event loop, for tens of seconds on a small shared machine.
SLOW_ANSWER = 180
#: Environment variables by which CI systems announce themselves (onnxruntime's telemetry stays off under them).
CI_MARKERS = ("CI", "CONTINUOUS_INTEGRATION", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", "BUILD_ID", "BUILD_NUMBER",
              "JENKINS_URL", "BUILDKITE", "CIRCLECI", "TRAVIS", "TEAMCITY_VERSION")
MODEL_FOLDERS = ("checkpoints", "vae", "loras", "flashface", "insightface", "facexlib", "idfusion", "controlnet",
                 "consistentid", "clip_vision", "diffusion_models", "text_encoders")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with ``start()``, stop with ``stop()``; ``url`` is the base address."""

    def __init__(self, workdir: Path, name: str = "server", comfy: Path = COMFY, env: dict | None = None):
        self.workdir = Path(workdir)
        self.name = name
        self.comfy = Path(comfy)
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = ARTIFACTS / f"{name}-{self.port}.log"
        self.audit_log = self.workdir / "netaudit.log"
        self.home = self.workdir / "home"
        self.tmp = self.workdir / "tmp"
        self.audit_problem = None
        for sub in ("input", "output", "temp", "user", "home", "tmp"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    def _model_paths(self) -> Path:
        models = CACHE / "models"
        lines = ["idfusion_pack:", f"    custom_nodes: {CUSTOM_NODES}", "idfusion_tests:", f"    base_path: {models}"]
        for folder in MODEL_FOLDERS:
            (models / folder).mkdir(parents=True, exist_ok=True)
            lines.append(f"    {folder}: {folder}/")
        path = self.workdir / "extra_model_paths.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        ensure_pack_link()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(self.comfy / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:",
               "--extra-model-paths-config", str(self._model_paths()),
               "--input-directory", str(self.workdir / "input"), "--output-directory", str(self.workdir / "output"),
               "--temp-directory", str(self.workdir / "temp"), "--user-directory", str(self.workdir / "user")]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=self._env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/system_stats", timeout=2).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer in {timeout:.0f} s:\n{self.log_tail()}")

    def _env(self) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   HOME=str(self.home), TMPDIR=str(self.tmp), IDFUSION_NETAUDIT_LOG=str(self.audit_log))
        for name in ("ORT_DISABLE_TELEMETRY",) + CI_MARKERS:
            env.pop(name, None)
        library, self.audit_problem = netaudit.build()
        if library is not None:
            env["LD_PRELOAD"] = " ".join(filter(None, [str(library), env.get("LD_PRELOAD")]))
        env.update(self.extra_env)
        return env

    def outbound(self) -> list[str]:
        """Name lookups and connections so far that would leave the machine (see netaudit)."""
        return netaudit.outbound(self.audit_log)

    def stray_files(self) -> list[str]:
        """Files written into the server's home or temporary folder (outside ComfyUI's folders)."""
        return sorted(str(p) for folder in (self.home, self.tmp) for p in folder.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def log_text(self) -> str:
        """The server's log without colour codes (hosts colour their log lines from ComfyUI 0.23 on)."""
        try:
            return ANSI_CODE.sub("", self.log_path.read_text())
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # --- the HTTP API -------------------------------------------------------------------
    def get(self, path: str, **kw):
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r.json()

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """POST /free: unload models and (free_memory) drop every cached node output, as the
        frontend's "Unload models" and "Free model and node cache" buttons do. The host acts on
        it before the next prompt."""
        r = requests.post(self.url + "/free", json={"unload_models": unload_models, "free_memory": free_memory},
                          timeout=SLOW_ANSWER)
        r.raise_for_status()

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> dict:
        """POST /prompt. Returns the JSON answer (status 200) or raises with the host's error body."""
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        r = requests.post(self.url + "/prompt", json=body, timeout=SLOW_ANSWER)
        if r.status_code != 200:
            raise PromptRejected(r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text)
        return r.json()

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue a prompt and wait for its history entry; returns it (status may be error)."""
        prompt_id = self.queue(prompt)["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}", timeout=SLOW_ANSWER)
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a prompt:\n{self.log_tail()}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s:\n{self.log_tail()}")

    def output_images(self, entry: dict) -> list[Path]:
        files = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                # ComfyUI writes temporary images into a "temp" folder inside --temp-directory
                base = self.workdir / "output" if img["type"] == "output" else self.workdir / "temp" / "temp"
                files.append(base / img.get("subfolder", "") / img["filename"])
        return files


class PromptRejected(Exception):
    def __init__(self, status: int, body):
        super().__init__(f"/prompt answered {status}: {json.dumps(body)[:2000] if not isinstance(body, str) else body[:2000]}")
        self.status = status
        self.body = body


def execution_failure(entry: dict) -> tuple[str, str] | None:
    """(the node type the host reports a failed prompt against, the exception message), or None."""
    if entry["status"].get("status_str") == "success":
        return None
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return str(data.get("node_type")), str(data.get("exception_message")).strip()
    return "?", "unknown error"


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry, or None if it succeeded."""
    if entry["status"].get("status_str") == "success":
        return None
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return "unknown error"
