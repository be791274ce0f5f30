"""Compare flattened trees with umoci's unpack on small random images.

Each image has 2 to 5 layers of up to 25 entries. Names come from a tiny
alphabet, so paths collide often. The entries are files, directories,
symlinks (relative, absolute, dangling), hardlinks to earlier names,
whiteouts of existing and missing names, opaque markers, type changes,
writes through symlinked parents, mode changes and duplicates.
``python -m pulldocker`` converts the image, and ``umoci unpack --rootless``
unpacks it after ``skopeo copy``. The trees must match in paths, types,
modes, sizes, content, symlink targets, hardlink groups and file mtimes.
Owners and directory mtimes are not compared. When one side rejects an
image, the other must reject it too.

The generator keeps clear of inputs where pulldocker's documented policies
differ from Docker on purpose. It writes no ``..`` names and no bare
``.wh.``. Each layer starts with its opaque markers, shallowest first, then
its whiteouts, then the other entries, so no marker follows an entry of its
own layer: Docker applies such a marker to that entry, while pulldocker
keeps the entry. It writes no devices either, because umoci's rootless
unpack turns them into empty files.

NOTE: the generator still avoids some shapes pinned at the end of this
file: opaque markers in files, whiteouts through dangling symlinks, and
whiteouts or nested opaque markers whose parent is gone, where umoci 0.4.7
differs from Docker.

CI runs a fixed set of seeds. A longer run draws more::

    PULLDOCKER_DIFF_EXAMPLES=2000 python -m pytest tests/test_differential.py

``PULLDOCKER_DIFF_SEED=N`` starts at seed N, so that several processes can
share a long run.
"""

from __future__ import annotations

import os
import posixpath
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from harness import (
    describe_failure,
    missing_tools,
    run_pulldocker,
    tree_diff,
    umoci_rootfs,
)
from layerbuild import (
    MTIME,
    Case,
    Entry,
    Image,
    docker_archive,
    expect,
    failure_text,
    flatten,
    layer,
    read_tree,
)
from treelist import format_lines, list_dir, list_tar

LONG_RUN = os.environ.get("PULLDOCKER_DIFF_EXAMPLES")
EXAMPLES = int(LONG_RUN) if LONG_RUN else 40
FIRST_SEED = int(os.environ.get("PULLDOCKER_DIFF_SEED", "0"))

needs_umoci = pytest.mark.skipif(
    bool(missing_tools("skopeo", "umoci")), reason="skopeo or umoci is missing"
)

ALPHABET = ("a", "b", "c")
MAX_DEPTH = 3
MAX_ENTRIES = 25
FILE_MODES = (0o644, 0o600, 0o755, 0o640, 0o444, 0o700)
DIR_MODES = (0o755, 0o700, 0o750, 0o775, 0o711)
CONTENTS = (b"", b"1", b"22", b"333", b"4444")
MTIMES = (MTIME, MTIME + 60, MTIME + 3600)
OPAQUE = ".wh..wh..opq"


# -- generating images --------------------------------------------------------


