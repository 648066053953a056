"""The malloc that ecomax processes run under: a retaining allocator preloaded when one is available.

On CPU, XLA's host-side buffers are large and short-lived; glibc malloc hands their pages back to the
OS and faults them in again every step (~25% of a ViT-B/16 step on a 2-core machine, see the README's
"Benchmarking"). An allocator that keeps freed memory avoids that. ``ecomax``'s entry point calls
:func:`ensure` first thing: when the chosen allocator is not yet in the process it re-executes the same
interpreter with the same argv once (``os.execve``: same pid, so stdin/stdout, exit codes and signals
are the caller's), with the library in ``LD_PRELOAD`` and its retain settings.

``ECOMAX_ALLOCATOR`` chooses (default ``auto``):

| value | what |
|---|---|
| ``auto`` | the first available of tcmalloc (``libtcmalloc-minimal4``), jemalloc (``libjemalloc2``), mimalloc (the ``cmeel-mimalloc`` wheel, a dependency of ecomax: so a fresh set-up always has one); glibc when none is |
| ``mimalloc`` / ``jemalloc`` / ``tcmalloc`` | that one; glibc, with a warning, when it is not installed |
| ``system`` (or ``glibc``, ``off``) | no preload: glibc malloc |

Settings (each only when not already in the environment, so a user's own value wins):
mimalloc ``MIMALLOC_PURGE_DELAY=-1``; jemalloc ``MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true``;
tcmalloc ``TCMALLOC_RELEASE_RATE=0`` and a large-allocation report threshold of 1 TiB (quiet).

No loops: the re-exec sets ``ECOMAX_ALLOCATOR_ACTIVE`` (what was applied) and ``ECOMAX_ALLOCATOR_EXEC``
(the pid that re-executed); a process never re-executes twice, and a child that inherits the variables
(``ecomax launch local`` ranks) runs as it is. An allocator the user preloaded by hand is kept.
"""

from __future__ import annotations

import dataclasses
import os
import site
import sys
import sysconfig
from collections.abc import Mapping, MutableMapping

ENV_SWITCH = "ECOMAX_ALLOCATOR"
ENV_ACTIVE = "ECOMAX_ALLOCATOR_ACTIVE"
ENV_EXEC = "ECOMAX_ALLOCATOR_EXEC"
# Fastest first as measured (README "Benchmarking": tcmalloc > jemalloc ~ mimalloc > glibc); the mimalloc
# wheel is last but always there after ecomax's set-up, the other two only where the system has them.
AUTO_ORDER = ("tcmalloc", "jemalloc", "mimalloc")
SYSTEM = "system"
_SYSTEM_ALIASES = {"system": SYSTEM, "glibc": SYSTEM, "off": SYSTEM, "none": SYSTEM}
CHOICES = ("auto", SYSTEM, *AUTO_ORDER)

# Library file names, best first, and the settings that make each one keep freed memory.
_LIBRARIES = {
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
    "jemalloc": ("libjemalloc.so.2",),
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
}
SETTINGS = {
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"},
    "tcmalloc": {"TCMALLOC_RELEASE_RATE": "0", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)},
}
_MARKERS = {"mimalloc": "libmimalloc", "jemalloc": "libjemalloc", "tcmalloc": "libtcmalloc"}


@dataclasses.dataclass(frozen=True)
class Allocator:
    name: str  # mimalloc | jemalloc | tcmalloc | system
    path: str | None = None  # the shared library (None for system)

    @property
    def label(self) -> str:
        return SYSTEM if self.path is None else f"{self.name}:{self.path}"


def _site_dirs() -> list[str]:
    dirs = [sysconfig.get_paths().get(k) for k in ("purelib", "platlib")]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some virtualenv layouts
        pass
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    return list(dict.fromkeys(d for d in dirs if d))


def _system_dirs() -> list[str]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{multiarch}" if multiarch else "", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib64", "/lib"]
    return list(dict.fromkeys(d for d in dirs if d))


def find(name: str) -> str | None:
    """The path of allocator ``name``'s shared library, or None when it is not installed."""
    if name == "mimalloc":  # the wheel first: it is what `pip install ecomax` brings
        dirs = [os.path.join(d, "cmeel.prefix", "lib") for d in _site_dirs()] + _system_dirs()
    else:
        dirs = _system_dirs()
    for d in dirs:
        for lib in _LIBRARIES[name]:
            path = os.path.join(d, lib)
            if os.path.isfile(path):
                return os.path.realpath(path)
    return None


class AllocatorError(ValueError):
    pass


def requested(env: Mapping[str, str]) -> str:
    """The normalised value of ``ECOMAX_ALLOCATOR`` (raises AllocatorError on an unknown one)."""
    value = env.get(ENV_SWITCH, "").strip().lower() or "auto"
    value = _SYSTEM_ALIASES.get(value, value)
    if value not in CHOICES:
        raise AllocatorError(f"{ENV_SWITCH}={env.get(ENV_SWITCH)!r}: expected one of {', '.join(CHOICES)}")
    return value


