"""A JSON request body read as its chunks go by, keeping all but its long strings.

Coverage classifies each user request by a few fields of its body (`model`, `stream`,
`max_tokens`, the sampling and structured-output fields, the parts of its messages), never by
its text. A 5 MB image (a data URL) or a long prompt is one string, and parsing the whole body
on the serving loop (`json.loads` of 5 MB: about 10 ms) stalls every stream the loop serves.
`Skeleton` instead copies what it reads except the inside of any string longer than `LONG`
characters, which it skips at memchr speed (`bytes.find`) and leaves as a placeholder that
`text_length` reads back. The work per chunk stays small whatever the body holds, and what is
parsed at the end is a few hundred bytes.

Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

LONG = 512  # characters: a string longer than this is skipped
MAX_KEPT = 1 << 20  # bytes kept at most (a body of many short strings, a huge token-id list)
_PLACEHOLDER = "\x00"  # a skipped string stands as NUL and its length: "\u0000123456"
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def text_length(text: str) -> int:
    """A string's length, a skipped one's included (see `Skeleton`)."""
    if text.startswith(_PLACEHOLDER) and text[1:].isdigit():
        return int(text[1:])
    return len(text)


class Skeleton:
    """Feed a body's chunks in order (`feed`), then `parse()` the kept part."""

    def __init__(self) -> None:
        self._kept = bytearray()
        self._in_string = False
        self._backslashes = 0  # the run of backslashes that ends what was read of a string
        self._string_at = 0  # where the string being read starts in `_kept` (after its quote)
        self._string_len = 0  # its length so far, in bytes
        self.overflow = False  # more than MAX_KEPT to keep: the body is not classified

    def feed(self, chunk: bytes) -> None:
        if self.overflow:
            return
        pos, end = 0, len(chunk)
        while pos < end:
            if not self._in_string:
                quote = chunk.find(b'"', pos)
                self._kept += chunk[pos : end if quote < 0 else quote + 1]
                if quote < 0:
                    break
                self._in_string, self._string_at, self._string_len = True, len(self._kept), 0
                self._backslashes, pos = 0, quote + 1
                continue
            close = self._closing_quote(chunk, pos)
            self._take(chunk, pos, end if close < 0 else close)
            if close < 0:
                break
            self._close()
            pos = close + 1
        if len(self._kept) > MAX_KEPT:
            self.overflow = True
            self._kept = bytearray()

    def _closing_quote(self, chunk: bytes, pos: int) -> int:
        """The index of the quote that ends the string in `chunk[pos:]`, or -1; keeps count of
        the backslashes it ends on, for the next chunk."""
        start = pos
        while True:
            quote = chunk.find(b'"', pos)
            stop = len(chunk) if quote < 0 else quote
            run = 0
            while stop - run - 1 >= start and chunk[stop - run - 1] == _BACKSLASH:
                run += 1
            if stop - run == start:  # the run reaches back into what came before
                run += self._backslashes
            if quote < 0:
                self._backslashes = run
                return -1
            if run % 2 == 0:
                return quote
            pos = quote + 1  # an escaped quote: the string goes on

    def _take(self, chunk: bytes, start: int, stop: int) -> None:
        self._string_len += stop - start
        if self._string_len <= LONG:
            self._kept += chunk[start:stop]
        elif len(self._kept) > self._string_at:  # it just became long: drop what was kept
            del self._kept[self._string_at :]

    def _close(self) -> None:
        if self._string_len > LONG:  # bytes, near enough characters for an estimate
            self._kept += f"\\u0000{self._string_len}".encode()
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