class Model:
    """A picture of the tree, used only to pick names that exist.

    It follows symlinks in parents as the unpackers do, but it ignores
    hardlink sharing and some corner cases. A wrong guess only makes an odd
    image, which is still compared.
    """

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.metadata: dict[str, tuple[int | None, float]] = {}

    def paths(self, *kinds: str) -> list[str]:
        return sorted(p for p, k in self.kinds.items() if not kinds or k in kinds)

    def resolve(self, path: str) -> str | None:
        """Follow every symlink in ``path``, or return None at a loop or a file."""
        current: list[str] = []
        pending = list(reversed(path.split("/")))
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                del current[-1:]
                continue
            candidate = "/".join([*current, part])
            kind = self.kinds.get(candidate)
            if kind == "l":
                hops += 1
                if hops > 40:
                    return None
                target = self.links[candidate]
                if target.startswith("/"):
                    current = []
                pending.extend(reversed(target.split("/")))
                continue
            if kind == "f" and pending:
                return None
            current.append(part)
        return "/".join(current)

    def makes_loop(self, name: str, target: str) -> bool:
        """Tell whether a symlink ``name -> target`` would close a loop."""
        where = self.where(name)
        if where is None:
            return False
        saved = self.kinds.get(where), self.links.get(where)
        self.kinds[where], self.links[where] = "l", target
        loop = self.resolve(where) is None
        if saved[0] is None:
            del self.kinds[where], self.links[where]
        else:
            self.kinds[where] = saved[0]
            if saved[1] is None:
                del self.links[where]
            else:
                self.links[where] = saved[1]
        return loop

    def where(self, name: str) -> str | None:
        """Return the path that an entry named ``name`` writes, if any."""
        parent, base = posixpath.split(name)
        resolved = self.resolve(parent)
        return None if resolved is None else posixpath.join(resolved, base)

    def directories(self) -> list[str]:
        """List the names that lead to a directory or to no file yet."""
        found = [""]
        for path, kind in self.kinds.items():
            resolved = self.resolve(path) if kind in ("d", "l") else None
            if resolved is not None and self.kinds.get(resolved, "d") == "d":
                found.append(path)
        return sorted(found)

    def remove(self, path: str, *, opaque: bool = False) -> None:
        prefix = path + "/" if path else ""
        for name in list(self.kinds):
            if name.startswith(prefix) or (name == path and not opaque):
                del self.kinds[name]
                self.links.pop(name, None)

    def apply(self, entry: Entry) -> None:
        name = self.where(str(entry.name).rstrip("/"))
        if name is None:
            return  # the image is invalid from here on
        parent, base = posixpath.split(name)
        if base == OPAQUE:
            self.remove(parent, opaque=True)
            return
        if base.startswith(".wh."):
            self.remove(posixpath.join(parent, base[4:]))
            return
        self._add_parents(parent)
        kind = {"dir": "d", "symlink": "l", "hardlink": "f"}.get(entry.kind, "f")
        if self.kinds.get(name) == "d" and kind == "d":
            return
        self.remove(name)
        self.kinds[name] = kind
        if kind == "l":
            self.links[name] = str(entry.link)
        if kind == "f":
            self.metadata[name] = (entry.mode, entry.mtime)

    def _add_parents(self, parent: str) -> None:
        parts = parent.split("/") if parent else []
        for depth in range(1, len(parts) + 1):
            self.kinds.setdefault("/".join(parts[:depth]), "d")


def new_path(rng: random.Random, model: Model) -> str:
    """Pick a new name in a known directory or below a symlink to one."""
    directories = model.directories()
    symlinks = [p for p in directories if model.kinds.get(p) == "l"]
    if symlinks and rng.random() < 0.25:
        return rng.choice(symlinks) + "/" + rng.choice(ALPHABET)
    shallow = [p for p in directories if p.count("/") + 1 < MAX_DEPTH]
    return posixpath.join(rng.choice(shallow), rng.choice(ALPHABET))


def some_path(rng: random.Random, model: Model, *kinds: str) -> str:
    """Pick a known path of one of ``kinds`` most of the time."""
    known = model.paths(*kinds)
    if known and rng.random() < 0.75:
        return rng.choice(known)
    return new_path(rng, model)


def symlink_target(rng: random.Random, model: Model, name: str) -> str:
    known = model.paths()
    roll = rng.random()
    if roll < 0.4 and known:
        start = posixpath.dirname(name) or "."
        return posixpath.relpath(rng.choice(known), start)
    if roll < 0.75 and known:
        return "/" + rng.choice(known)
    if roll < 0.9:
        return rng.choice(("x", "/x/y", "a/x", "/c/x"))
    return rng.choice((".", "/", "..", "../.."))


def file_entry(rng: random.Random, name: str) -> Entry:
    data = rng.choice(CONTENTS) + name.encode()
    mode = rng.choice(FILE_MODES)
    return Entry(name, data=data, mode=mode, mtime=rng.choice(MTIMES))


