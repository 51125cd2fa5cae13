"""Regexes written by clients (adapter configs), matched in time linear in the text.

PEFT matches these strings with Python's backtracking `re`, where one hostile
pattern (`(.|\\w)*z`, `(.*)*x`) holds the GIL for hours: the whole server stops,
SIGTERM included. Here every one runs on RE2, which never backtracks. A pattern
is accepted only when both engines compile it (what `re` refuses, PEFT would
crash on) and read it alike: on module names (ASCII identifiers and digits
joined by dots, no newline) the engines agree except on the shapes refused below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import re2

from server.errors import AdapterError

MAX_PATTERN_CHARS = 4096
# Per compiled pattern: RE2 refuses a program larger than this, and its lazy DFA never grows past it.
MAX_PATTERN_MEMORY = 1024 * 1024
# Both engines accept these, with different meanings: `re` reads `{,n}` as 0..n repeats, RE2 literally;
# RE2 reads `[:alpha:]` in a class as a POSIX class, `re` as the characters themselves.
_DIVERGENT = (
    (re.compile(r"(?<!\\)(?:\\\\)*\{,"), "'{,n}' repeats mean different things to re and RE2: write '{0,n}'"),
    (re.compile(r"\[:\^?[A-Za-z]+:\]"), "POSIX classes like '[:alpha:]' are not supported"),
)


def _options(capture: bool) -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False  # a refused pattern is the client's error, not a line on the server's stderr
    options.never_capture = not capture  # yes/no matching stays on RE2's DFA, much faster than with groups
    return options


_OPTIONS = {capture: _options(capture) for capture in (False, True)}


@dataclass(frozen=True, eq=False)
class UserRegex:
    """One client regex inside the template PEFT wraps it in, compiled once."""

    source: str  # what the client wrote
    compiled: re2._Regexp  # the template around `source`, on RE2

    def fullmatch(self, text: str) -> bool:
        return self.compiled.fullmatch(text) is not None

    def match(self, text: str) -> re2._Match | None:
        """Anchored at the start, like `re.match`."""
        return self.compiled.match(text)


def user_regex(field: str, source: str, prefix: str = "", suffix: str = "", capture: bool = False) -> UserRegex:
    """`prefix + source + suffix` compiled on RE2, or an AdapterError naming `field`.

    Without `capture` a match tells only whether it matched (no groups)."""
    if len(source) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{field}: pattern {source[:40]!r}... is over {MAX_PATTERN_CHARS} characters")
    for shape, why in _DIVERGENT:
        if shape.search(source):
            raise AdapterError(f"{field}: pattern {source!r} is refused: {why}")
    full = prefix + source + suffix
    try:
        re.compile(full)
    except (re.error, RecursionError, OverflowError) as e:  # deep nesting overflows re's parser
        raise AdapterError(f"{field}: pattern {source!r} is not a valid regex: {e}") from None
    try:
        compiled = re2.compile(full, _OPTIONS[capture])
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise AdapterError(f"{field}: pattern {source!r} is not supported ({why}): adapter config regexes "
                           "run on RE2, without backreferences, lookaround or possessive repeats") from None
    except UnicodeEncodeError:
        raise AdapterError(f"{field}: pattern {source!r} is not valid Unicode text") from None
    return UserRegex(source, compiled)
