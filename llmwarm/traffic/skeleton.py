"""A JSON request body read as its chunks go by, keeping all but its long strings.

Coverage classifies each user request by a few fields of its body (`model`, `stream`,
`max_tokens`, the sampling and structured-output fields, the parts of its messages), never by
its text. A 5 MB image (a data URL) or a long prompt is one string, and parsing the whole body
on the serving loop (`json.loads` of 5 MB: about 10 ms) stalls every stream the loop serves.
`Skeleton` instead copies what it reads except the inside of any string longer than `LONG`
bytes, which it leaves as a placeholder that `text_length` reads back, and parses only the few
hundred bytes kept.

Its work per chunk is a few passes in C over the chunk (`bytes.replace`, `split`, `map`), and a
Python step per *long* string only (at most one per `LONG` bytes): a body of escaped quotes or of
a hundred thousand short strings costs about what `json.loads` of it costs, never a Python step
per escape or per string (tests/test_skeleton.py holds it to that). Even that is too much on a
loop that serves streams when a client sends such bodies back to back (a few ms each), so a
chunk inside a string with no quote is a memchr and a look at its last bytes, one whose quotes
are all escaped a few counts in C, and past `DENSE_AFTER` bytes a body that holds a quote that
is no escape every `DENSE` bytes or fewer is read no further (`unread`): no request a user means
holds that many tiny strings or keys, while chats, code, images, documents and token IDs hold
few. The gate feeds it 32 KiB at a time, the loop's other work between two
(`llmwarm.serve.recording`; benchmarks/loop_lag.py measures the serving loop under such
bodies). The placeholder carries a random mark of this process's, so no request can forge a
length with a short string of its own.

Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

LONG = 512  # bytes of a string's (escaped) text: a longer one is skipped
# bytes kept at most (a huge token-id list): their parse, a few ms, holds the loop
MAX_KEPT = 256 * 1024
DENSE_AFTER = 64 * 1024  # bytes of a body read whatever they hold; past them, a body with
DENSE = 8  # a quote that is no escape every DENSE bytes or fewer ends the reading (see above)
# A skipped string reads back as NUL, this process's mark, a colon and its length: a request
# cannot know the mark, so its own short strings never read as a length.
_MARK = f"\x00{secrets.token_hex(8)}:"
_QUOTE = ord('"')
# A quote that `LONG` bytes and more follow before the next: where a long string may begin.
_LONG_AFTER = re.compile(b'"(?=[^"]{%d})' % (LONG + 1))


def text_length(text: str) -> int:
    """A string's length, a skipped one's included (see `Skeleton`)."""
    if text.startswith(_MARK) and text[len(_MARK) :].isdigit():
        return int(text[len(_MARK) :])
    return len(text)


# A skipped string within `"\x00".join` of a list's strings: the mark, its length, the string's end
_SKIPPED_IN = re.compile(re.escape(_MARK) + r"(\d+)(?=\x00|\Z)")


def texts_length(texts: list[Any]) -> tuple[int, int]:
    """The lengths of a list's strings added up, skipped ones' included, and how many strings
    there were: in C passes, never a Python step a string (a prompt of 100,000 short strings
    runs on the serving loop). A list of anything else (token IDs): (0, 0)."""
    try:
        joined = "\x00".join(texts)  # a list that holds a non-string stops at its first
    except TypeError:
        strings = [t for t in texts if isinstance(t, str)]  # (vLLM refuses a mixed list)
        return texts_length(strings) if strings and len(strings) < len(texts) else (0, 0)
    total = len(joined) - max(0, len(texts) - 1)
    for skipped in _SKIPPED_IN.finditer(joined):  # at most one per LONG bytes of the body
        total += int(skipped.group(1)) - len(skipped.group(0))
    return total, len(texts)


_MARK_JSON = json.dumps(_MARK)[1:-1].encode()  # the mark as the kept JSON holds it (escaped)


def _count(chunk: bytes, byte: bytes, at: int) -> int:
    """How many times `byte` occurs in the chunk from `at`; counted only where a `find` (a
    memchr, far cheaper than a count) finds one: most of a long string's chunks hold none."""
    return chunk.count(byte, at) if chunk.find(byte, at) >= 0 else 0


def _escapes_next(chunk: bytes, at: int) -> bool | None:
    """Inside a string, with no quote in the chunk from `at`: whether it ends on a backslash
    that escapes the next chunk's first byte (an odd run of them); None if the run is longer
    than the few bytes looked at and is not the whole chunk (the general path reads it)."""
    tail = chunk[max(at, len(chunk) - 64) :]
    run = len(tail) - len(tail.rstrip(b"\\"))
    if run == len(tail) and len(chunk) - at > len(tail):
        run = chunk.count(b"\\", at)  # nothing but backslashes, perhaps
        if run < len(chunk) - at:
            return None
    return run % 2 == 1


