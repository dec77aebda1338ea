"""build.py, the build cache of the emulation and the CPU decoder (issue 10, items 1-3): a
folder only this user can write to, libraries verified (sha256 recorded at build time) before
they are loaded, broken entries rebuilt, $CXX with flags, a C compiler refused clearly, and many
edited kernels loaded in one process.

Most tests use a stand-in compiler that copies the library the session already built (same
sources, same flags), so that a rebuild costs no compile; a few compile for real."""
import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import private_cache
from minqlora import build, emulate
from minqlora.backends import dequantize_4bit
from minqlora.quant_state import decode_4bit, quantize_4bit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    return private_cache(tmp_path, monkeypatch)


@pytest.fixture
def fake_compiler(emulation, monkeypatch):
    """subprocess.run stand-in: 'compiles' by copying the session's library; records commands."""
    commands = []

    def run(command, cwd, **kwargs):
        commands.append(command)
        shutil.copy(emulation._name, Path(cwd, "lib.so"))
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(build.subprocess, "run", run)
    return commands


def works():
    """The library build_emulation returns decodes bit for bit like the definition."""
    packed, state = quantize_4bit(torch.randn(1000, generator=torch.Generator().manual_seed(0)))
    return torch.equal(dequantize_4bit(packed, state, backend="emulate"),
                       decode_4bit(packed, state))


def the_library(folder: Path) -> Path:
    (lib,) = folder.glob("dequant_emulate_*.so")
    return lib


def test_cache_is_created_private_and_records_a_digest(cache, fake_compiler):
    emulate.build_emulation()
    assert cache.stat().st_mode & 0o777 == 0o700
    lib = the_library(cache)
    assert Path(f"{lib}.sha256").read_text() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert works() and len(fake_compiler) == 1


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_cache_others_can_write_to_is_refused(cache, mode):
    """Item 1: group- or world-writable -> an error naming the folder and how to choose another."""
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(RuntimeError, match=rf"build cache {cache} can be written by others "
                                           rf"\(mode {mode:o}\).*MINQLORA_CACHE="):
        emulate.build_emulation()


def test_a_cache_of_another_user_is_refused(cache, monkeypatch):
    cache.mkdir(mode=0o700)
    monkeypatch.setattr(build.os, "getuid", lambda: cache.stat().st_uid + 1)
    with pytest.raises(RuntimeError, match=rf"build cache {cache} belongs to user id .*, not to "
                                           "you.*MINQLORA_CACHE="):
        build.cache_dir()


