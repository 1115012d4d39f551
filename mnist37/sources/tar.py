"""The ustar tar format, read and written: the one home of its headers.

Reading: `members(f, source)` gives every regular file of a tar stream, in order, fast enough
for archives of small images (bulk header parsing with NumPy). Writing: `write_member` and
`END` produce plain ustar members (mode 0444, mtime 0: the same input gives the same bytes),
as the converter's WebDataset shards need.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from mnist37.sources.base import FormatError, text

BLOCK = 512  # bytes per tar block: headers, and member contents padded to whole blocks
END = bytes(2 * BLOCK)  # the end-of-archive marker: two zero blocks

def _octal(field: bytes) -> int:
    if field and field[0] & 0x80:  # base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


class TarCutShort(FormatError):
    """A tar stream that ends inside a member (`member` is its name) or inside a header (None)."""

    def __init__(self, source: str, reason: str, member: bytes | None):
        super().__init__(f"{source}: {reason}")
        self.reason, self.member = reason, member


# Reads of 1 MiB: the headers are scanned and the members sliced while the read is in the
# core's L2 cache (larger reads measured slower a record: docs/figures.md).
_READ_BLOCK = 1 << 20


_WINDOW = _READ_BLOCK // BLOCK  # blocks a run is looked for in at most


_ZERO_BLOCK = bytes(BLOCK)


_USTAR = np.frombuffer(b"ustar", dtype=np.uint8)


_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)  # weights of a size field's 11 octal digits


_REGULAR = (48, 0, 55)  # typeflags "0", NUL, "7": regular files


@dataclass
class TarMembers:
    """The regular files of a tar stream, in order, and what ended it early (if anything)."""

    names: np.ndarray  # bytes 'S' [M]: member names
    data: list[bytes]  # [M]: member contents
    error: FormatError | None  # TarCutShort when the stream ends inside a member or header; a damaged header


def _plain_members(buf: bytes, pos: int, window: int) -> tuple[int, np.ndarray, list[bytes]]:
    """The run of plain members at `pos` of `buf` (within `window` blocks), parsed with numpy
    rather than one at a time: (position after the last one taken, the names 'S' [K] and
    contents of its regular files). Plain: a ustar header whose name fits the name field (no
    prefix, no GNU long name, no pax path record), size as 11 octal digits, contents wholly
    inside `buf`. Pax headers without a path (webdataset's writer puts one before every
    member, for its mtime) and other kinds of member are passed over, as `members` does.
    The run stops before the first member that is not plain, which is then read on its own."""
    count = min((len(buf) - pos) // BLOCK, window)
    blocks = np.frombuffer(buf, dtype=np.uint8, count=count * BLOCK, offset=pos).reshape(count, BLOCK)
    headers = np.flatnonzero(blocks[:, 257] == 117)  # "u" of "ustar": the rest is checked on these alone
    head = blocks[headers, :157]  # name, mode, ids, size, mtime, checksum, typeflag
    digits = head[:, 124:135]
    plain = ((blocks[headers, 258:262] == _USTAR[1:]).all(axis=1) & (blocks[headers, 345] == 0)
             & (head[:, 156] != 76) & ((digits >= 48) & (digits <= 55)).all(axis=1)
             & ((head[:, 135] == 0) | (head[:, 135] == 32)))
    headers, head, digits = headers[plain], head[plain], digits[plain]
    if not len(headers) or headers[0] != 0:
        return pos, np.empty(0, dtype="S1"), []
    sizes = (digits.astype(np.int64) - 48) @ _OCTAL
    after = headers + 1 + (sizes + BLOCK - 1) // BLOCK  # block after each member
    # Follow the chain of headers from the first: a header that is not plain, or a block
    # inside a member's contents that looks like one, ends the run there.
    breaks = np.flatnonzero(after[:-1] != headers[1:])
    taken = int(breaks[0]) + 1 if len(breaks) else len(headers)
    taken = int(np.searchsorted(after[:taken], count, side="right"))  # whole within buf
    kinds = head[:taken, 156]
    starts = pos + (headers[:taken] + 1) * BLOCK
    for i in np.flatnonzero(kinds == 120).tolist():  # "x": a pax header that names the next member ends the run
        if b" path=" in buf[starts[i]:starts[i] + sizes[i]]:
            taken = i
            break
    regular = np.flatnonzero(np.isin(kinds[:taken], _REGULAR))
    fields = head[regular, :100]
    names = np.ascontiguousarray(fields).view("S100").ravel()
    lengths = np.char.str_len(names)
    # A name with bytes after its first NUL is not plain (tar stops at the NUL; 'S' only strips trailing NULs).
    odd = np.flatnonzero(np.count_nonzero(fields, axis=1) != lengths)
    if len(odd):
        taken = int(regular[odd[0]])
        regular = regular[:odd[0]]
    names = names[:len(regular)].astype(f"S{max(int(lengths[:len(regular)].max(initial=1)), 1)}")
    data = [buf[s:s + n] for s, n in zip(starts[regular].tolist(), sizes[regular].tolist())]
    end = pos + int(after[taken - 1]) * BLOCK if taken else pos
    return end, names, data


def _one_member(f, source: str, buf: bytes, pos: int, long_name: bytes | None) -> tuple[bytes, int, bytes, int, bytes]:
    """The member whose header is at `pos` of `buf`, read on its own (what `_plain_members`
    leaves): (the buffer, refilled from `f` when the member reaches past it; the position after
    the member; its name, `long_name` when an earlier header gave it; its typeflag; its
    contents). TarCutShort when the stream ends inside it, FormatError for a size that does not
    parse."""
    name = long_name
    if name is None:
        end = buf.find(b"\0", pos, pos + 100)
        name = buf[pos:end if end >= 0 else pos + 100]
        if buf[pos + 345] != 0 and buf[pos + 257:pos + 262] == b"ustar":
            name = buf[pos + 345:pos + 500].split(b"\0", 1)[0] + b"/" + name
    try:
        size = int(buf[pos + 124:pos + 135], 8) if buf[pos + 135] == 0 else _octal(buf[pos + 124:pos + 136])
    except ValueError:
        raise FormatError(f"{source}: corrupt tar header (member {text(name)!r}: size "
                          f"{buf[pos + 124:pos + 136]!r} is not a number)") from None
    kind = buf[pos + 156]
    start = pos + BLOCK
    end = start + (size + BLOCK - 1) // BLOCK * BLOCK
    if end > len(buf):
        buf = buf[pos:] + f.read(max(_READ_BLOCK, end - len(buf)))
        start, end = start - pos, end - pos
        if start + size > len(buf):
            raise TarCutShort(source, f"truncated tar ({text(name)} cut short: {max(len(buf) - start, 0)} of "
                                      f"{size} bytes)", name)
    return buf, end, name, kind, buf[start:start + size]


def members(f, source: str, limit: int | None = None) -> TarMembers:
    """Every regular file of a tar stream, in order; a stream that ends inside a member or a
    header (TarCutShort) or a header that does not parse (FormatError) ends the members there
    and is returned with those before it. With `limit`, reading stops once that many are found.

    A reader of its own rather than tarfile: tarfile's per-member work is several times a
    small PNG's decode (docs/figures.md). This one reads 1 MiB at a time and parses runs of
    plain ustar headers with numpy (`_plain_members`), every other header one at a time. It follows
    ustar, GNU long names and pax path records, and skips everything that is not a regular
    file. Header checksums are not verified: a damaged header shows up as a size that does not
    parse or a stream cut short."""
    names, data = [], []
    buf, pos, long_name, window, wait = b"", 0, None, _WINDOW, 0
    try:
        while True:
            if long_name is None and not wait and len(buf) - pos >= 2 * BLOCK:
                start = pos
                pos, run_names, run_data = _plain_members(buf, pos, window)
                names.append(run_names)
                data += run_data
                # Scan about as far as runs reach, and after a member that is not plain read
                # the next few one at a time: a tar of such members (long names) costs each a
                # few blocks' scan, not the whole buffer's.
                window = min(max(64, 4 * (pos - start) // BLOCK), _WINDOW)
                wait = 16 if pos == start else 0
            if limit is not None and len(data) >= limit:
                break
            if len(buf) - pos < BLOCK:
                buf, pos = buf[pos:] + f.read(_READ_BLOCK), 0
                if len(buf) < BLOCK:
                    if buf.strip(b"\0"):
                        raise TarCutShort(source, "truncated tar (header cut short)", None)
                    break  # end of the stream (with or without the end-of-archive blocks)
                continue
            if buf[pos] == 0 and buf[pos:pos + BLOCK] == _ZERO_BLOCK:
                break  # end-of-archive marker
            buf, pos, name, kind, member = _one_member(f, source, buf, pos, long_name)
            long_name, wait = None, max(wait - 1, 0)
            if kind in _REGULAR:
                names.append(np.array([name], dtype="S"))
                data.append(member)
            elif kind == 76:  # "L": GNU long name of the next member
                long_name = member.split(b"\0", 1)[0]
            elif kind == 120:  # "x": pax extended header
                for match in re.finditer(rb"\d+ path=([^\n]*)\n", member):
                    long_name = match[1]
        error = None
    except FormatError as e:
        error = e
    return TarMembers(np.concatenate(names) if names else np.empty(0, dtype="S1"), data, error)


def header(name: str, size: int) -> bytes:
    """A ustar header for a regular file (mode 0444, mtime 0: the same input gives the same bytes)."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise FormatError(f"{name}: member name over 100 bytes")
    header = bytearray(512)
    header[0:len(encoded)] = encoded
    header[100:108] = b"0000444\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def write_member(f, name: str, payload: bytes) -> None:
    """One regular file, its header and its contents padded to whole blocks, onto `f`."""
    f.write(header(name, len(payload)))
    f.write(payload)
    f.write(bytes(-len(payload) % BLOCK))