def random_entry(rng: random.Random, model: Model, written: list[Entry]) -> Entry:
    """Draw one entry that is not a whiteout."""
    operation = rng.choices(
        ("file", "dir", "symlink", "hardlink", "retype", "mode", "duplicate"),
        weights=(6, 4, 3, 2, 3, 2, 1),
    )[0]
    earlier = [e for e in written if not posixpath.basename(e.name).startswith(".wh.")]
    if operation == "duplicate" and earlier:
        entry = rng.choice(earlier)
        if model.where(str(entry.name).rstrip("/")) is not None:
            if entry.kind == "hardlink" and str(entry.link) in model.metadata:
                # A repeated hardlink header carries its file's current mode
                # and mtime, because a later entry may have changed them.
                mode, mtime = model.metadata[str(entry.link)]
                return replace(entry, mode=mode, mtime=mtime)
            return replace(entry)
    if operation == "retype":
        name = some_path(rng, model)
        operation = rng.choice(("file", "dir", "symlink"))
    elif operation == "mode":
        name = some_path(rng, model, "f", "d")
        operation = "dir" if model.kinds.get(name) == "d" else "file"
    else:
        name = new_path(rng, model) if rng.random() < 0.6 else some_path(rng, model)
    if operation == "dir":
        mode = rng.choice(DIR_MODES)
        return Entry(name + "/", "dir", mode=mode)
    if operation == "symlink":
        target = symlink_target(rng, model, name)
        if model.makes_loop(name, target):
            target = "/nowhere"
        return Entry(name, "symlink", link=target, mtime=rng.choice(MTIMES))
    if operation == "hardlink":
        replaced = model.where(name)
        files = [
            p
            for p in model.paths("f")
            if replaced is None or (p != replaced and not p.startswith(replaced + "/"))
        ]
        if files:
            # The header repeats the file's mode and mtime. Docker applies
            # them to the shared file but umoci ignores them, and
            # test_hardlink_header_mtime_applies pins that difference.
            target = rng.choice(files)
            mode, mtime = model.metadata[target]
            return Entry(name, "hardlink", link=target, mode=mode, mtime=mtime)
    return file_entry(rng, name)


def random_whiteouts(rng: random.Random, model: Model) -> list[Entry]:
    """Draw opaque markers, shallowest first, then whiteouts in path order.

    Markers name existing directories, sometimes through a symlink to the
    directory (whiteouts only). Whiteouts name existing paths or missing
    names in existing directories.
    """
    opaque = set()
    for _ in range(rng.choice((0, 0, 0, 1, 2))):
        directories = model.paths("d")
        if directories:
            opaque.add(rng.choice(directories))
        elif rng.random() < 0.2:
            opaque.add("")
    # A marker below another marker of the same layer names a directory the
    # outer marker has just removed, so Docker creates it again, which umoci
    # does not (test_whiteout_creates_missing_parent).
    opaque = {
        d
        for d in opaque
        if not any(o != d and (o == "" or d.startswith(o + "/")) for o in opaque)
    }
    entries = [
        Entry(posixpath.join(d, OPAQUE))
        for d in sorted(opaque, key=lambda d: (d.count("/"), d))
    ]
    victims = set()
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        known = model.paths()
        if known and rng.random() < 0.75:
            victims.add(rng.choice(known))
        else:
            parent = rng.choice(["", *model.paths("d")])
            victims.add(posixpath.join(parent, rng.choice(ALPHABET)))
    removed = victims | {d for d in opaque if d}
    for victim in sorted(victims):
        # A whiteout whose parent is already gone makes Docker create the
        # parent again, which umoci does not (test_whiteout_creates_missing_parent).
        if "" in opaque or any(victim.startswith(d + "/") for d in removed):
            continue
        parent, base = posixpath.split(victim)
        aliases = [
            p
            for p in model.paths("l")
            if parent
            and model.resolve(p) == parent
            and not any(p == d or p.startswith(d + "/") for d in removed)
        ]
        if aliases and rng.random() < 0.5:
            parent = rng.choice(aliases)
        entries.append(Entry(posixpath.join(parent, ".wh." + base)))
    return entries


def random_image(rng: random.Random) -> list[list[Entry]]:
    """Draw 2 to 5 layers of up to 25 entries each."""
    model = Model()
    layers = []
    for number in range(rng.randint(2, 5)):
        entries = random_whiteouts(rng, model) if number else []
        for entry in entries:
            model.apply(entry)
        for _ in range(rng.randint(1, MAX_ENTRIES - len(entries))):
            entry = random_entry(rng, model, entries)
            entries.append(entry)
            model.apply(entry)
        layers.append(entries)
    return layers


