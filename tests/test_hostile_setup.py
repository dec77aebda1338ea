"""Issue 22, a hostile setup: the build cache (item 13), its location (14) and the command
line's errors (15). Each test names its item; each failed on the code before the fix."""
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minqlora import __main__ as cli
from helpers import private_cache
from minqlora import build, emulate
from minqlora._checks import SetupError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    return private_cache(tmp_path, monkeypatch)


@pytest.fixture
def fake_compiler(emulation, monkeypatch):
    """subprocess.run stand-in: "compiles" by copying the session's library."""
    def run(command, cwd, **kwargs):
        shutil.copy(emulation._name, Path(cwd, "lib.so"))
        return subprocess.CompletedProcess(command, 0, "", "")
    monkeypatch.setattr(build.subprocess, "run", run)


def script(tmp_path, name, text) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


# item 13: the build cache rebuilds, or gives one clear line
def test_item13_a_compiler_that_writes_nothing_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("CXX", shutil.which("true"))
    with pytest.raises(SetupError, match="reported success but wrote no library"):
        emulate.build_emulation()


@pytest.mark.parametrize("which", [".so", ".sha256"])
def test_item13_a_folder_in_place_of_a_cache_entry_is_rebuilt(cache, fake_compiler, which):
    emulate.build_emulation()
    (lib,) = cache.glob("dequant_emulate_*.so")
    damaged = Path(f"{lib}.sha256") if which == ".sha256" else lib
    damaged.unlink()
    (damaged / "inside").mkdir(parents=True)
    build._BUILT.clear()
    emulate.build_emulation()
    assert lib.is_file() and Path(f"{lib}.sha256").is_file()


def test_item13_a_build_killed_part_way_leaves_nothing_behind(cache, fake_compiler, tmp_path):
    slow = script(tmp_path, "slow-cxx", "sleep 60\n")
    code = "from minqlora import emulate; emulate.build_emulation()"
    env = {**os.environ, "CXX": slow, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        for _ in range(600):                      # until the build folder exists
            if [p for p in cache.glob("*") if p.is_dir()]:
                break
            time.sleep(0.1)
        assert [p for p in cache.glob("*") if p.is_dir()], "the child never started its build"
    finally:
        os.killpg(child.pid, signal.SIGKILL)      # the child and its compiler: a killed build
        child.wait()
    emulate.build_emulation()                      # the next build clears the leftover
    assert not [p for p in cache.iterdir() if p.is_dir()]


def test_item13_a_library_that_would_end_the_process_is_refused(tmp_path):
    """g++ -fsanitize=address: loading the library makes ASan exit the process; the build loads
    it in a child first and refuses it with ASan's last line. (Compiles for real.)"""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ or clang++ on Linux")
    code = textwrap.dedent("""
        from minqlora.cpu_decode import build_decoder
        from minqlora._checks import SetupError
        try:
            build_decoder()
        except SetupError as e:
            print("REFUSED:", e)
    """)
    env = {**os.environ, "CXX": f"{cxx} -fsanitize=address", "PYTHONPATH": str(ROOT),
           "MINQLORA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    if "REFUSED" in done.stdout and "building" in done.stdout:
        pytest.skip(f"no ASan runtime here: {done.stdout[:200]}")
    assert "REFUSED: the library built with" in done.stdout, (done.returncode, done.stderr[-500:])
    assert done.returncode == 0 and not list((tmp_path / "cache").glob("*.so"))


# item 14: the cache's location
def test_item14_a_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("MINQLORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "rel")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert build.cache_dir() == tmp_path / "home" / ".cache" / "minqlora"
    assert not list((tmp_path / "cwd").iterdir())


def test_item14_a_link_planted_by_another_user_is_refused(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("making a link of another user needs root")
    monkeypatch.delenv("MINQLORA_CACHE", raising=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file" / "cache"))   # no usable home
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o777 | stat.S_ISVTX)                                     # like /tmp
    monkeypatch.setattr(build.tempfile, "tempdir", str(shared))
    chosen = tmp_path / "chosen"
    chosen.mkdir(mode=0o700)
    planted = shared / f"minqlora-{os.getuid()}"
    planted.symlink_to(chosen)
    os.lchown(planted, 12345, 12345)
    with pytest.raises(SetupError, match="is a link made by user id 12345"):
        build.cache_dir()


def test_item14_a_cache_inside_a_folder_anyone_can_rename_in_is_refused(tmp_path, monkeypatch):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)                                      # no sticky bit
    monkeypatch.setenv("MINQLORA_CACHE", str(tmp_path / "open" / "cache"))
    with pytest.raises(SetupError, match="which everyone can write to"):
        build.cache_dir()
    (tmp_path / "open").chmod(0o777 | stat.S_ISVTX)                       # sticky: fine
    assert build.cache_dir() == tmp_path / "open" / "cache"


# item 15: one line for an environment error; --plot checked before any work
def one_line_exit(capsys, monkeypatch, argv, work):
    monkeypatch.setattr("minqlora.tour.tour", lambda *args: work())
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    return exit_.value.code, err


def test_item15_a_cache_others_can_write_to_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    monkeypatch.setenv("MINQLORA_CACHE", str(tmp_path / "open"))
    code, err = one_line_exit(capsys, monkeypatch, ["--quick"], build.cache_dir)
    assert code == 1 and err.count("\n") == 1 and "can be written by others" in err, err


def test_item15_a_failing_compiler_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MINQLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", shutil.which("false"))
    monkeypatch.setattr(build, "_BUILT", {})
    from minqlora.cpu_decode import build_decoder
    code, err = one_line_exit(capsys, monkeypatch, ["--quick"], build_decoder)
    assert code == 1 and err.count("\n") == 1 and "failed" in err, err


def test_item15_plot_onto_a_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    (tmp_path / "figure.png").mkdir()
    code, err = one_line_exit(capsys, monkeypatch, ["--plot", str(tmp_path / "figure.png")],
                              lambda: pytest.fail("the tour ran"))
    assert code == 2 and "not a file you can write" in err, err


def test_the_build_folders_name_its_host_and_process(cache, fake_compiler, monkeypatch):
    """What the sweep relies on: build-<host>-<pid>-*; a dead process's folder is removed, a
    live one's (this process) is kept."""
    prefix = f"build-{socket.gethostname()}-"
    dead = "999999999"                             # above Linux's pid_max (2^22)
    cache.mkdir(mode=0o700)
    (cache / f"{prefix}{dead}-x").mkdir()
    (cache / f"{prefix}{os.getpid()}-y").mkdir()
    emulate.build_emulation()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [f"{prefix}{os.getpid()}-y"]


def test_item15_a_full_disk_is_one_line(capsys, monkeypatch):
    def full():
        raise OSError(28, "No space left on device")
    code, err = one_line_exit(capsys, monkeypatch, ["--quick"], full)
    assert code == 1 and err.count("\n") == 1 and "No space left" in err, err
