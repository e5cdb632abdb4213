"""Token ids in, text pieces out: the pieces of one answer concatenate to exactly its final text.

Each new token decodes a short window of the ids (the tokens since the last complete piece, after a few
tokens of context so a tokenizer's spacing rules see their neighbours) and hands out only the new suffix.
A window that decodes to a trailing U+FFFD (a multi-byte character cut between tokens) waits for the next
token::

    ids      ... 1234 | 5678 (first half of "é")         -> ""   (held back)
    ids      ... 1234 | 5678 9012 (second half)          -> "é"

Stop strings cut the text where the first one starts (the stop string itself is not returned, as OpenAI
does it); while a piece might be the start of a stop string, its last ``len(longest stop) - 1`` characters
wait until the next tokens tell.
"""

from __future__ import annotations

from collections.abc import Sequence

_CONTEXT = 5  # tokens decoded before the new ones, for tokenizers whose spacing depends on the neighbour


class TextStream:
    """One answer's text, built a token at a time; ``stopped`` once a stop string was found."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the decoded text so far (cut at a stop string once one is found)
        self.sent = 0  # how many characters of ``text`` were handed out
        self.stopped = False
        self._prefix = 0  # ids[_prefix:_read] are the context of the next window
        self._read = 0

    def push(self, token_id: int) -> str:
        """Take one generated token; the text it completes that is safe to hand out (often "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._add(self._decode(final=False))
        return self._release(final=False)

    def finish(self) -> str:
        """The answer ended: whatever text is still held back."""
        if not self.stopped:
            self._add(self._decode(final=True))
        return self._release(final=True)

    def _decode(self, final: bool) -> str:
        """The text the ids since ``_read`` add (and moves the window on), or "" while a character is cut."""
        if self._read == len(self.ids):
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if not final and (after.endswith("\ufffd") or len(after) <= len(before)):
            return ""
        self._prefix, self._read = max(self._prefix, len(self.ids) - _CONTEXT), len(self.ids)
        return after[len(before) :] if after.startswith(before) else after[_common_prefix(before, after) :]

    def _add(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True

    def _release(self, final: bool) -> str:
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self._hold)
        piece, self.sent = self.text[self.sent : end], end
        return piece


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