# -- comparing ----------------------------------------------------------------


@dataclass
class Outcome:
    """What pulldocker and umoci made of one image."""

    ours: list[str] | None
    theirs: list[str] | None
    our_error: str
    their_error: str

    def describe(self) -> str:
        if self.ours is None or self.theirs is None:
            return f"pulldocker: {self.our_error}\numoci: {self.their_error}"
        return tree_diff(self.ours, self.theirs)


def show_layers(layers: list[list[Entry]]) -> str:
    """Format layers as one line per entry, for failure messages."""
    lines = []
    for number, entries in enumerate(layers):
        lines.append(f"layer {number}:")
        for entry in entries:
            lines.append("  " + show_entry(entry))
    return "\n".join(lines)


def show_entry(entry: Entry) -> str:
    mode = f" {entry.mode:04o}" if entry.mode is not None else ""
    if entry.kind == "symlink":
        return f"{entry.name} -> {entry.link}"
    if entry.kind == "hardlink":
        return f"{entry.name} => {entry.link}{mode} @{int(entry.mtime)}"
    if entry.kind == "dir":
        return f"{entry.name}{mode}"
    return f"{entry.name} {entry.data!r}{mode} @{int(entry.mtime)}"


def compare(layers: list[list[Entry]], work: Path) -> Outcome:
    """Flatten ``layers`` with pulldocker and with umoci; list both trees."""
    work.mkdir(parents=True, exist_ok=True)
    image = Image([layer(*entries) for entries in layers])
    archive = docker_archive(work / "image.tar", image)
    output = work / "rootfs.tar"
    result = run_pulldocker(archive, "-o", output, "-q")
    ours = None
    our_error = ""
    if result.returncode == 0:
        ours = format_lines(list_tar(output), owners=False)
    else:
        our_error = describe_failure(result)
    reference = work / "umoci"
    reference.mkdir()
    theirs = None
    their_error = ""
    try:
        rootfs = umoci_rootfs(f"docker-archive:{archive}", reference)
    except RuntimeError as error:
        their_error = str(error)
    else:
        theirs = format_lines(list_dir(rootfs, rootless=True), owners=False)
    return Outcome(ours, theirs, our_error, their_error)


@pytest.mark.umoci
@needs_umoci
@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + EXAMPLES))
def test_random_image_matches_umoci(seed: int, tmp_path: Path) -> None:
    layers = random_image(random.Random(seed))
    outcome = compare(layers, tmp_path)
    context = f"{show_layers(layers)}\n{outcome.describe()}"
    assert (outcome.ours is None) == (outcome.theirs is None), context
    assert outcome.ours == outcome.theirs, context


# -- disagreements found by the comparison ---------------------------------------
#
# Each case is the smallest image found for one disagreement, and asserts
# the tree that Docker's layer unpacking (moby pkg/archive UnpackLayer)
# builds. Docker reads entries in tar order. It creates a missing parent
# with MkdirAll before it looks at the name, and applies a whiteout with
# os.RemoveAll. It applies an opaque marker when it reads the marker: it
# walks the directory with filepath.Walk and removes every path that the
# layer has not written so far.


def flatten_layers(tmp_path: Path, layers: list[list[str | Entry]]) -> Path:
    archive = docker_archive(tmp_path / "image.tar", Case(layers).image())
    result, output = flatten(archive, tmp_path / "out")
    assert result.returncode == 0, failure_text(result)
    return output


def test_opaque_then_write_through_lower_symlink(tmp_path: Path) -> None:
    # The marker removes the lower symlink x/s, so x/s/f makes a new x/s
    # directory instead of writing through the symlink into e. umoci agrees.
    output = flatten_layers(
        tmp_path, [["x/", "x/s -> /e", "e/"], ["x/.wh..wh..opq", 'x/s/f "1"']]
    )
    tree = read_tree(output)
    assert tree.entries == expect("e/", "x/", "x/s/", 'x/s/f "1"').entries


