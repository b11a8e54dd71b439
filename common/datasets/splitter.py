"""Cut a stream of bytes into examples, one JSONL line or one JSON array element at a time.

Only one example is ever held in memory, and never more than ``max_record_bytes`` of it: an
over-long line is refused while it is still arriving. The splitter works on bytes, not text:
every byte that matters to it (quote, backslash, brackets, comma, newline) is ASCII, and in
UTF-8 an ASCII byte is never part of a multi-byte character, so a character cut in two by a
chunk boundary simply lands in the record buffer whole. Decoding happens per record, which
also lets an encoding error be reported with its line.

The layout is decided by the first significant byte: ``[`` means one top-level JSON array,
anything else means JSONL. Blank (whitespace-only) JSONL lines are skipped but still counted,
so line numbers always match what an editor shows.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

from common.datasets.errors import DatasetError, ErrorCode

# Deeper JSON than this is refused: no real example needs it, and parsing it recursively is
# how a hostile file would try to exhaust the stack.
MAX_NESTING = 256

_BOM_UTF8 = b"\xef\xbb\xbf"
_BOMS_UTF16 = (b"\xff\xfe", b"\xfe\xff")
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")
# What changes the scanner's state inside an array element, outside and inside strings.
_STRUCTURE = re.compile(rb'["\[\]{}]')
# The rest of a string up to its closing quote (or the end of the chunk), escapes included.
_STRING_BODY = re.compile(rb'(?:[^"\\]++|\\.)*+', re.DOTALL)
_SCALAR_STOP = re.compile(rb"[,\] \t\r\n]")
_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPEN_BRACKET, _CLOSE_BRACKET = ord("["), ord("]")
_OPENERS = frozenset(b"[{")


class Layout(StrEnum):
    JSONL = "jsonl"
    ARRAY = "array"


@dataclass(frozen=True, slots=True)
class RawRecord:
    """The bytes of one example and where it starts."""

    line: int
    index: int | None  # position in the JSON array; None for JSONL
    data: bytes

    def where(self) -> str:
        if self.index is None:
            return f"line {self.line}"
        return f"line {self.line}, array element [{self.index}]"


def describe_byte(value: int) -> str:
    if 0x21 <= value < 0x7F:
        return repr(chr(value))
    return f"byte 0x{value:02x}"


def _string_end(data: bytes, pos: int) -> int:
    """Where the string body starting at ``pos`` stops: its closing quote, a backslash
    that is the last byte, or the end of ``data``."""
    m = _STRING_BODY.match(data, pos)
    assert m is not None  # the pattern matches the empty string
    return m.end()


def nesting_depth(data: bytes) -> int:
    """The deepest bracket nesting in a JSON text, ignoring brackets inside strings."""
    depth = deepest = pos = 0
    while m := _STRUCTURE.search(data, pos):
        pos = m.end()
        byte = data[m.start()]
        if byte == _QUOTE:
            pos = _string_end(data, pos) + 1
        elif byte in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


class StreamSplitter:
    """Settles the byte order mark and the layout, then hands bytes to the right splitter."""

    def __init__(self, max_record_bytes: int) -> None:
        self._max = max_record_bytes
        self._head: bytearray | None = bytearray()  # None once the BOM question is settled
        self._line = 1  # line of the next byte, until the first significant byte
        self._inner: _JsonlSplitter | _ArraySplitter | None = None

    @property
    def layout(self) -> Layout | None:
        if self._inner is None:
            return None
        return Layout.ARRAY if isinstance(self._inner, _ArraySplitter) else Layout.JSONL

    def feed(self, chunk: bytes) -> Iterator[RawRecord]:
        if self._head is not None:
            self._head += chunk
            waiting = len(self._head) < len(_BOM_UTF8) and any(
                bom.startswith(self._head) for bom in (_BOM_UTF8, *_BOMS_UTF16)
            )
            if waiting:
                return
            chunk = self._settle_head()
        if self._inner is None:
            chunk = self._find_start(chunk)
        if self._inner is not None and chunk:
            yield from self._inner.feed(chunk)

    def finish(self) -> Iterator[RawRecord]:
        if self._head is not None:  # the file is shorter than a byte order mark
            yield from self.feed(self._settle_head())
        if self._inner is not None:
            yield from self._inner.finish()

    def _settle_head(self) -> bytes:
        assert self._head is not None
        head = bytes(self._head)
        self._head = None
        if head.startswith(_BOM_UTF8):
            return head[len(_BOM_UTF8) :]
        if head.startswith(_BOMS_UTF16):
            raise DatasetError(
                "line 1: the file is UTF-16 encoded (it starts with a UTF-16 byte order "
                "mark); save it as UTF-8",
                ErrorCode.INVALID_UTF8,
                1,
            )
        return head

    def _find_start(self, chunk: bytes) -> bytes:
        m = _NOT_BLANK.search(chunk)
        if m is None:
            self._line += chunk.count(b"\n")
            return b""
        start = m.start()
        self._line += chunk.count(b"\n", 0, start)
        if chunk[start] == _OPEN_BRACKET:
            self._inner = _ArraySplitter(self._max, self._line)
        else:
            self._inner = _JsonlSplitter(self._max, self._line)
        return chunk[start:]


class _JsonlSplitter:
    def __init__(self, max_bytes: int, line: int) -> None:
        self._max = max_bytes
        self._line = line  # line of the bytes in the buffer
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> Iterator[RawRecord]:
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            self._append(part)
            if _NOT_BLANK.search(self._buf):
                yield RawRecord(self._line, None, bytes(self._buf))
            self._buf.clear()
            self._line += 1
        self._append(rest)

    def finish(self) -> Iterator[RawRecord]:
        if _NOT_BLANK.search(self._buf):
            yield RawRecord(self._line, None, bytes(self._buf))
        self._buf.clear()

    def _append(self, part: bytes) -> None:
        if len(self._buf) + len(part) > self._max:
            raise DatasetError(
                f"line {self._line}: the line is longer than the limit of {self._max} "
                "bytes; each example must fit on one line of at most that size",
                ErrorCode.LINE_TOO_LONG,
                self._line,
            )
        self._buf += part


class _State(StrEnum):
    OPEN = "open"  # before the '['
    FIRST = "first"  # after '[': an element or ']'
    VALUE = "value"  # after ',': an element
    INSIDE = "inside"  # within an element
    SEPARATOR = "separator"  # after an element: ',' or ']'
    DONE = "done"  # after the closing ']': only whitespace


class _ArraySplitter:
    """Finds the top-level elements of ``[ ... ]`` by tracking strings and nesting."""

    def __init__(self, max_bytes: int, line: int) -> None:
        self._max = max_bytes
        self._line = line  # line of the next byte to scan
        self._state = _State.OPEN
        self._elem = bytearray()
        self._elem_line = 0
        self._index = 0  # index of the element being read (or next to be read)
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False
        self._ends_with_newline = False

    def feed(self, chunk: bytes) -> Iterator[RawRecord]:
        pos, end = 0, len(chunk)
        if end:
            self._ends_with_newline = chunk[-1] == ord("\n")
        while pos < end:
            if self._state is not _State.INSIDE:
                m = _NOT_BLANK.search(chunk, pos)
                stop = end if m is None else m.start()
                self._line += chunk.count(b"\n", pos, stop)
                if m is None:
                    return
                pos = self._punctuation(chunk, stop)
            elif self._in_string:
                pos = self._scan_string(chunk, pos)
                if not self._in_string and self._depth == 0:
                    yield self._take()
            elif self._scalar:
                m = _SCALAR_STOP.search(chunk, pos)
                stop = end if m is None else m.start()
                self._grow(chunk, pos, stop)
                pos = stop
                if m is not None:
                    yield self._take()
            else:
                m = _STRUCTURE.search(chunk, pos)
                stop = end if m is None else m.end()
                self._grow(chunk, pos, stop)
                pos = stop
                if m is not None and self._structure(chunk[m.start()]):
                    yield self._take()

    def finish(self) -> Iterator[RawRecord]:
        if self._state is not _State.DONE:
            raise self._truncated()
        yield from ()

    def _truncated(self) -> DatasetError:
        if self._state is _State.INSIDE:
            return DatasetError(
                f"line {self._elem_line}, array element [{self._index}]: the file ends "
                "inside this element; the JSON array is truncated",
                ErrorCode.INVALID_JSON,
                self._elem_line,
            )
        last = self._line - 1 if self._ends_with_newline else self._line
        return DatasetError(
            f"line {last}: the file ends before the JSON array is closed with ']'; "
            "the JSON array is truncated",
            ErrorCode.INVALID_JSON,
            last,
        )

    def _fail(self, problem: str) -> DatasetError:
        return DatasetError(f"line {self._line}: {problem}", ErrorCode.INVALID_JSON, self._line)

    def _punctuation(self, chunk: bytes, pos: int) -> int:
        """Handle the significant byte at ``pos`` between elements; return the next position."""
        byte = chunk[pos]
        state = self._state
        if state is _State.OPEN:
            self._state = _State.FIRST  # the caller only starts us on a '['
            return pos + 1
        if state is _State.DONE:
            raise self._fail(
                f"unexpected {describe_byte(byte)} after the end of the top-level JSON "
                "array; a JSON file must hold exactly one array (or use JSONL: one "
                "example per line)"
            )
        if state is _State.SEPARATOR:
            if byte == _COMMA:
                self._state = _State.VALUE
                return pos + 1
            if byte == _CLOSE_BRACKET:
                self._state = _State.DONE
                return pos + 1
            raise self._fail(
                f"expected ',' or ']' after array element [{self._index - 1}], found "
                f"{describe_byte(byte)}"
            )
        if byte == _CLOSE_BRACKET:
            if state is _State.FIRST:
                self._state = _State.DONE
                return pos + 1
            raise self._fail(
                f"trailing comma after array element [{self._index - 1}]; remove the ',' before ']'"
            )
        if byte == _COMMA:
            raise self._fail("unexpected ',' where an array element was expected")
        self._state = _State.INSIDE
        self._elem_line = self._line
        self._depth = 0
        self._in_string = self._escape = self._scalar = False
        if byte in _OPENERS:
            self._structure(byte)
        elif byte == _QUOTE:
            self._in_string = True
        else:
            self._scalar = True  # a number or literal; scanned (and rejected) later
            return pos
        self._grow(chunk, pos, pos + 1)
        return pos + 1

    def _scan_string(self, chunk: bytes, pos: int) -> int:
        if self._escape:  # the chunk before ended in the middle of an escape
            self._escape = False
            self._grow(chunk, pos, pos + 1)
            return pos + 1
        stop = _string_end(chunk, pos)
        if stop == len(chunk):
            self._grow(chunk, pos, stop)
            return stop
        if chunk[stop] == _QUOTE:
            self._in_string = False
        else:  # a backslash as the chunk's last byte
            self._escape = True
        self._grow(chunk, pos, stop + 1)
        return stop + 1

    def _structure(self, byte: int) -> bool:
        """Track one quote or bracket inside an element; True when the element is complete."""
        if byte == _QUOTE:
            self._in_string = True
            return False
        if byte in _OPENERS:
            self._depth += 1
            if self._depth > MAX_NESTING:
                raise DatasetError(
                    f"line {self._elem_line}, array element [{self._index}]: invalid "
                    f"JSON: nested more than {MAX_NESTING} levels deep",
                    ErrorCode.INVALID_JSON,
                    self._elem_line,
                )
            return False
        self._depth -= 1
        return self._depth == 0

    def _grow(self, chunk: bytes, start: int, stop: int) -> None:
        if stop <= start:
            return
        if len(self._elem) + (stop - start) > self._max:
            raise DatasetError(
                f"line {self._elem_line}, array element [{self._index}]: the element is "
                f"longer than the limit of {self._max} bytes",
                ErrorCode.LINE_TOO_LONG,
                self._elem_line,
            )
        self._elem += memoryview(chunk)[start:stop]
        self._line += chunk.count(b"\n", start, stop)

    def _take(self) -> RawRecord:
        record = RawRecord(self._elem_line, self._index, bytes(self._elem))
        self._elem.clear()
        self._index += 1
        self._state = _State.SEPARATOR
        return record
