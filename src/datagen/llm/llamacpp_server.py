"""Start llama-cpp-python's OpenAI-compatible server on 127.0.0.1 (optional extra ``llamacpp``).

Used by the tests and the benchmark, and handy for a faster local backend than transformers::

    with LlamaCppServer() as srv:          # the packaged Gemma-3-270M GGUF by default
        ...  # ProviderConfig(kind="openai", model=srv.model, base_url=srv.base_url, json_mode="json_object")

Flags that matter (measured, see docs/providers.md): ``--chat_format gemma`` (without it Gemma falls
back to llama-2 and answers empty), ``--interrupt_requests False`` (with the default, concurrent
requests cut each other off silently). The server answers one request at a time.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
        import llama_cpp.server  # noqa: F401
    except Exception:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(returncode: int, log_path: Path | None = None) -> str:
    """A one-line reason for a server process's exit; a negative code names the signal (SIGILL gets
    the likely cause: a native build for CPU features this machine lacks)."""
    where = f" (log: {log_path})" if log_path else ""
    if returncode >= 0:
        return f"llama_cpp.server exited with status {returncode}{where}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = ""
    if name == "SIGILL":
        hint = ("; llama-cpp-python was compiled for CPU instructions this machine does not have "
                "(a -march=native build): rebuild it with portable flags, `rm -rf .venv && bash scripts/setup.sh "
                "dev,llamacpp` (see scripts/setup.sh)")
    return f"llama_cpp.server was killed by {name} (exit {returncode}){hint}{where}"


class LlamaCppServer:
    def __init__(self, model_path: str | Path | None = None, *, port: int | None = None, n_ctx: int = 2048,
                 n_threads: int = 2, alias: str = "gemma3-270m", chat_format: str = "gemma",
                 log_path: str | Path | None = None, start_timeout_s: float = 180.0):
        if model_path is None:
            from datagen.packaged import gemma_gguf_path

            model_path = gemma_gguf_path()
        self.model_path = Path(model_path)
        self.port = port or _free_port()
        self.model = alias
        self.log_path = Path(log_path) if log_path else None
        self.start_timeout_s = start_timeout_s
        self.cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model_path),
                    "--model_alias", alias, "--host", "127.0.0.1", "--port", str(self.port),
                    "--chat_format", chat_format, "--interrupt_requests", "False", "--n_ctx", str(n_ctx),
                    "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
                    "--use_mlock", "False", "--verbose", "False"]
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def death_message(self) -> str | None:
        """Why the server process is gone (naming the signal that killed it), or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return describe_exit(self.proc.returncode, self.log_path)

    def start(self) -> LlamaCppServer:
        import httpx

        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if (why := self.death_message()) is not None:
                raise RuntimeError(why)
            try:
                if httpx.get(self.base_url + "/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            self.stop()
            raise TimeoutError(f"llama_cpp.server not ready after {self.start_timeout_s:g}s")
        self._probe_completion()
        return self

    def _probe_completion(self) -> None:
        """One 1-token completion. ``/v1/models`` answers before any kernel runs; a build for CPU
        features this machine lacks dies (SIGILL) only here, and we say so instead of letting every
        later request fail with a bare connection error."""
        import httpx

        try:
            httpx.post(self.base_url + "/chat/completions", timeout=60.0,
                       json={"model": self.model, "max_tokens": 1, "temperature": 0.0,
                             "messages": [{"role": "user", "content": "Hi"}]})
        except httpx.HTTPError as e:
            time.sleep(0.5)
            why = self.death_message()
            self.stop()
            raise RuntimeError(why or f"llama_cpp.server failed its first completion: {e}") from None
        if (why := self.death_message()) is not None:
            raise RuntimeError(why)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> LlamaCppServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
