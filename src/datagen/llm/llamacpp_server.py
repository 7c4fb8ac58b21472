"""OpenAI-compatible llama.cpp servers on 127.0.0.1, started and stopped by finsynth.

- :class:`LlamaServer`: llama.cpp's own ``llama-server`` binary, built once from the llama.cpp sources
  inside the llama-cpp-python sdist (:func:`llama_server_binary`, 11.5 min on 2 quiet cores, cached under
  ``~/.cache/finsynth/bin``), with every x86 CPU variant of ggml's kernels, the best one for this CPU
  loaded at run time (:meth:`LlamaServer.cpu_backend` says which). The managed provider
  ``kind: llamacpp_server`` runs on it (:func:`managed_server`): parallel slots, json_schema honoured,
  ~70 tok/s single and ~100 tok/s at 8 concurrent on the packaged Gemma GGUF (the portable AVX2 build).
- :class:`LlamaCppServer`: llama-cpp-python's Python server (optional extra ``llamacpp``), used by the
  tests as a second real peer. It answers one request at a time; flags that matter (measured, see
  docs/providers.md): ``--chat_format gemma`` (without it Gemma falls back to llama-2 and answers
  empty), ``--interrupt_requests False`` (with the default, concurrent requests cut each other off)::

    with LlamaCppServer() as srv:          # the packaged Gemma-3-270M GGUF by default
        ...  # ProviderConfig(kind="openai", model=srv.model, base_url=srv.base_url, json_mode="json_object")
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datagen.llm.openai_provider import OpenAIProvider

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp was measured
# every x86 CPU's kernels, chosen at run time: ggml's CPU backend is built once per CPU kind (x64, sse42,
# sandybridge ... haswell, skylakex, icelake, zen4, sapphirerapids with AMX; libggml-cpu-<kind>.so next to the
# binary) and llama-server loads the best one this CPU runs (ggml_backend_load_all), so an AVX-512 or AMX host
# gets its kernels and an older one never sees SIGILL (a -march=native build dies with it on a CPU that lacks
# what the build machine had). Needs shared libraries. No web UI, no TLS, no curl. 11.5 min to build on 2 quiet
# cores, 26 min beside the test suite (the one portable AVX2 build it replaces: ~7 min).
SERVER_CMAKE_ARGS = ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
                     "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                     "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release")


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


def describe_exit(returncode: int, log_path: Path | None = None, program: str = "llama_cpp.server",
                  rebuild: str = "`rm -rf .venv && bash scripts/setup.sh dev,llamacpp` (see scripts/setup.sh)") -> str:
    """A one-line reason for a server process's exit; a negative code names the signal (SIGILL gets
    the likely cause: a native build for CPU features this machine lacks)."""
    where = f" (log: {log_path})" if log_path else ""
    if returncode >= 0:
        return f"{program} exited with status {returncode}{where}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = ""
    if name == "SIGILL":
        hint = (f"; {program} was compiled for CPU instructions this machine does not have "
                f"(a -march=native build): rebuild it with portable flags, {rebuild}")
    return f"{program} was killed by {name} (exit {returncode}){hint}{where}"


class LlamaCppServer:
    program = "llama_cpp.server"
    rebuild = "`rm -rf .venv && bash scripts/setup.sh dev,llamacpp` (see scripts/setup.sh)"

    def __init__(self, model_path: str | Path | None = None, *, port: int | None = None, n_ctx: int = 2048,
                 n_threads: int = 2, alias: str = "gemma3-270m", chat_format: str = "gemma",
                 log_path: str | Path | None = None, start_timeout_s: float = 180.0):
        if model_path is None:
            from lm.packaged import gemma_gguf_path

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

    def env(self) -> dict[str, str] | None:
        """The server's environment (None: this process's)."""
        return None

    def death_message(self) -> str | None:
        """Why the server process is gone (naming the signal that killed it), or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return describe_exit(self.proc.returncode, self.log_path, self.program, self.rebuild)

    def start(self) -> LlamaCppServer:
        import httpx

        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env())
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
            raise TimeoutError(f"{self.program} not ready after {self.start_timeout_s:g}s")
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
            raise RuntimeError(why or f"{self.program} failed its first completion: {e}") from None
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


