"""The memory allocator a CPU run uses: tcmalloc where the machine has it, preloaded by the CLI.

PyTorch on CPU allocates every activation with the C library's ``malloc``. glibc hands blocks above
its mmap threshold (at most 32 MiB) straight back to the kernel when they are freed, so the next
tensor of that size is page-faulted in again, page by page: on the 2-core VM of
``docs/performance.md`` a SiLU over a ``[240, 38, 1536]`` prefill activation took 38-44 ms with a
fresh output against 11 ms written into an existing one, and teacher generation at batch 240 ran
~11% faster with tcmalloc, which keeps freed pages (jemalloc did not help here, and glibc's own
``mallopt`` knobs recovered only a fraction). PyTorch's CPU launcher
(``python -m torch.backends.xeon.run_cpu --enable-tcmalloc``) does the same for Intel machines.

A library cannot swap its allocator after the process has started, so the ``paraencoder`` command
re-executes itself once with ``LD_PRELOAD`` naming tcmalloc, when all of these hold:

* Linux, and a tcmalloc shared library in the usual places (Debian/Ubuntu ``libtcmalloc-minimal4``
  or ``libgoogle-perftools4``, or ``$PARAENCODER_TCMALLOC``);
* ``$PARAENCODER_ALLOCATOR`` is unset or ``tcmalloc`` (``system`` keeps glibc's malloc);
* tcmalloc is not already loaded (a second re-exec is never attempted).

Nothing changes where tcmalloc is absent. ``python -c`` / notebook users preload it themselves:
``LD_PRELOAD=$(python -c "import paraencoder.allocator as a; print(a.find_tcmalloc())") python ...``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

ALLOCATOR_ENV = "PARAENCODER_ALLOCATOR"
LIBRARY_ENV = "PARAENCODER_TCMALLOC"
_CHOICES = ("tcmalloc", "system")
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(env: Mapping[str, str] | None = None, dirs: Sequence[str] | None = None) -> str | None:
    """Path of a tcmalloc shared library on this machine, or ``None``.

    ``$PARAENCODER_TCMALLOC`` names one explicitly; it must exist (a typo is an error, not a silent
    fallback). Otherwise the first of the usual library directories (and ``$CONDA_PREFIX/lib``) that
    holds one.
    """
    env = os.environ if env is None else env
    explicit = env.get(LIBRARY_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"${LIBRARY_ENV}={explicit!r} is not a file: name a libtcmalloc*.so, or unset it to search the usual places")
        return explicit
    search = list(_DIRS if dirs is None else dirs) + ([str(Path(env["CONDA_PREFIX"]) / "lib")] if env.get("CONDA_PREFIX") else [])
    for d in search:
        for name in _NAMES:
            path = Path(d) / name
            if path.is_file():
                return str(path)
    return None


def choice(env: Mapping[str, str] | None = None) -> str:
    """The allocator asked for: ``$PARAENCODER_ALLOCATOR`` (``tcmalloc`` when unset), checked."""
    env = os.environ if env is None else env
    value = (env.get(ALLOCATOR_ENV) or "tcmalloc").strip().lower()
    if value not in _CHOICES:
        raise ValueError(f"${ALLOCATOR_ENV}={env.get(ALLOCATOR_ENV)!r}: expected one of {', '.join(_CHOICES)}")
    return value


def loaded(maps: str | None = None) -> bool:
    """Whether tcmalloc is already mapped into this process (``/proc/self/maps``)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return False
    return "libtcmalloc" in maps


def preload_env(library: str, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with ``library`` first in ``LD_PRELOAD`` (what is preloaded already stays)."""
    out = dict(env)
    rest = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != library]
    out["LD_PRELOAD"] = " ".join([library, *rest])
    return out


def reexec_plan(argv: Sequence[str], env: Mapping[str, str] | None = None, *, platform: str = sys.platform,
                maps: str | None = None) -> tuple[list[str], dict[str, str]] | None:
    """``(argv, env)`` to re-execute this command with tcmalloc preloaded, or ``None`` to run as is."""
    env = os.environ if env is None else env
    if not argv or argv[0] in ("-h", "--help"):
        return None  # the usage text needs no allocator
    if not platform.startswith("linux") or choice(env) != "tcmalloc" or loaded(maps):
        return None
    if "libtcmalloc" in env.get("LD_PRELOAD", ""):
        return None  # asked for already and still not mapped: the loader refused it; do not loop
    library = find_tcmalloc(env)
    if library is None:
        return None
    return [sys.executable, "-m", "paraencoder", *argv], preload_env(library, env)


def reexec_with_tcmalloc(argv: Sequence[str]) -> None:
    """Replace this process with the same ``paraencoder`` command under tcmalloc, when :func:`reexec_plan` says so.

    Called first thing by the CLI, before torch is imported; returns only when nothing is to change.
    """
    plan = reexec_plan(argv)
    if plan is None:
        return
    args, env = plan
    print(f"[paraencoder] tcmalloc preloaded ({env['LD_PRELOAD'].split()[0]}; ${ALLOCATOR_ENV}=system keeps malloc)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execve(sys.executable, args, env)


__all__ = ["ALLOCATOR_ENV", "LIBRARY_ENV", "choice", "find_tcmalloc", "loaded", "preload_env", "reexec_plan", "reexec_with_tcmalloc"]