def planted_library(tmp_path: Path, marker: Path) -> bytes:
    """A shared library whose constructor writes `marker` when it is loaded (the attack)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted library")
    src = tmp_path / "evil.c"
    src.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void run(void) '
                   f'{{ FILE* f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([cc, "-shared", "-fPIC", "-o", tmp_path / "evil.so", src], check=True)
    return (tmp_path / "evil.so").read_bytes()


def test_the_temp_dir_fallback_refuses_another_users_folder(tmp_path, monkeypatch):
    """Item 1 as reported: no writable ~/.cache, and <tempdir>/minqlora-<uid> made by someone
    else, world-writable, holding a library with the expected name: refused, nothing loaded."""
    monkeypatch.delenv("MINQLORA_CACHE", raising=False)
    monkeypatch.setattr(build, "_BUILT", {})
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))   # mkdir fails
    monkeypatch.setattr(build.tempfile, "tempdir", str(tmp_path / "tmp"))
    planted = tmp_path / "tmp" / f"minqlora-{os.getuid()}"
    planted.mkdir(parents=True)
    planted.chmod(0o777)
    marker = tmp_path / "it ran"
    for name in ("dequant_emulate_0.so", "lib.so"):
        (planted / name).write_bytes(planted_library(tmp_path, marker))
    with pytest.raises(RuntimeError, match=rf"{planted} can be written by others"):
        emulate.build_emulation()
    assert not marker.exists()
    planted.chmod(0o700)                                # now private: used, and safe
    assert build.cache_dir() == planted


def entry(folder: Path, emulation, damage: bytes = None) -> Path:
    """A copy of the session's cache entry (library + recorded digest) in `folder`, its library
    replaced by `damage`. (Never damage a library this process has loaded: that file is mapped
    into memory, and cutting it would crash this very process.)"""
    folder.mkdir(mode=0o700, exist_ok=True)
    lib = folder / Path(emulation._name).name          # the name the build will look for
    shutil.copy(f"{emulation._name}.sha256", f"{lib}.sha256")
    lib.write_bytes(Path(emulation._name).read_bytes() if damage is None else damage)
    return lib


@pytest.mark.parametrize("record", ["the real build's digest", "no digest"])
def test_a_planted_library_in_the_cache_is_never_loaded(cache, tmp_path, emulation, record):
    """Item 1: a library with the expected name whose bytes are not the recorded build, or that
    has no record at all, is rebuilt (for real here), never loaded."""
    marker = tmp_path / "it ran"
    evil = planted_library(tmp_path, marker)
    lib = entry(cache, emulation, evil)
    if record == "no digest":
        Path(f"{lib}.sha256").unlink()
    emulate.build_emulation()
    assert not marker.exists() and lib.read_bytes() != evil and works()


@pytest.mark.parametrize("damage", ["empty", "4 kB", "24 kB", "garbage", "digest"])
def test_a_damaged_library_is_rebuilt(cache, fake_compiler, emulation, damage):
    """Item 2: a cut (it killed Python with SIGBUS), empty or garbage library, or a wrong
    recorded digest: never loaded, rebuilt."""
    good = Path(emulation._name).read_bytes()
    lib = entry(cache, emulation, {"empty": b"", "4 kB": good[:4096], "24 kB": good[:24000],
                                   "garbage": os.urandom(len(good)), "digest": good}[damage])
    if damage == "digest":
        Path(f"{lib}.sha256").write_text("0" * 64)
    emulate.build_emulation()
    assert len(fake_compiler) == 1 and lib.read_bytes() == good and works()


def test_an_intact_entry_is_loaded_without_a_build(cache, fake_compiler, emulation):
    entry(cache, emulation)
    emulate.build_emulation()
    assert fake_compiler == [] and works()


def test_cxx_with_flags_is_used(cache, emulation, monkeypatch):
    """Item 3: $CXX is a program and its flags; the flags come last, so -O0 wins over -O3.
    (Compiles for real.)"""
    cxx = Path(build.compiler()[0]).name
    monkeypatch.setenv("CXX", f"{cxx} -O0 -DMINQLORA_FLAG='\"a b\"'")
    commands, run = [], subprocess.run
    monkeypatch.setattr(build.subprocess, "run",
                        lambda command, **kw: commands.append(command) or run(command, **kw))
    assert emulate.build_emulation() is not emulation and works()
    (command,) = commands
    assert command[-5:] == ["-O0", '-DMINQLORA_FLAG="a b"', "-o", "lib.so", "emulate.cpp"]
    assert command.index("-O3") < command.index("-O0")


@pytest.mark.parametrize("cxx, match", [
    ("no-such-compiler -O2", r"\$CXX is 'no-such-compiler -O2', but 'no-such-compiler' is not "
                             "a program on the PATH"),
    ("g++ '-O2", r"\$CXX=\"g\+\+ '-O2\" cannot be split"),
])
def test_a_bad_cxx_is_refused(cache, monkeypatch, cxx, match):
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(emulate.EmulationUnavailable, match=match):
        emulate.build_emulation()


def test_a_c_compiler_is_refused_clearly(cache, monkeypatch):
    """Item 3: CXX=gcc compiles the .cpp but links no C++ runtime; the link fails (-z defs)
    with a message that says so, and nothing is cached. (Compiles for real.)"""
    if shutil.which("gcc") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs gcc on Linux")
    monkeypatch.setenv("CXX", "gcc")
    with pytest.raises(RuntimeError, match=r"with .*gcc failed; it links no C\+\+ runtime: set "
                                           r"CXX to a C\+\+ compiler"):
        emulate.build_emulation()
    assert not list(cache.glob("*.so"))


def test_no_static_tls(emulation):
    """Item 3's cause: a library with the STATIC_TLS flag takes the loader's small static TLS
    reserve, which ran out at the 4th edited kernel. Ours must not carry it."""
    readelf = shutil.which("readelf")
    if readelf is None or not sys.platform.startswith("linux"):
        pytest.skip("needs readelf on Linux")
    dynamic = subprocess.run([readelf, "-d", emulation._name], capture_output=True, text=True,
                             check=True).stdout
    assert "STATIC_TLS" not in dynamic


def test_twenty_four_edited_kernels_in_one_process(emulation, tmp_path):
    """Item 3: a learner edits the kernel again and again in one notebook. 24 distinct sources,
    each a library of its own loaded into one fresh Python (the stand-in compiler copies the
    session's library, built with the real flags), each decoding bit for bit."""
    script = textwrap.dedent(f"""
        import shutil, subprocess, torch
        from pathlib import Path
        from minqlora import build, emulate, launch
        from minqlora.quant_state import decode_4bit, quantize_4bit
        def run(command, cwd, **kwargs):
            shutil.copy({emulation._name!r}, Path(cwd, "lib.so"))
            return subprocess.CompletedProcess(command, 0, "", "")
        build.subprocess.run = run
        packed, state = quantize_4bit(torch.randn(5000))
        libs = set()
        for i in range(24):
            source = launch.kernel_source() + f"\\n// edit {{i}}\\n"
            out = torch.empty(5000)
            emulate.launch_emulation(packed, state, out, source=source)
            assert torch.equal(out, decode_4bit(packed, state)), i
            libs.add(emulate.build_emulation(source)._name)
        print(len(libs))
    """)
    env = dict(os.environ, MINQLORA_CACHE=str(tmp_path / "cache"))
    env.pop("CXX", None)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["24"]
