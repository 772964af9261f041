"""Container-test helpers: a private dockerd, a cached debootstrap base image, offline wheels.

Import as `from docker_helpers import ...` (tests/ is on sys.path). Nothing here touches another
Docker engine: the daemon gets its own socket, data and exec roots in a temporary folder, and
every client call goes to it through DOCKER_HOST. Network traffic stays on this host
(`--network host`, 127.0.0.1); only debootstrap and pip reach their package registries.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mcdrop" / "docker"
IMAGE = "mcdrop:0.1.0"
IMAGE_LATEST = "mcdrop:latest"
START_S = 60.0  # longest dockerd may take to answer
# The local base: Debian bookworm (CPython 3.11, like python:3.11-slim) with the venv module.
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
BASE_PYTHON = "3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# bookworm's glibc is 2.36: wheels for any manylinux up to it (and the legacy aliases) run.
BASE_PLATFORMS = [f"manylinux_2_{minor}" for minor in range(36, 4, -1)] + [
    "manylinux2014", "manylinux2010", "manylinux1"]  # fmt: skip
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man")
BASE_RECIPE = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
               BASE_SUITE, DEBIAN_MIRROR, *TRIM]  # fmt: skip


class DockerUnavailable(Exception):
    """This machine cannot start or reach a Docker engine; the reason is the message."""


def run(
    command: Sequence[str | Path],
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    log: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, text output captured (or appended to `log`); never raises on its status."""
    args = [str(c) for c in command]
    if log is None:
        return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    with log.open("a", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(args)}\n")
        sink.flush()
        return subprocess.run(
            args, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file, for failure messages."""
    if not path.exists():
        return f"({path} was never written)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def recipe_key(recipe: object) -> str:
    """A short, stable hash of a JSON-able recipe: what a cached artefact was made from."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DockerEngine:
    """A dockerd of our own (vfs, no iptables, no bridge) and the client environment for it."""

    root: Path
    process: subprocess.Popen[bytes]
    log: Path
    client: str = "docker"
    buildkit: bool = False

    @property
    def env(self) -> dict[str, str]:
        """Client environment: this daemon, no user config or plugins, the chosen builder."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "MCDROP_"))}
        env.update(
            DOCKER_HOST=f"unix://{self.root}/docker.sock",
            DOCKER_CONFIG=str(self.root / "client"),
            DOCKER_BUILDKIT="1" if self.buildkit else "0",
        )
        return env

    def docker(
        self, *args: str | Path, timeout: float = 600.0, log: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`docker ARGS` against this daemon."""
        return run([self.client, *args], self.env, timeout, log)

    def check(self, *args: str | Path, timeout: float = 600.0) -> str:
        """`docker ARGS`, its stdout; fails the test with docker's own message otherwise."""
        done = self.docker(*args, timeout=timeout)
        assert done.returncode == 0, f"docker {' '.join(map(str, args))}: {done.stderr.strip()}"
        return done.stdout

    def choose_client(self) -> None:
        """Prefer a client that builds with BuildKit, which skips a container per instruction.

        The legacy builder commits every instruction from a container, and on vfs each one
        copies the whole file system (a cold build: ~15 min against ~2 min here). Clients from
        23 on need the buildx plugin for BuildKit; older ones (Debian's docker.io) have it built
        in. A v28 client without buildx next to docker.io's 20.10 one is this machine's case.
        """
        found = [shutil.which("docker"), "/usr/bin/docker"]
        for client in dict.fromkeys(c for c in found if c and Path(c).exists()):
            self.client = client
            if self.docker("buildx", "version", timeout=30).returncode == 0:
                self.buildkit = True
                return
            version = self.docker("version", "--format", "{{.Client.Version}}", timeout=30)
            if version.stdout.split(".")[0].isdigit() and int(version.stdout.split(".")[0]) < 23:
                self.buildkit = True
                return
        self.client, self.buildkit = found[0] or "docker", False

    @classmethod
    def start(cls) -> DockerEngine:
        """Start dockerd on a private socket; raises DockerUnavailable saying why it cannot."""
        problem = engine_problem()
        if problem:
            raise DockerUnavailable(problem)
        root = Path(tempfile.mkdtemp(prefix="mcd-", dir="/tmp"))  # short: socket paths <108
        log = root / "dockerd.log"
        command = [
            "dockerd", "--host", f"unix://{root}/docker.sock", "--data-root", root / "data",
            "--exec-root", root / "exec", "--pidfile", root / "docker.pid",
            "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false",
            "--bridge=none", "--containerd-namespace", f"mcdrop-test-{root.name}",
            "--containerd-plugins-namespace", f"mcdrop-test-{root.name}-plugins",
        ]  # fmt: skip
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [str(c) for c in command], stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        engine = cls(root, process, log)
        engine.choose_client()
        give_up = time.monotonic() + START_S
        while engine.docker("version", timeout=10).returncode != 0:
            if process.poll() is not None or time.monotonic() > give_up:
                engine.stop()
                raise DockerUnavailable(f"dockerd did not start:\n{tail(log, 8)}")
            time.sleep(0.5)
        return engine

    def stop(self) -> None:
        """SIGTERM dockerd (it stops its containers and containerd), then remove its folders."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # dockerd leaves its network namespace mounted under the exec root.
        mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8").splitlines()
        points = [line.split()[4] for line in mountinfo]
        for point in sorted((p for p in points if p.startswith(f"{self.root}/")), reverse=True):
            run(["umount", "--lazy", point], timeout=30)
        # vfs leaves gigabytes of small files (a full copy per layer): deleting them takes
        # minutes of disk time that no test waits for, so a detached `rm` does it.
        trash = self.root.with_name(f"{self.root.name}-deleting")
        self.root.rename(trash)
        run(["sh", "-c", 'nohup nice rm -rf -- "$1" >/dev/null 2>&1 &', "sh", trash])


def engine_problem() -> str | None:
    """Why a private dockerd cannot run here (None when it can)."""
    if sys.platform != "linux":
        return f"docker: these tests start dockerd themselves, which needs Linux ({sys.platform})"
    if os.geteuid() != 0:
        return "docker: starting a private dockerd needs root"
    for tool, package in (("dockerd", "docker.io"), ("docker", "docker.io"),
                          ("debootstrap", "debootstrap")):  # fmt: skip
        if shutil.which(tool) is None:
            return f"docker: {tool} not found (make test installs {package} as root)"
    return None


# -- the base image and the wheels -------------------------------------------------------------


def base_tarball(work: Path, log: Path) -> Path:
    """A gzipped root file system of BASE_RECIPE, made once with debootstrap and kept in CACHE."""
    key = recipe_key(BASE_RECIPE)
    tarball = CACHE / f"base-{BASE_SUITE}-{key}.tar.gz"
    if tarball.exists():
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = work / "rootfs"
    command: list[str | Path] = [*BASE_RECIPE[:4], rootfs, DEBIAN_MIRROR]
    if run(command, timeout=1200, log=log).returncode != 0:
        raise DockerUnavailable(f"docker: debootstrap failed:\n{tail(log, 8)}")
    for folder in TRIM:
        for entry in (rootfs / folder).glob("*"):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    partial = tarball.with_suffix(".partial")
    with partial.open("wb") as sink:
        tar = subprocess.Popen(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE
        )
        gzip = subprocess.run(["gzip", "-1"], stdin=tar.stdout, stdout=sink, check=False)
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0, "tar of the debootstrap root failed"
        assert gzip.returncode == 0, "gzip of the debootstrap root failed"
    partial.rename(tarball)
    shutil.rmtree(rootfs, ignore_errors=True)
    return tarball


def base_image(engine: DockerEngine, work: Path, log: Path) -> str:
    """Import the cached base tarball into the (temporary) daemon; its image name."""
    name = f"mcdrop-test-base:{recipe_key(BASE_RECIPE)}"
    engine.check("import", base_tarball(work, log), name, timeout=600)
    return name


def wheels(log: Path) -> Path:
    """Every wheel the image needs for CPython 3.11 on this architecture, cached in CACHE.

    torch must come as the CPU build from this machine (pip's find-links): a plain PyPI torch
    is the CUDA build of several GB, so without a local CPU wheel this raises DockerUnavailable.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [*project["dependencies"], "setuptools>=68"]  # setuptools: builds mcdrop
    target = ["--only-binary=:all:", "--python-version", BASE_PYTHON]
    for tag in BASE_PLATFORMS:  # pip before 24 does not widen a glibc tag to older ones
        target += ["--platform", f"{tag}_{platform.machine()}"]
    folder = CACHE / f"wheels-{recipe_key([requirements, target])}"
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(folder), *target]
    torch = next(r for r in project["dependencies"] if r.startswith("torch"))
    if run([*pip, "--no-deps", torch], timeout=600, log=log).returncode != 0:
        raise DockerUnavailable(f"docker: pip could not get {torch}:\n{tail(log, 5)}")
    if not any("+cpu" in p.name for p in folder.glob("torch-*.whl")):
        raise DockerUnavailable(
            f"docker: no CPU build of {torch} on this machine (pip find-links); PyPI's is the "
            "CUDA build of several GB, so the image test does not download it"
        )
    # With the +cpu wheel in --find-links, the resolver prefers it over PyPI's CUDA torch.
    if run([*pip, "--find-links", str(folder), *requirements], timeout=900, log=log).returncode:
        raise DockerUnavailable(f"docker: pip download of the dependencies failed:\n{tail(log)}")
    (folder / ".complete").touch()
    return folder


def build_context(work: Path, wheel_folder: Path) -> Path:
    """The Dockerfile, the paths .dockerignore lets through, and the wheels, in a new folder."""
    context = work / "context"
    context.mkdir()
    shutil.copy2(ROOT / "Dockerfile", context / "Dockerfile")
    allowed = [line[1:].strip("/") for line in
               (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if line.startswith("!")]  # fmt: skip
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in allowed:
        source = ROOT / name
        if name == "wheels" or not source.exists():
            continue
        if source.is_dir():
            shutil.copytree(source, context / name, ignore=skip)
        else:
            shutil.copy2(source, context / name)
    shutil.copytree(wheel_folder, context / "wheels", ignore=shutil.ignore_patterns(".*"))
    return context