class Skeleton:
    """Feed a body's chunks in order (`feed`), then `parse()` the kept part."""

    def __init__(self) -> None:
        self._kept = bytearray()
        self._in_string = False
        self._escape = False  # the chunk before ended inside a string on an escaping backslash
        self._string_at = 0  # where the string being read starts in `_kept` (after its quote)
        self._string_len = 0  # its length so far, in bytes
        self._fed = 0  # bytes of the body so far
        self._delimiters = 0  # quotes in them that are no escape, near enough
        # why the body is not classified: `large` (more than MAX_KEPT to keep), `dense` (see
        # the module docstring); None: read
        self.unread: str | None = None

    @property
    def overflow(self) -> bool:
        """The body was not read to its end (`unread` says why)."""
        return self.unread is not None

    def feed(self, chunk: bytes) -> None:
        if self.unread is not None or not chunk:
            return
        self._fed += len(chunk)
        at = 0  # where this chunk's own reading starts
        if self._escape:  # its first byte is the escaped one
            self._escape = False
            self._string(chunk[:1])
            at = 1
        quotes = _count(chunk, b'"', at)
        backslashes = _count(chunk, b"\\", at) if quotes else 0
        escaped = chunk.count(b'\\"', at) if backslashes else 0
        self._delimiters += quotes - escaped
        if self._fed > DENSE_AFTER and self._delimiters * DENSE >= self._fed:
            self.unread, self._kept = "dense", bytearray()  # thousands of tiny strings
            return
        if self._in_string:  # the two ways a chunk goes on inside a string, in a count or two
            if not quotes and (escapes := _escapes_next(chunk, at)) is not None:
                self._string(memoryview(chunk)[at:])  # text with no quote: goes on
                self._escape = escapes
                return
            if quotes and quotes == escaped and backslashes - escaped <= chunk.endswith(b"\\"):
                # every quote escaped and every backslash an escaped quote's, but perhaps a
                # last one (a prompt of code or JSON): goes on
                self._string(memoryview(chunk)[at:])
                self._escape = backslashes > escaped
                return
        if at:
            chunk = chunk[1:]
        # Escapes neutralised, left to right as JSON pairs them (`\\`, then `\"`): every quote
        # left delimits a string, at the same offset as in `chunk`.
        plain = chunk
        if b"\\" in chunk:
            plain = chunk.replace(b"\\\\", b"..").replace(b'\\"', b"..")
        pos = 0
        if self._in_string:  # the string the chunk before began ends here, or goes on
            end = plain.find(b'"')
            self._string(chunk[: len(chunk) if end < 0 else end], closes=end >= 0)
            pos = len(chunk) if end < 0 else end + 1
        if pos < len(chunk):
            self._outside(chunk, plain, pos)
        if self._in_string and plain.endswith(b"\\"):
            self._escape = True
        if len(self._kept) > MAX_KEPT:
            self.unread, self._kept = "large", bytearray()

    def _outside(self, chunk: bytes, plain: bytes, pos: int) -> None:
        """The chunk from `pos`, where no string is open: the strings it holds, the long ones
        left out (a Python step for each quote that `LONG` bytes follow, no more), and a last
        one that goes on in the next chunk."""
        opened = plain.count(b'"', pos) % 2 == 1
        limit = plain.rfind(b'"') if opened else len(plain)
        cursor = counted = pos
        quotes = 0  # before `counted`, since `pos`
        for match in _LONG_AFTER.finditer(plain, pos, limit):
            at = match.start()
            quotes += plain.count(b'"', counted, at)
            counted = at
            if quotes % 2:  # a closing quote: what follows is no string
                continue
            end = plain.find(b'"', at + 1)
            self._kept += chunk[cursor : at + 1]
            self._kept += b"%s%d" % (_MARK_JSON, end - at - 1)
            cursor = end
        if not opened:
            self._kept += chunk[cursor:]
            return
        self._kept += chunk[cursor : limit + 1]  # with the quote that opens it
        self._in_string, self._string_at, self._string_len = True, len(self._kept), 0
        self._string(chunk[limit + 1 :])

    def _string(self, text: bytes | memoryview, closes: bool = False) -> None:
        """More of the string being read; `closes`: its closing quote follows `text`."""
        self._string_len += len(text)
        if self._string_len <= LONG:
            self._kept += text
        elif len(self._kept) > self._string_at:  # it just became long: drop what was kept
            del self._kept[self._string_at :]
        if closes:
            if self._string_len > LONG:
                self._kept += b"%s%d" % (_MARK_JSON, self._string_len)
            self._kept.append(_QUOTE)
            self._in_string = False

    def parse(self) -> Any:
        """The body with its long strings as placeholders; None if it is not JSON (or was too
        large to keep)."""
        if self.overflow or self._in_string:
            return None
        try:
            return json.loads(self._kept)
        except ValueError:
            return None