class LlamaServer(LlamaCppServer):
    """llama.cpp's ``llama-server`` (the binary from :func:`llama_server_binary`): ``parallel`` slots
    share the context (``n_ctx`` is per slot here), the Gemma chat template, no Jinja."""

    program = "llama-server"
    rebuild = "delete ~/.cache/finsynth/bin/llama-server-* and start again (it rebuilds with every CPU variant)"

    def __init__(self, model_path: str | Path | None = None, *, binary: str | Path | None = None,
                 port: int | None = None, n_ctx: int = 2048, n_threads: int = 2, parallel: int = 4,
                 alias: str = "gemma3-270m", chat_template: str = "gemma", log_path: str | Path | None = None,
                 start_timeout_s: float = 180.0):
        super().__init__(model_path, port=port, n_ctx=n_ctx, n_threads=n_threads, alias=alias,
                         log_path=log_path, start_timeout_s=start_timeout_s)
        self.cmd = [str(binary or llama_server_binary()), "--model", str(self.model_path), "--alias", alias,
                    "--host", "127.0.0.1", "--port", str(self.port), "--no-jinja", "--chat-template", chat_template,
                    "-t", str(n_threads), "-np", str(parallel), "-c", str(n_ctx * parallel)]

    def env(self) -> dict[str, str]:
        """The binary's own folder first on the library path: its libllama / libggml and the CPU variants
        live next to it (the build records the build folder, which is gone once the binary is cached)."""
        here = str(Path(self.cmd[0]).resolve().parent)
        rest = os.environ.get("LD_LIBRARY_PATH")
        return {**os.environ, "LD_LIBRARY_PATH": here + (os.pathsep + rest if rest else "")}

    def cpu_backend(self) -> str | None:
        """Which of ggml's CPU variants the running server loaded (``haswell``, ``skylakex``, ...), read
        from its memory map; None when it is not running or was built with one CPU backend inside."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            maps = Path(f"/proc/{self.proc.pid}/maps").read_text()
        except OSError:
            return None
        found = {line.rsplit("libggml-cpu-", 1)[1].split(".so")[0] for line in maps.splitlines()
                 if "libggml-cpu-" in line}
        return ", ".join(sorted(found)) or None  # ggml loads the one best variant


# ----------------------------------------------------------------------------- building llama-server
def find_sdist(version: str = LLAMA_CPP_VERSION, cache: Path | None = None) -> Path:
    """The llama-cpp-python sdist (it vendors llama.cpp): ``$FINSYNTH_LLAMA_CPP_SDIST`` when set, else
    one already in ``<model cache>/sdist/``, else fetched there with ``pip download`` (PyPI)."""
    from lm.packaged import model_cache_dir

    env = os.environ.get("FINSYNTH_LLAMA_CPP_SDIST")
    if env:
        if not Path(env).is_file():
            raise RuntimeError(f"FINSYNTH_LLAMA_CPP_SDIST={env} is not a file")
        return Path(env)
    d = (cache or model_cache_dir()) / "sdist"
    found = sorted(d.glob(f"llama_cpp_python-{version}.tar.gz")) if d.exists() else []
    if found:
        return found[0]
    d.mkdir(parents=True, exist_ok=True)
    log.info("fetching the llama-cpp-python %s sdist (llama.cpp's sources) into %s", version, d)
    # with build isolation: pip prepares the sdist's metadata, which needs its build backend
    # (scikit-build-core), not installed in our venv; --no-build-isolation fails on a fresh machine
    # --no-binary for this package only: ":all:" would also build the sdist's build dependencies from source
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(d)],
                       capture_output=True, text=True)
    found = sorted(d.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"could not fetch the llama-cpp-python=={version} sdist (pip download exited "
                           f"{r.returncode}: {last[0]}); download it yourself and set FINSYNTH_LLAMA_CPP_SDIST")
    return found[0]


def extract_llama_cpp(sdist: Path, dest: Path, keep: Callable[[str], bool] = lambda rel: True) -> Path:
    """Write the files of the sdist's ``vendor/llama.cpp/`` tree whose relative path ``keep`` accepts
    into ``dest``, modes kept; returns ``dest``."""
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            i = m.name.find("/vendor/llama.cpp/")
            rel = m.name[i + len("/vendor/llama.cpp/"):] if i >= 0 else ""
            if not rel or not (m.isfile() or m.isdir()) or not keep(rel):
                continue
            target = dest / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out)
            os.chmod(target, m.mode & 0o777 or 0o644)
    return dest


def llama_server_binary(version: str = LLAMA_CPP_VERSION) -> Path:
    """``llama-server`` built from the llama.cpp inside the llama-cpp-python ``version`` sdist with
    :data:`SERVER_CMAKE_ARGS`, once per (version, flags): ``~/.cache/finsynth/bin/llama-server-<key>``.
    ``$FINSYNTH_LLAMA_SERVER`` names a binary of your own instead. Needs cmake, ninja and a C++ compiler."""
    if env := os.environ.get("FINSYNTH_LLAMA_SERVER"):
        return Path(env)
    key = hashlib.sha256(" ".join((version, *SERVER_CMAKE_ARGS)).encode()).hexdigest()[:12]
    home = Path(os.environ.get("FINSYNTH_BIN_CACHE", Path.home() / ".cache" / "finsynth" / "bin"))
    target = home / f"llama-server-{key}"
    if (target / "llama-server").is_file():
        return target / "llama-server"
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama-server needs {tool} (apt-get install cmake ninja-build g++)")
    work = home / f".build-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    src = extract_llama_cpp(find_sdist(version), work / "llama.cpp")
    log.warning("building llama-server from llama.cpp (llama-cpp-python %s) into %s; once, with every CPU "
                "variant (~12 min on 2 cores)", version, target)
    build_log = work / "build.log"
    with open(build_log, "wb") as out:
        def run(cmd: list[str]) -> None:
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = build_log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"building llama-server failed ({' '.join(cmd[:2])}); log {build_log}: "
                                   + " | ".join(tail))

        run(["cmake", "-S", str(src), "-B", str(work / "build"), "-G", "Ninja", *SERVER_CMAKE_ARGS])
        # the CPU variants (ggml-cpu-haswell, ggml-cpu-armv8.2_1, ...) are modules loaded at run time, not link
        # dependencies of llama-server: name them
        targets = subprocess.run(["ninja", "-C", str(work / "build"), "-t", "targets", "all"], capture_output=True,
                                 text=True).stdout
        variants = sorted(set(re.findall(r"^(ggml-cpu-[\w.]+):", targets, re.MULTILINE)))
        if not variants:
            raise RuntimeError(f"building llama-server: cmake made no ggml-cpu-<kind> targets in {work / 'build'}")
        run(["cmake", "--build", str(work / "build"), "--target", "llama-server", *variants,
             "-j", str(os.cpu_count() or 2)])
    staged = work / "out"
    shutil.copytree(work / "build" / "bin", staged, symlinks=True)  # the binary, its libraries, the variants
    try:
        os.replace(staged, target)  # atomic: a half-built binary is never found
    except OSError:  # another process finished first
        pass
    shutil.rmtree(work, ignore_errors=True)
    return target / "llama-server"


# ----------------------------------------------------------------------------- the managed provider's server
_SERVERS: dict[tuple[Any, ...], LlamaServer] = {}
_SERVERS_LOCK = threading.Lock()


def managed_server(model_path: str | Path | None, *, parallel: int, n_ctx: int, n_threads: int) -> LlamaServer:
    """One running ``llama-server`` per (model, slots, context, threads) per process, started on first
    use and stopped when the process exits. ``kind: llamacpp_server`` providers talk to it."""
    ident = (str(model_path), parallel, n_ctx, n_threads)
    with _SERVERS_LOCK:
        srv = _SERVERS.get(ident)
        if srv is None or srv.death_message() is not None or srv.proc is None:
            srv = LlamaServer(model_path, parallel=parallel, n_ctx=n_ctx, n_threads=n_threads).start()
            _SERVERS[ident] = srv
            atexit.register(srv.stop)
        return srv


class LlamaServerProvider(OpenAIProvider):
    """The ``kind: llamacpp_server`` provider: the ``openai`` provider talking to a managed
    :class:`LlamaServer`, whose cache identity is the model file, not the (random) port, so a rerun in
    a new process reuses every finished answer."""

    kind = "llamacpp_server"

    def __init__(self, name: str, cfg: Any, cache: Any = None):
        model_path = None
        if cfg.model_path and not str(cfg.model_path).startswith("packaged:"):
            model_path = Path(cfg.model_path).expanduser()
            if not model_path.is_file():
                raise ValueError(f"llm.providers.{name}.model_path: {model_path} is not a GGUF file")
        srv = managed_server(model_path, parallel=cfg.concurrency, n_ctx=cfg.context_tokens,
                             n_threads=cfg.threads or os.cpu_count() or 2)
        self._identity = f"llamacpp_server:{srv.model_path.name}:{srv.model_path.stat().st_size}"
        super().__init__(name, cfg.model_copy(update={"base_url": srv.base_url, "model": srv.model}), cache)

    @property
    def base_url(self) -> str | None:  # the cache key's server identity
        return self._identity
