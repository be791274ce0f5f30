"""Apply image layers, base first, to an in-memory tree of the root filesystem.

The tree stores metadata and the location of each file's data, never the data,
so memory grows with the number of paths and not with file sizes. The rules
are those of Docker's layer unpacking (moby ``pkg/archive``) and the OCI
image-spec "Applying Changesets" section:

* Names are cleaned: ``./a``, ``a``, ``/a`` and ``a/`` are one path. An entry
  for the root itself (``./``) is skipped, because a layer cannot change the
  root directory's attributes.
* ``D/.wh.NAME`` removes ``D/NAME`` and everything under it. ``D/.wh..wh..opq``
  removes every child of ``D``. Both act when they are read, as in Docker,
  and only remove what lower layers made: paths that the same layer wrote
  earlier survive, so the result does not depend on where the marker sits.
  Other ``.wh..wh.*`` names (AUFS metadata) are skipped. A whiteout behind a
  dangling symlink removes nothing, and an opaque marker whose directory is
  a symlink or a file changes nothing, because Docker's walk does not follow
  it (umoci 0.4.7 empties the symlink's target instead).
* A new entry replaces whatever was at its path, except that a directory
  entry on an existing directory merges with it and only updates its
  metadata. Duplicates within a layer therefore resolve to the last one.
* Parent directories are resolved inside the root: a parent that a lower
  layer made a symlink is followed as the kernel would with the rootfs as
  ``/`` (absolute targets restart at the root, ``..`` stops at the root).
  The final component is never followed. Missing parents are created with
  mode 0755, owner 0:0 and mtime 0.
* A hardlink shares the file that its target names when the link is read.
  A later layer that replaces either name leaves the other name with the old
  content. Its header's mode, owner and mtime apply to the shared file, as
  ``chmod`` through one name would.
* Symlink targets are kept verbatim; they are only followed to resolve the
  parents of later entries.

Where runtimes differ, pulldocker takes the stricter choice and says so:

* A relative name or hardlink target that climbs out of the root with
  ``..`` rejects the image (Docker's "breakout" error); containerd would
  clamp it instead. In an absolute name ``..`` stops at ``/`` in both.
* A bare ``.wh.`` (an empty whiteout name) rejects the image, as containerd
  and the image-spec do; Docker would delete the parent directory.
* A parent path through a dangling symlink creates the missing directories
  at the symlink's target, as containerd and umoci do; Docker fails there.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable

from .errors import InvalidInputError, UnsafePathError
from .tarscan import (
    BLOCKDEV,
    CHARDEV,
    DIRECTORY,
    FIFO,
    HARDLINK,
    REGULAR_TYPES,
    SYMLINK,
    TarEntry,
)

__all__ = ["Inode", "Node", "RootFS", "clean_name"]

logger = logging.getLogger(__name__)

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."
_MAX_SYMLINK_HOPS = 40
_OWNER_NAMES: dict[bytes, bytes] = {}  # the Linux limit for one path lookup

REG = 0
DIR = 1
SYM = 2
CHR = 3
BLK = 4
FIFO_KIND = 5
_KIND_OF_TYPE = {
    DIRECTORY: DIR,
    SYMLINK: SYM,
    CHARDEV: CHR,
    BLOCKDEV: BLK,
    FIFO: FIFO_KIND,
}


class Inode:
    """A file's metadata and the location of its content.

    Hardlinked names share one inode. ``source`` is the number of the file
    that contains the data (given to ``RootFS.apply_layer``), ``offset`` the
    position of the data in it, and ``sparse`` the segments of a sparse
    member, if any.
    """

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "gname",
        "kind",
        "linkname",
        "mode",
        "mtime",
        "mtime_text",
        "offset",
        "size",
        "source",
        "sparse",
        "uid",
        "uname",
        "xattrs",
    )

    def __init__(self, kind: int, entry: TarEntry | None, source: int) -> None:
        self.kind = kind
        self.source = source
        self.sparse: list[tuple[int, int, int]] | None = None
        if entry is None:  # an implied parent directory
            self.mode = 0o755
            self.uid = self.gid = 0
            self.uname = self.gname = b""
            self.mtime = 0
            self.mtime_text: bytes | None = None
            self.size = self.offset = 0
            self.linkname = b""
            self.devmajor = self.devminor = 0
            self.xattrs: dict[bytes, bytes] | None = None
            return
        self.set_metadata(entry)
        self.linkname = entry.linkname if kind == SYM else b""
        self.devmajor = entry.devmajor
        self.devminor = entry.devminor
        self.xattrs = dict(entry.xattrs) if entry.xattrs else None
        if kind == REG:
            self.offset = entry.offset
            if entry.sparse is not None:
                self.sparse = entry.sparse
                self.size = entry.real_size
            else:
                self.size = entry.size
        else:
            self.offset = self.size = 0

    def set_metadata(self, entry: TarEntry) -> None:
        """Take mode, owner and mtime from ``entry``."""
        self.mode = entry.mode
        self.uid = entry.uid
        self.gid = entry.gid
        # Owner names repeat across thousands of entries; share one object.
        self.uname = _OWNER_NAMES.setdefault(entry.uname, entry.uname)
        self.gname = _OWNER_NAMES.setdefault(entry.gname, entry.gname)
        self.mtime = entry.mtime
        self.mtime_text = entry.mtime_text

    def merge_xattrs(self, xattrs: dict[bytes, bytes] | None) -> None:
        """Add or overwrite extended attributes, keeping the others."""
        if xattrs:
            if self.xattrs is None:
                self.xattrs = {}
            self.xattrs.update(xattrs)


class Node:
    """One name in the tree. ``layer`` is the last layer that wrote it."""

    __slots__ = ("children", "inode", "layer", "name", "parent")

    def __init__(
        self, name: bytes, parent: Node | None, inode: Inode, layer: int
    ) -> None:
        self.name = name
        self.parent = parent
        self.inode = inode
        self.layer = layer
        self.children: dict[bytes, Node] | None = {} if inode.kind == DIR else None

    def path(self) -> bytes:
        """Return the path from the root, without a leading slash."""
        parts = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))


def clean_name(name: bytes, label: str) -> tuple[bytes, ...]:
    """Split a tar name into clean components; () is the root.

    Raises:
        UnsafePathError: the name climbs out of the root with ``..``.
    """
    if b"\0" in name:
        # Only a PAX record can carry a NUL; no file system accepts one.
        raise InvalidInputError(f"{label}: tar name {name!r} contains a NUL byte")
    if not name.startswith((b"/", b".")) and b"/." not in name and b"//" not in name:
        # Already clean, as almost every name in real layers is.
        return tuple(name.rstrip(b"/").split(b"/"))
    # Clean first, as Docker does: in an absolute name ".." stops at "/", so
    # "/../etc/x" is "etc/x", while a relative "../etc/x" leaves the root.
    cleaned = posixpath.normpath(name).lstrip(b"/") or b"."
    if cleaned == b"..":
        raise UnsafePathError(f"{label}: tar name {name!r} leaves the root")
    if cleaned.startswith(b"../"):
        raise UnsafePathError(f"{label}: tar name {name!r} leaves the root")
    if cleaned == b".":
        return ()
    return tuple(cleaned.split(b"/"))


class RootFS:
    """The root filesystem tree that layers are applied to, base layer first.

    Each regular file's ``Inode.source`` is the number its layer was applied
    with, so the caller maps it back to the file that contains the data.
    """

    def __init__(self) -> None:
        self.root = Node(b"", None, Inode(DIR, None, -1), -1)
        self.skipped_whiteout_dirs = 0
        # Directories reached from the root through plain directories, by
        # path. Adding nodes leaves every entry valid, and any removal clears it.
        self._dirs: dict[tuple[bytes, ...], Node] = {}

    # -- applying one layer -------------------------------------------------

    def apply_layer(
        self, entries: Iterable[TarEntry], layer: int, source: int, label: str
    ) -> None:
        """Apply the entries of one layer, in tar order.

        ``layer`` counts from 0 at the base; ``source`` is stored in the inodes
        of regular files so that their data can be found later.
        """
        for entry in entries:
            self._apply_entry(entry, layer, source, label)

    def _apply_entry(
        self,
        entry: TarEntry,
        layer: int,
        source: int,
        label: str,
    ) -> None:
        parts = clean_name(entry.name, label)
        if not parts:
            return  # the root itself: layers cannot change its attributes
        base = parts[-1]
        if WHITEOUT_PREFIX not in entry.name:
            self._apply_member(entry, parts, layer, source, label)
            return
        if any(part.startswith(WHITEOUT_PREFIX) for part in parts[:-1]):
            # Docker would create a directory named ".wh.X" here as an implied
            # parent. NOTE: pulldocker drops the entry instead, so that no
            # whiteout name ever reaches the output; the image-spec forbids
            # such names as files.
            self.skipped_whiteout_dirs += 1
            logger.warning("%s: skipping %r below a whiteout name", label, entry.name)
            return

        if base == OPAQUE_MARKER:
            self._apply_opaque(parts[:-1], layer, label, entry.name)
            return
        if base.startswith(WHITEOUT_PREFIX):
            self._apply_whiteout(parts, layer, label, entry.name)
            return
        self._apply_member(entry, parts, layer, source, label)

    def _apply_member(
        self,
        entry: TarEntry,
        parts: tuple[bytes, ...],
        layer: int,
        source: int,
        label: str,
    ) -> None:
        """Create or replace the file, directory or link that ``entry`` names."""
        base = parts[-1]
        parent = self._resolve_dir(parts[:-1], layer, label, entry.name)
        assert parent.children is not None
        existing = parent.children.get(base)
        kind = self._kind_of(entry, label)
        if kind == DIR and existing is not None and existing.inode.kind == DIR:
            existing.inode.set_metadata(entry)
            existing.inode.merge_xattrs(entry.xattrs)
            existing.layer = layer
            return
        if existing is not None:
            del parent.children[base]
            existing.parent = None
            self._dirs.clear()

        if entry.type == HARDLINK:
            inode = self._hardlink_target(entry, label)
            # The link's header applies to the shared file, as Docker's
            # chmod/lchown/chtimes on the new name do (not for symlinks).
            if inode.kind != SYM:
                inode.set_metadata(entry)
            else:
                inode.uid, inode.gid = entry.uid, entry.gid
            inode.merge_xattrs(entry.xattrs)
        else:
            inode = Inode(kind, entry, source)
        parent.children[base] = Node(base, parent, inode, layer)

    @staticmethod
    def _kind_of(entry: TarEntry, label: str) -> int:
        if entry.type in REGULAR_TYPES or entry.type == HARDLINK:
            return REG
        kind = _KIND_OF_TYPE.get(entry.type)
        if kind is None:
            raise InvalidInputError(
                f"{label}: member {entry.name!r} has unsupported type {entry.type!r}"
            )
        return kind

    def _apply_whiteout(
        self, parts: tuple[bytes, ...], layer: int, label: str, name: bytes
    ) -> None:
        """Remove what ``D/.wh.NAME`` names, as Docker's RemoveAll would."""
        base = parts[-1]
        if base.startswith(AUFS_META_PREFIX):
            return  # AUFS bookkeeping such as .wh..wh.plnk; not a file
        target = base[len(WHITEOUT_PREFIX) :]
        if not target or target in (b".", b".."):
            raise InvalidInputError(
                f"{label}: invalid whiteout {name!r}: it names no file"
            )
        parent = self._walk(
            self.root, parts[:-1], label, name, create_layer=layer, dangling=False
        )
        if parent is None:
            return  # behind a dangling symlink: nothing exists to remove
        assert parent.children is not None
        victim = parent.children.get(target)
        if victim is None:
            return
        if victim.layer == layer:
            # Written by this same layer: only what lower layers left goes.
            if victim.children is not None:
                self._remove_children(victim, layer)
            return
        if victim.children is not None and self._has_written(victim, layer):
            self._remove_children(victim, layer)
            return
        del parent.children[target]
        victim.parent = None
        self._dirs.clear()

    def _apply_opaque(
        self, dir_parts: tuple[bytes, ...], layer: int, label: str, name: bytes
    ) -> None:
        """Empty a directory of everything this layer has not written yet.

        Docker does this when it reads the marker. Its directory walk does
        not follow a symlink named by the marker's parent, and visits only
        the file when the parent is a file, so both cases change nothing.
        """
        directory = self.root
        if dir_parts:
            parent = self._walk(
                self.root,
                dir_parts[:-1],
                label,
                name,
                create_layer=layer,
                dangling=False,
            )
            if parent is None:
                return
            assert parent.children is not None
            node = parent.children.get(dir_parts[-1])
            if node is None:
                implied = Node(dir_parts[-1], parent, Inode(DIR, None, -1), layer)
                parent.children[dir_parts[-1]] = implied
                return
            if node.children is None:
                return
            directory = node
        self._remove_children(directory, layer)

    def _remove_children(self, directory: Node, layer: int) -> None:
        """Remove every descendant of ``directory`` not written by ``layer``."""
        assert directory.children is not None
        for name, child in list(directory.children.items()):
            if child.layer == layer:
                if child.children is not None:
                    self._remove_children(child, layer)
                continue
            if child.children is not None and self._has_written(child, layer):
                self._remove_children(child, layer)
                continue
            del directory.children[name]
            child.parent = None
            self._dirs.clear()

    def _has_written(self, node: Node, layer: int) -> bool:
        if node.layer == layer:
            return True
        if node.children is None:
            return False
        return any(self._has_written(child, layer) for child in node.children.values())

    # -- path resolution ----------------------------------------------------

    def _resolve_dir(
        self, parts: tuple[bytes, ...], layer: int, label: str, name: bytes
    ) -> Node:
        """Walk ``parts`` from the root, following symlinks, creating missing dirs."""
        node = self._dirs.get(parts)
        if node is not None:
            return node
        node = self.root
        for depth, part in enumerate(parts):
            assert node.children is not None
            child = node.children.get(part)
            if child is None or child.children is None:
                # A missing directory or a symlink: take the general walk.
                rest = parts[depth:]
                return self._resolve_dir_slowly(node, rest, layer, label, name)
            node = child
        self._dirs[parts] = node
        return node

    def _resolve_dir_slowly(
        self, node: Node, parts: tuple[bytes, ...], layer: int, label: str, name: bytes
    ) -> Node:
        found = self._walk(node, parts, label, name, create_layer=layer)
        assert found is not None
        return found

    def _walk(
        self,
        node: Node,
        parts: tuple[bytes, ...],
        label: str,
        name: bytes,
        *,
        create_layer: int | None,
        dangling: bool = True,
    ) -> Node | None:
        """Follow ``parts`` from ``node`` to a directory, resolving symlinks.

        A missing directory is created for ``create_layer``, or ends the walk
        with None when it is None. With ``dangling`` False, a directory that
        is missing from a symlink's target also ends the walk with None, so
        nothing is created behind a dangling symlink. A non-directory on the
        way raises InvalidInputError, as do more than 40 symlinks.
        """
        pending = list(reversed(parts))
        hops = 0
        from_link = 0  # how many pending parts came from symlink targets
        while pending:
            part = pending.pop()
            in_link = from_link > 0
            if in_link:
                from_link -= 1
            if part in (b"", b"."):
                continue
            if part == b"..":
                node = node.parent or self.root
                continue
            assert node.children is not None
            child = node.children.get(part)
            if child is None:
                if create_layer is None or (in_link and not dangling):
                    return None
                child = Node(part, node, Inode(DIR, None, -1), create_layer)
                node.children[part] = child
                node = child
                continue
            kind = child.inode.kind
            if kind == DIR:
                node = child
            elif kind == SYM:
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise InvalidInputError(
                        f"{label}: too many levels of symbolic links under {name!r}"
                    )
                target = child.inode.linkname
                if target.startswith(b"/"):
                    node = self.root
                target_parts = target.split(b"/")
                pending.extend(reversed(target_parts))
                from_link += len(target_parts)
            elif create_layer is None:
                return None
            else:
                raise InvalidInputError(
                    f"{label}: cannot create {name!r}: {child.path()!r} "
                    "is not a directory"
                )
        return node

    def _lookup(self, parts: tuple[bytes, ...], label: str, name: bytes) -> Node | None:
        """Find a node without following a symlink in the final component."""
        if not parts:
            return self.root
        parent = self._walk(self.root, parts[:-1], label, name, create_layer=None)
        if parent is None or parent.children is None:
            return None
        return parent.children.get(parts[-1])

    def _hardlink_target(self, entry: TarEntry, label: str) -> Inode:
        try:
            parts = clean_name(entry.linkname, label)
        except UnsafePathError:
            raise UnsafePathError(
                f"{label}: hardlink {entry.name!r} points to {entry.linkname!r}, "
                "outside the root"
            ) from None
        target = self._lookup(parts, label, entry.name) if parts else None
        if target is None:
            raise InvalidInputError(
                f"{label}: hardlink {entry.name!r} points to {entry.linkname!r}, "
                "which does not exist"
            )
        if target.inode.kind == DIR:
            raise InvalidInputError(
                f"{label}: hardlink {entry.name!r} points to directory "
                f"{entry.linkname!r}"
            )
        return target.inode