def choose(env: Mapping[str, str]) -> tuple[Allocator, str | None]:
    """(the allocator to run under, a warning or None) for the switch in ``env``."""
    want = requested(env)
    if want == SYSTEM:
        return Allocator(SYSTEM), None
    if want == "auto":
        for name in AUTO_ORDER:
            path = find(name)
            if path:
                return Allocator(name, path), None
        return Allocator(SYSTEM), None
    path = find(want)
    if path is None:
        return Allocator(SYSTEM), (f"{ENV_SWITCH}={want}: no {_LIBRARIES[want][0]} found; "
                                   "running with the system allocator")
    return Allocator(want, path), None


def _preload_list(env: Mapping[str, str]) -> list[str]:
    return [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]


def _users_own(env: Mapping[str, str]) -> Allocator | None:
    """An allocator in LD_PRELOAD that ecomax did not put there."""
    ours = env.get(ENV_ACTIVE, "").partition(":")[2]
    for path in _preload_list(env):
        if path == ours:
            continue
        for name, marker in _MARKERS.items():
            if marker in os.path.basename(path):
                return Allocator(name, path)
    return None


def apply(env: Mapping[str, str]) -> tuple[dict[str, str], Allocator, str | None]:
    """``env`` changed to run a new process under the chosen allocator: (new env, allocator, warning).

    Removes a library an earlier ecomax process preloaded when the switch now names another (or none).
    """
    new = dict(env)
    own = _users_own(env)
    if own is not None and requested(env) != SYSTEM:
        return new, own, None
    chosen, warning = choose(env)
    old = env.get(ENV_ACTIVE, "").partition(":")[2]
    preload = [p for p in _preload_list(env) if p != old]
    if chosen.path is not None:
        preload.insert(0, chosen.path)
        for key, value in SETTINGS[chosen.name].items():
            new.setdefault(key, value)
    if preload:
        new["LD_PRELOAD"] = " ".join(preload)
    else:
        new.pop("LD_PRELOAD", None)
    new[ENV_ACTIVE] = chosen.label
    return new, chosen, warning


def mapped(path: str | None, pid: int | str = "self") -> bool:
    """Whether ``path`` (a shared library) is mapped into process ``pid``."""
    if path is None:
        return False
    try:
        with open(f"/proc/{pid}/maps") as f:
            real = os.path.realpath(path)
            return any(line.rstrip().endswith((path, real)) for line in f)
    except OSError:
        return False


def current(env: Mapping[str, str] | None = None) -> dict:
    """What this process runs under, for the run log and `ecomax bench`'s JSON."""
    env = os.environ if env is None else env
    own = _users_own(env)
    if own is not None:
        alloc, source = own, "LD_PRELOAD (set by the user)"
    else:
        name, _, path = env.get(ENV_ACTIVE, SYSTEM).partition(":")
        alloc = Allocator(name, path or None)
        source = f"{ENV_SWITCH}={env.get(ENV_SWITCH, 'auto')}"
    is_mapped = mapped(alloc.path)
    settings = {k: env[k] for k in SETTINGS.get(alloc.name, {}) if k in env}
    return {"name": alloc.name if (alloc.path is None or is_mapped) else SYSTEM, "requested": alloc.name,
            "library": alloc.path, "mapped": is_mapped, "settings": settings, "source": source}


def describe(info: dict | None = None) -> str:
    info = current() if info is None else info
    if info["library"] is None:
        return f"allocator: system (glibc malloc; {info['source']})"
    if not info["mapped"]:
        return f"allocator: system (glibc malloc): {info['library']} is not mapped ({info['source']})"
    settings = " ".join(f"{k}={v}" for k, v in info["settings"].items())
    return f"allocator: {info['name']} ({info['library']}{', ' + settings if settings else ''}; {info['source']})"


def ensure(environ: MutableMapping[str, str] | None = None, argv: list[str] | None = None) -> str | None:
    """Re-execute this process once under the chosen allocator when it is not in it yet.

    Returns a warning to print, or None. Does not return when it re-executes.
    """
    environ = os.environ if environ is None else environ
    if environ.get(ENV_EXEC) == str(os.getpid()):
        return None  # this very process was re-executed already: never again
    new, chosen, warning = apply(environ)
    already = environ.get(ENV_ACTIVE) == chosen.label and (chosen.path is None or mapped(chosen.path))
    if already or (chosen.path is None and not environ.get(ENV_ACTIVE, "").partition(":")[2]):
        environ[ENV_ACTIVE] = chosen.label
        return warning
    if _users_own(environ) is not None and chosen == _users_own(environ):
        return warning
    new[ENV_EXEC] = str(os.getpid())
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    if warning:
        print(f"ecomax: {warning}", file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, new)
    return None  # not reached
