"""The real ComfyUI server as a subprocess on 127.0.0.1, with the pack loaded by ComfyUI's
own custom-node loader (through the checkout's ``.cache/custom_nodes/IDFusion`` link, added
to the server's custom_nodes folders by its extra_model_paths file)."""
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

from .paths import ARTIFACTS, CACHE, COMFY, CUSTOM_NODES, ensure_pack_link

#: A terminal colour code, e.g. "\x1b[32m".
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
MODEL_FOLDERS = ("checkpoints", "vae", "flashface", "insightface", "facexlib", "idfusion", "controlnet", "consistentid",
                 "clip_vision", "diffusion_models", "text_encoders")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """Start with ``start()``, stop with ``stop()``; ``url`` is the base address."""

    def __init__(self, workdir: Path, name: str = "server", comfy: Path = COMFY):
        self.workdir = Path(workdir)
        self.name = name
        self.comfy = Path(comfy)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log_path = ARTIFACTS / f"{name}-{self.port}.log"
        for sub in ("input", "output", "temp", "user"):
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
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env)
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

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> dict:
        """POST /prompt. Returns the JSON answer (status 200) or raises with the host's error body."""
        body = {"prompt": prompt, "client_id": uuid.uuid4().hex}
        r = requests.post(self.url + "/prompt", json=body, timeout=30)
        if r.status_code != 200:
            raise PromptRejected(r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text)
        return r.json()

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        """Queue a prompt and wait for its history entry; returns it (status may be error)."""
        prompt_id = self.queue(prompt)["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
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


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt's history entry, or None if it succeeded."""
    if entry["status"].get("status_str") == "success":
        return None
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return "unknown error"
