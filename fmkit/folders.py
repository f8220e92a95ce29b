"""Folders have owners, and files are written whole.

Every command that writes a folder first *claims* it: a new or empty folder, or one that the
same kind of command wrote before. Its mark, `.fmkit-folder.json`, says which kind wrote the
folder and lists every entry it wrote. Anything else — another command's output, files fmkit
did not write — is refused with one line saying what is there, and the claim writes nothing,
so a command checks its folder together with its other arguments before any output exists.
Afterwards the writer creates, replaces and removes only entries its mark records; files a
user puts beside them later are never touched.

Folders that fmkit wrote before marks existed are recognised by their contents (a kind's
`signature` files, nothing outside its `allowed` patterns) and adopted on the first write.

`write_atomic` writes a file through a temporary file and a rename, with the permissions the
umask gives: a crash or a full disk leaves the previous version intact.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fmkit.errors import FmkitError

try:
    import fcntl
except ImportError:  # not on Windows: marks are then updated without a lock
    fcntl = None

MARK = ".fmkit-folder.json"
FORMAT = "fmkit-folder"


@dataclass(frozen=True)
class FolderKind:
    """What one kind of command writes.

    Attributes:
        name: the kind recorded in the mark ("run", "samples", ...).
        what: what such a folder holds, for messages ("a training run").
        command: the command that writes it ("fmkit train").
        signature: entries an unmarked folder of this kind written by an older fmkit holds.
        allowed: glob patterns of the entries such a folder's writer wrote; empty: an unmarked
            folder is never taken for this kind's.
        recognise: a check of an unmarked folder's contents (e.g. its config.json).
    """

    name: str
    what: str
    command: str
    signature: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    recognise: Callable[[Path], bool] | None = None

    def written_before(self, root: Path, entries: list[str]) -> list[str] | None:
        """The entries of an unmarked, non-empty `root` that this kind wrote before marks
        existed, or None when it is not such a folder. Other entries (a log beside a run)
        stay the user's."""
        ours = [e for e in entries if any(fnmatch.fnmatch(e, p) for p in self.allowed)]
        if not ours or not all((root / name).exists() for name in self.signature):
            return None
        if self.recognise is not None:
            return ours if self.recognise(root) else None
        # Nothing but names to go by: every entry must be one this kind writes.
        return ours if self.signature and len(ours) == len(entries) else None


@dataclass
class Claim:
    """A folder a command may write, with what earlier writes of its kind left there.

    Attributes:
        root: the folder (it may not exist yet).
        kind: the kind of output it holds.
        recorded: entries (top-level names) that this kind wrote, now or before.
        ours: the folder already held this kind's output when it was claimed.
    """

    root: Path
    kind: FolderKind
    recorded: set[str] = field(default_factory=set)
    ours: bool = False

    def add(self, *names: str) -> None:
        """Record `names` (top-level entries) before they are written; creates the folder.

        An entry that exists but was not recorded is someone else's file: an error."""
        for name in names:
            _check_name(name, self.root)
        if not set(names) - self.recorded and (self.root / MARK).is_file():
            return
        with self._locked():
            known = self._reread()
            for name in set(names) - known:
                if (self.root / name).exists() or (self.root / name).is_symlink():
                    raise FmkitError(
                        f"{self.root / name} was not written by {self.kind.command}; move it "
                        "away or choose another folder"
                    )
            self._write_mark(known | set(names))

    def path(self, name: str) -> Path:
        """`root / name`, recorded first (see `add`)."""
        self.add(name)
        return self.root / name

    def retire(self, keep: Iterable[str] = ()) -> None:
        """Remove the recorded entries not in `keep`: earlier output of this kind that the
        current write replaces (a folder of samples, an export's stale files). Another live
        writer's staging folder is not this write's to remove."""
        keep = set(keep)
        if not self.root.is_dir():
            return
        with self._locked():
            known = self._reread()
            stale = {n for n in known - keep if not _foreign_staging(n)}
            for name in sorted(stale):
                _remove(self.root / name)
            if stale:
                self._write_mark(known - stale)

    def write_staged(self, write: Callable[[Path], None], last: Iterable[str] = ()) -> list[Path]:
        """Output written aside and moved into place whole: `write(staging)` fills a recorded
        folder inside root (named after this host and process, so concurrent writers never
        share one), then `install` moves its entries in. If `write` fails, the staging folder
        goes, and so does the root when this write created it: a failed export or array
        leaves nothing behind. Returns the installed paths."""
        created = not self.root.exists()  # by this write: it may take the folder away again
        staging = self.path(_staging_name())
        _remove(staging)  # a leftover of a crashed process that had this pid
        try:
            staging.mkdir()
            write(staging)
            # Libraries write some files privately (safetensors: 0600); outputs get what the
            # umask gives, as every other file fmkit writes.
            mask = _umask()
            for path in staging.rglob("*"):
                if not path.is_symlink():
                    path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
            return self.install(staging, last)
        except BaseException:
            _remove(staging)
            with self._locked():
                known = self._reread() - {staging.name}
                if not self.ours and {p.name for p in self.root.iterdir()} <= {MARK}:
                    _remove(self.root / MARK)  # the folder is as it was before the write
                else:
                    self._write_mark(known)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()
            raise

    def install(self, staging: Path, last: Iterable[str] = ()) -> list[Path]:
        """Move every entry of `staging` into root (replacing this kind's earlier entries of
        the same name), remove every other recorded entry, then `staging`. Entries in `last`
        (a completion marker such as meta.json) leave root first and come back last, so a
        reader never pairs old and new files. Returns the installed paths."""
        entries = sorted(p.name for p in staging.iterdir())
        last = [n for n in last if n in entries]
        first = [n for n in entries if n not in last]
        self.add(*entries)
        for name in last:
            _remove(self.root / name)
        for name in first:
            _replace(staging / name, self.root / name)
        self.retire(keep={*entries, staging.name})
        for name in last:
            _replace(staging / name, self.root / name)
        _remove(staging)
        with self._locked():
            self._write_mark(self._reread() - {staging.name})
        return [self.root / name for name in first + last]

    @contextlib.contextmanager
    def _locked(self):
        """Hold the folder's lock (flock on the folder itself, where the platform has it):
        writers of one folder (nodes filling a shared cache) update its mark in turn."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FmkitError(f"cannot write {self.root}: {exc.strerror or exc}") from None
        if fcntl is None:
            yield
            return
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _reread(self) -> set[str]:
        """What the mark on disk records now (under the lock: another writer of this kind may
        have changed it since the claim), or what the claim found when there is none yet."""
        mark = read_mark(self.root)
        if mark is not None and mark["kind"] == self.kind.name:  # the mark on disk is the truth
            self.recorded = set(mark["files"])
        return set(self.recorded)

    def _write_mark(self, files: set[str]) -> None:
        self.recorded = set(files)
        mark = {
            "format": FORMAT,
            "kind": self.kind.name,
            "what": self.kind.what,
            "command": self.kind.command,
            "files": sorted(self.recorded),
        }
        write_atomic(self.root / MARK, (json.dumps(mark, indent=1) + "\n").encode())


def json_file(name: str, keys: Iterable[str] = (), **values) -> Callable[[Path], bool]:
    """A `FolderKind.recognise` check: `root / name` is a JSON object holding `keys` and
    `values` (e.g. a prepared array's meta.json, a model folder's config.json)."""

    def recognise(root: Path) -> bool:
        try:
            data = json.loads((root / name).read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(data, dict)
            and set(keys) <= data.keys()
            and all(data.get(k) == v for k, v in values.items())
        )

    return recognise


def claim(root: str | Path, kind: FolderKind) -> Claim:
    """Check that `kind` may write `root`, writing nothing (see the module docstring)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FmkitError(f"{root} is a file, not a folder")
    _check_writable(root)
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    mark = read_mark(root)
    if mark is not None:
        if mark["kind"] != kind.name:
            raise FmkitError(
                f"{root} holds {mark['what']} (written by {mark.get('command', 'fmkit')}); "
                f"{kind.command} writes only into a new or empty folder or one it wrote: "
                "choose another folder"
            )
        return Claim(root, kind, set(mark["files"]), ours=True)
    if not entries:
        return Claim(root, kind)
    written = kind.written_before(root, entries)
    if written is not None:
        return Claim(root, kind, set(written), ours=True)
    foreign = [e for e in entries if not any(fnmatch.fnmatch(e, p) for p in kind.allowed)]
    raise FmkitError(
        f"{root} is not empty and {kind.command} did not write it (it holds "
        f"{_listing(foreign or entries)}); choose a new or empty folder"
    )


