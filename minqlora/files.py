"""Files saved and loaded safely (issues 10 and 22): a save replaces its files only once they
are complete, through private temporary files with unique names; a load reads only regular
files, within a size cap, and never blocks.

    replace_together({path: write}):  write(temporary) for each path, every temporary made by
                                      mkstemp (mode 0600, a unique name) in the path's folder;
                                      then each moved onto its path (os.replace: never a half
                                      file); if any step fails, the old files are put back
    read_regular(path, cap):          the bytes of a regular file of at most cap bytes

Worked example: save_adapter writes adapter_model.safetensors and adapter_config.json with
replace_together. A full disk while the config is written leaves both old files untouched; a
link planted at a temporary name is never written through (mkstemp picks a new name, O_EXCL);
two processes saving into one folder never remove each other's temporaries.
"""
import contextlib
import os
import shutil
import stat
import tempfile

JSON_CAP = 16 << 20   # bytes of a JSON config at most (PEFT's are a few KB)


def _temporary(path) -> str:
    """A new, empty, private file beside `path` (same folder: os.replace stays a rename)."""
    folder, name = os.path.split(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    os.close(handle)
    return temporary


def _keep(path):
    """A second name for the file at `path` (None if there is none), to put it back with."""
    if not os.path.lexists(path):
        return None
    backup = _temporary(path)
    os.remove(backup)
    try:
        os.link(path, backup, follow_symlinks=False)      # the same file: no copy
    except OSError:                                       # a file system without hard links
        shutil.copy2(path, backup, follow_symlinks=False)
    return backup


def replace_together(writers: dict) -> None:
    """Write each {path: write} pair's file through a temporary (write(temporary path) fills
    it), then move them all into place; on any error every path is left as it was."""
    temporaries, backups, moved = {}, {}, []
    try:
        for path, write in writers.items():
            temporaries[path] = _temporary(path)
            write(temporaries[path])
        for path, temporary in temporaries.items():
            backups[path] = _keep(path) if len(writers) > 1 else None
            os.replace(temporary, path)
            moved.append(path)
    except BaseException:
        for path in reversed(moved):                      # put the old files back
            if backups[path] is None:
                os.remove(path)
            else:
                os.replace(backups[path], path)
        raise
    finally:
        for name in [*temporaries.values(), *backups.values()]:
            with contextlib.suppress(OSError, TypeError):
                os.remove(name)


def text_writer(text: str):
    """A write(path) for replace_together / write_atomic that writes `text` (UTF-8)."""
    def write(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return write


def write_atomic(path, write) -> None:
    """write(temporary), then the temporary replaces `path`: a reader never sees half a file."""
    replace_together({path: write})


def read_regular(path, cap: int = None, where: str = "") -> bytes:
    """The bytes of the regular file at `path` (a link to one counts), at most `cap` of them,
    or a ValueError saying why not: a folder, a device such as /dev/zero, a FIFO (opened
    without blocking, so a FIFO never hangs), or too big. cap=None checks the kind only and
    returns b"" (for a reader that opens the file itself)."""
    prefix = f"{where}: " if where else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise ValueError(f"{prefix}cannot open {path}: {error.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode) or cap is None:
        os.close(fd)
        if stat.S_ISREG(mode):
            return b""
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device or other special file")
        raise ValueError(f"{prefix}{path} is {kind}, not a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise ValueError(f"{prefix}{path} has more than {cap} bytes; a file this big is not one "
                         "minqlora wrote")
    return data
