from .tarscan import TarEntry

MORE: int
DONE: int
PYTHON: int

def scan(
    fd: int, pos: int, end: int, limit: int, entry_type: type[TarEntry], /
) -> tuple[list[TarEntry], int, int]: ...
def ustar_header(
    name: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    typeflag: bytes,
    linkname: bytes,
    uname: bytes,
    gname: bytes,
    /,
) -> bytes: ...