def _check_writable(root: Path) -> None:
    """A folder that could never be written (a read-only mount, no permission) is refused now,
    before a command spends time on work it could not keep."""
    existing = Path(os.path.abspath(root))
    while not existing.exists():
        existing = existing.parent
    if os.access(existing, os.W_OK | os.X_OK):
        return
    read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
    raise FmkitError(
        f"cannot write {root}: {'Read-only file system' if read_only else 'Permission denied'}"
    )


def read_mark(root: Path) -> dict | None:
    """The mark of `root`, None when it has none; an unreadable mark is an error."""
    path = Path(root) / MARK
    if not path.is_file():
        return None
    try:
        mark = json.loads(path.read_text())
        if mark.get("format") != FORMAT or not isinstance(mark.get("files"), list):
            raise ValueError
        if not all(isinstance(mark[key], str) for key in ("kind", "what")):
            raise ValueError
        for name in mark["files"]:  # entries name files in this folder, nothing else
            _check_name(name, root)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, FmkitError):
        raise FmkitError(f"{path} is damaged; fmkit cannot tell who wrote {root}") from None
    return mark


def _check_name(name, root: Path) -> None:
    """A recorded entry is a plain name inside the folder: never a path that leads out."""
    if not isinstance(name, str) or name in ("", ".", "..", MARK) or "/" in name or "\\" in name:
        raise FmkitError(f"{name!r} is not a name of an entry of {root}")


def _staging_name() -> str:
    return f".staging-{socket.gethostname()}-{os.getpid()}"


def _foreign_staging(name: str) -> bool:
    """Whether `name` is the staging folder of another writer that may still be running (on
    another host, or a live process here)."""
    if not name.startswith(".staging-") or name == _staging_name():
        return False
    host, _, pid = name[len(".staging-") :].rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False  # its process is gone: a leftover
    except OSError:
        pass
    return True


def _replace(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


def size_of(paths: Iterable[Path]) -> int:
    """Bytes in `paths`, folders counted with everything inside them."""
    total = 0
    for path in paths:
        files = path.rglob("*") if path.is_dir() else [path]
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def _listing(entries: list[str]) -> str:
    shown = ", ".join(entries[:3])
    return shown + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


# Writing files.


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` whole: through a temporary file in the same folder, fsynced and
    renamed over `path`, so a crash, a kill or a full disk leaves the previous file intact. The
    file gets the permissions the umask gives (mkstemp alone would make it private). A failure
    is one FmkitError naming the path and the cause."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise FmkitError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise FmkitError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


def write_json(path: Path, data) -> Path:
    """`data` as indented JSON, written atomically."""
    return write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def _umask() -> int:
    try:  # Linux says it without changing it (setting it would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask
