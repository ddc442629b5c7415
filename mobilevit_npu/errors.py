"""The one exception the scripts turn into a one-line message (exit 2), and a short form of any exception."""

from __future__ import annotations

import logging

logger = logging.getLogger("mobilevit_npu.errors")


class UserError(Exception):
    """Bad usage, model or device: the scripts print the message (no traceback) and exit 2."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters ("" for an empty message): enough to say
    why in a report or an error without a library's multi-page explanation. A longer line is cut at its last sentence
    end within the limit (else its last word, marked with "..."), never mid-sentence."""
    text = str(exc).strip()
    line = text.splitlines()[0].strip() if text else ""
    if len(line) <= limit:
        return line
    head = line[: limit + 1]
    end = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if end > 0:
        return head[: end + 1]
    return head[: limit - 4].rsplit(" ", 1)[0] + " ..."


class Unavailable(Exception):
    """A mode or runtime that cannot run on this device or build; the message is the report's reason."""