def test_opaque_then_implied_parent(tmp_path: Path) -> None:
    # The marker removes the lower x/d (mode 0700), so x/d/new makes a new
    # implied x/d with mode 0755. umoci agrees.
    lower = ["x/", Entry("x/d/", "dir", mode=0o700), 'x/d/old "o"']
    output = flatten_layers(tmp_path, [lower, ["x/.wh..wh..opq", 'x/d/new "n"']])
    tree = read_tree(output)
    assert tree.entries == expect("x/", "x/d/", 'x/d/new "n"').entries


def test_opaque_then_file_parent(tmp_path: Path) -> None:
    # The marker removes the lower file x/d before x/d/new needs a parent
    # there, so the image is valid. umoci agrees.
    output = flatten_layers(
        tmp_path, [["x/", 'x/d "f"'], ["x/.wh..wh..opq", 'x/d/new "n"']]
    )
    tree = read_tree(output)
    assert tree.entries == expect("x/", "x/d/", 'x/d/new "n"').entries


def test_opaque_then_hardlink_to_hidden_file(tmp_path: Path) -> None:
    # The marker has already removed a/f when the link is read, so the link
    # has no target, and Docker fails the layer as pulldocker does.
    layers = [["a/", 'a/f "1"'], ["a/.wh..wh..opq", "b => a/f"]]
    archive = docker_archive(tmp_path / "image.tar", Case(layers).image())
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 3, failure_text(result)
    assert b"does not exist" in result.stderr


def test_opaque_marker_in_file_ignored(tmp_path: Path) -> None:
    # filepath.Walk on a file visits only the file itself, so Docker removes
    # nothing and keeps going. umoci agrees.
    output = flatten_layers(tmp_path, [['a "1"'], ["a/.wh..wh..opq"]])
    assert read_tree(output).entries == expect('a "1"').entries


def test_whiteout_through_dangling_symlink(tmp_path: Path) -> None:
    # Docker's os.Lstat of the parent s finds the symlink, so it creates
    # nothing, and os.RemoveAll of s/a finds no file. umoci agrees.
    output = flatten_layers(tmp_path, [["s -> /x/y", 'f "1"'], ["s/.wh.a"]])
    assert read_tree(output).entries == expect('f "1"', "s -> /x/y").entries


def test_opaque_through_dangling_symlink(tmp_path: Path) -> None:
    # As above, and filepath.Walk does not follow the symlink. umoci agrees.
    output = flatten_layers(tmp_path, [["s -> x", 'f "1"'], ["s/.wh..wh..opq"]])
    assert read_tree(output).entries == expect('f "1"', "s -> x").entries


@pytest.mark.parametrize("name", ["a/.wh.c", "a/a/.wh.c"])
def test_whiteout_below_file_rejected(tmp_path: Path, name: str) -> None:
    # umoci 0.4.7 skips this whiteout, but Docker fails: os.RemoveAll of
    # a/c (or a/a/c) fails with ENOTDIR because the file a is in the way.
    archive = docker_archive(tmp_path / "image.tar", Case([['a "1"'], [name]]).image())
    result, _ = flatten(archive, tmp_path / "out")
    assert result.returncode == 3, failure_text(result)
    assert b"not a directory" in result.stderr


@pytest.mark.parametrize("name", ["a/.wh.b", "a/.wh..wh..opq"])
def test_whiteout_creates_missing_parent(tmp_path: Path, name: str) -> None:
    # umoci 0.4.7 creates no parent for a whiteout or an opaque marker, but
    # Docker runs MkdirAll on the parent of every entry before it looks at
    # the name, so the directory a exists afterwards.
    output = flatten_layers(tmp_path, [['f "1"'], [name]])
    assert read_tree(output).entries == expect("a/", 'f "1"').entries


def test_hardlink_header_mtime_applies(tmp_path: Path) -> None:
    # umoci 0.4.7 keeps the file's own mtime, but Docker calls Chtimes on
    # the new name with the link header's mtime, which changes the shared
    # file (as chmod does for the header's mode).
    link = Entry("b", "hardlink", link="c", mtime=MTIME + 60)
    tree = read_tree(flatten_layers(tmp_path, [['c "x"', link]]))
    assert tree.links == {frozenset({"b", "c"})}
    assert tree.members["b"].mtime == MTIME + 60
    assert tree.members["c"].mtime == MTIME + 60
