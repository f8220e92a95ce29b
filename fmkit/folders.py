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

MARK = ".fmkit-folder.json"
FORMAT = "fmkit-folder"


@dataclass(frozen=True)
class FolderKind:
    """What one kind of command writes.

    Attributes:
        name: the kind recorded in the mark ("run", "samples", ...).
        what: what such a folder holds, for messages ("a training run").
        command: the command that writes it ("fmkit train").
        signature: entries an unmarked folder of this kind written by an older fmkit must hold.
        allowed: glob patterns of every entry such a folder may hold.
        recognise: a further check of an unmarked folder's contents (e.g. its config.json).
    """

    name: str
    what: str
    command: str
    signature: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    recognise: Callable[[Path], bool] | None = None

    def written_before(self, root: Path, entries: list[str]) -> bool:
        """Whether an unmarked, non-empty `root` is this kind's output from before marks."""
        if not self.allowed or not all((root / name).exists() for name in self.signature):
            return False
        if not all(any(fnmatch.fnmatch(e, p) for p in self.allowed) for e in entries):
            return False
        return self.recognise is None or self.recognise(root)


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
    recorded: list[str] = field(default_factory=list)
    ours: bool = False

    def add(self, *names: str) -> None:
        """Record `names` (top-level entries) before they are written; creates the folder.

        An entry that exists but was not recorded is someone else's file: an error."""
        new = [n for n in names if n not in self.recorded]
        for name in new:
            if (self.root / name).exists() or (self.root / name).is_symlink():
                raise FmkitError(
                    f"{self.root / name} was not written by {self.kind.command}; move it away "
                    "or choose another folder"
                )
        if new or not (self.root / MARK).is_file():
            self.recorded.extend(new)
            self._write_mark()

    def path(self, name: str) -> Path:
        """`root / name`, recorded first (see `add`)."""
        self.add(name)
        return self.root / name

    def retire(self, keep: Iterable[str] = ()) -> None:
        """Remove the recorded entries not in `keep`: earlier output of this kind that the
        current write replaces (a folder of samples, an export's stale files)."""
        keep = set(keep)
        stale = [n for n in self.recorded if n not in keep]
        for name in stale:
            _remove(self.root / name)
        if stale:
            self.recorded = [n for n in self.recorded if n in keep]
            self._write_mark()

    def write_staged(self, write: Callable[[Path], None], last: Iterable[str] = ()) -> list[Path]:
        """Output written aside and moved into place whole: `write(staging)` fills a recorded
        folder inside root (named after this host and process, so concurrent writers never
        share one), then `install` moves its entries in. If `write` fails, the staging folder
        goes, and so does the root when this write created it: a failed export or array
        leaves nothing behind. Returns the installed paths."""
        created = not self.root.exists()  # by this write: it may take the folder away again
        name = f".staging-{socket.gethostname()}-{os.getpid()}"
        staging = self.path(name)
        _remove(staging)  # a leftover of a crashed process that had this pid
        try:
            staging.mkdir()
            write(staging)
        except BaseException:
            _remove(staging)
            self.recorded.remove(name)
            if not self.ours and {p.name for p in self.root.iterdir()} <= {MARK}:
                _remove(self.root / MARK)  # the folder is as it was before the write
                if created:
                    self.root.rmdir()
            else:
                self._write_mark()
            raise
        # Libraries write some files privately (safetensors: 0600); outputs get what the
        # umask gives, as every other file fmkit writes.
        mask = _umask()
        for path in staging.rglob("*"):
            if not path.is_symlink():
                path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
        return self.install(staging, last)

    def install(self, staging: Path, last: Iterable[str] = ()) -> list[Path]:
        """Move every entry of `staging` into root (replacing this kind's earlier entries of
        the same name), then remove `staging` and every other recorded entry. Entries in
        `last` move after the others (a completion marker such as meta.json), and are
        removed from root first, so a reader never pairs old and new files. Returns the
        installed paths."""
        last = list(last)
        entries = sorted(p.name for p in staging.iterdir())
        order = [n for n in entries if n not in last] + [n for n in last if n in entries]
        self.add(*order)
        for name in last:
            _remove(self.root / name)
        installed = []
        for name in order:
            target = self.root / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            installed.append(target)
        self.retire(keep=order)
        return installed

    def _write_mark(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FmkitError(f"cannot write {self.root}: {exc.strerror or exc}") from None
        mark = {
            "format": FORMAT,
            "kind": self.kind.name,
            "what": self.kind.what,
            "command": self.kind.command,
            "files": self.recorded,
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
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    mark = read_mark(root)
    if mark is not None:
        if mark["kind"] != kind.name:
            raise FmkitError(
                f"{root} holds {mark['what']} (written by {mark.get('command', 'fmkit')}); "
                f"{kind.command} writes only into a new or empty folder or one it wrote: "
                "choose another folder"
            )
        return Claim(root, kind, list(mark["files"]), ours=True)
    if not entries:
        return Claim(root, kind)
    if kind.written_before(root, entries):
        return Claim(root, kind, entries, ours=True)
    raise FmkitError(
        f"{root} is not empty and {kind.command} did not write it (it holds "
        f"{_listing(entries)}); choose a new or empty folder"
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
        str(mark["kind"]), str(mark["what"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        raise FmkitError(f"{path} is damaged; fmkit cannot tell who wrote {root}") from None
    return mark


def kind_of(root: Path) -> str | None:
    """The kind recorded in `root`'s mark, or None."""
    mark = read_mark(root) if Path(root).is_dir() else None
    return None if mark is None else mark["kind"]


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
