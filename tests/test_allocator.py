"""paraencoder.allocator: when the CLI re-executes itself under tcmalloc, and that it does so once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from paraencoder import allocator as al

LINUX_MAPS = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


@pytest.fixture
def fake_lib(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libtcmalloc_minimal.so.4").write_bytes(b"\x7fELF")
    return lib


def test_find_searches_the_usual_dirs_and_honours_the_explicit_path(fake_lib, tmp_path):
    assert al.find_tcmalloc({}, dirs=[str(tmp_path / "nowhere"), str(fake_lib)]) == str(fake_lib / "libtcmalloc_minimal.so.4")
    assert al.find_tcmalloc({}, dirs=[str(tmp_path / "nowhere")]) is None
    conda = tmp_path / "conda"
    (conda / "lib").mkdir(parents=True)
    (conda / "lib" / "libtcmalloc.so").write_bytes(b"\x7fELF")
    assert al.find_tcmalloc({"CONDA_PREFIX": str(conda)}, dirs=[]) == str(conda / "lib" / "libtcmalloc.so")
    explicit = fake_lib / "libtcmalloc_minimal.so.4"
    assert al.find_tcmalloc({al.LIBRARY_ENV: str(explicit)}, dirs=[]) == str(explicit)
    with pytest.raises(FileNotFoundError, match=r"PARAENCODER_TCMALLOC.*not a file"):
        al.find_tcmalloc({al.LIBRARY_ENV: str(tmp_path / "typo.so")}, dirs=[str(fake_lib)])


def test_choice_defaults_to_tcmalloc_and_names_the_variable_on_a_bad_value():
    assert al.choice({}) == "tcmalloc"
    assert al.choice({al.ALLOCATOR_ENV: " System "}) == "system"
    with pytest.raises(ValueError, match=r"PARAENCODER_ALLOCATOR='jemalloc'.*tcmalloc, system"):
        al.choice({al.ALLOCATOR_ENV: "jemalloc"})


def test_preload_env_puts_the_library_first_once():
    env = al.preload_env("/x/libtcmalloc.so", {"LD_PRELOAD": "/a/liba.so:/x/libtcmalloc.so", "KEEP": "1"})
    assert env["LD_PRELOAD"] == "/x/libtcmalloc.so /a/liba.so" and env["KEEP"] == "1"
    assert al.preload_env("/x/t.so", {})["LD_PRELOAD"] == "/x/t.so"


def test_reexec_plan_only_when_everything_holds(fake_lib, monkeypatch):
    lib = str(fake_lib / "libtcmalloc_minimal.so.4")
    env = {al.LIBRARY_ENV: lib, "PATH": "/usr/bin"}
    args, new_env = al.reexec_plan(["fit", "--config", "r.yaml"], env, platform="linux", maps=LINUX_MAPS)
    assert args == [sys.executable, "-m", "paraencoder", "fit", "--config", "r.yaml"]
    assert new_env["LD_PRELOAD"] == lib and new_env["PATH"] == "/usr/bin"
    assert al.reexec_plan(["fit"], env, platform="darwin", maps=LINUX_MAPS) is None
    assert al.reexec_plan(["fit"], {**env, al.ALLOCATOR_ENV: "system"}, platform="linux", maps=LINUX_MAPS) is None
    assert al.reexec_plan(["fit"], env, platform="linux", maps=LINUX_MAPS + f"7f20-7f30 r-xp 0 0 2 {lib}\n") is None  # loaded already
    assert al.reexec_plan(["fit"], {**env, "LD_PRELOAD": lib}, platform="linux", maps=LINUX_MAPS) is None  # asked, refused: no loop
    assert al.reexec_plan([], env, platform="linux", maps=LINUX_MAPS) is None
    assert al.reexec_plan(["--help"], env, platform="linux", maps=LINUX_MAPS) is None
    monkeypatch.setattr(al, "_DIRS", ())
    assert al.reexec_plan(["fit"], {}, platform="linux", maps=LINUX_MAPS) is None  # no library: run as is


def test_command_reports_a_bad_allocator_setting(capsys, monkeypatch):
    from paraencoder.apps import cli

    monkeypatch.setenv(al.ALLOCATOR_ENV, "jemalloc")
    monkeypatch.setattr(sys, "argv", ["paraencoder", "fit"])
    assert cli.command() == 2
    assert "PARAENCODER_ALLOCATOR='jemalloc'" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux") or al.find_tcmalloc() is None, reason="no tcmalloc library on this machine")
def test_the_command_runs_once_under_tcmalloc():
    """A real re-exec: tcmalloc is mapped in the child, the notice is printed once, the command's own exit code comes back."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", al.ALLOCATOR_ENV)}
    probe = "import sys; from paraencoder import allocator; print('mapped', allocator.loaded())"
    out = subprocess.run([sys.executable, "-m", "paraencoder", "no-such-command"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown command 'no-such-command'" in out.stderr
    assert out.stderr.count("tcmalloc preloaded") == 1
    child = subprocess.run([sys.executable, "-c", probe], env=al.preload_env(al.find_tcmalloc(), env), capture_output=True, text=True, timeout=60)
    assert child.stdout.strip() == "mapped True"
    plain = subprocess.run([sys.executable, "-m", "paraencoder", "no-such-command"], env={**env, al.ALLOCATOR_ENV: "system"}, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "tcmalloc" not in plain.stderr
