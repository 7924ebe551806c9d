"""Stage 0: what text a tokenizer may be given. One policy for every reader of user text (training
records, templates and system prompts, chat's instructions; later pre-training text and the server).

Contract: ``clean_text(text) -> str`` returns the text the tokenizer is given, or raises
``UnencodableText`` whose message says what the text holds and what to do; the caller adds where the
text came from (file and record, flag, line) and raises its own input-error type. Per class:

* lone surrogates (U+D800-U+DFFF not forming a pair; JSON escapes of half an emoji in crawled
  data, or undecodable bytes read with ``surrogateescape``): removed. They are not characters, no
  encoder accepts them (SentencePiece raises), and the text around them is intact.
* NUL (U+0000): refused. Real text never holds it; it means a UTF-16 file read as UTF-8 or binary
  bytes pasted in, so the record is damaged in ways cleaning cannot see.
* other control characters (C0 except tab, newline and carriage return; DEL; C1): the line-breaking
  ones (vertical tab, form feed, U+001C-U+001E, U+0085) become a newline, the rest are removed. They
  carry no text (terminal colour codes, page breaks of PDF extraction) and a tokenizer without byte
  fallback turns each into ``<unk>``.

``TextCleaning`` counts the texts a reader changed, for the one warning it logs per file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Control characters that str.splitlines treats as line boundaries (besides \n and \r).
_LINE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85"
_REMOVED = re.compile(r"[\x01-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]|[\ud800-\udfff]")
_TO_NEWLINE = re.compile(f"[{_LINE_BREAKS}]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class UnencodableText(ValueError):
    """Text the policy refuses; the message says what it holds and the fix, but not where it is."""


def clean_text(text: str) -> str:
    if "\x00" in text:
        raise UnencodableText(
            f"holds a NUL character (U+0000) at character {text.index(chr(0))}, which real text never does; "
            "the file was probably saved as UTF-16 or has binary data pasted in: re-export it as UTF-8 text"
        )
    if not _REMOVED.search(text) and not _TO_NEWLINE.search(text):
        return text
    if _SURROGATE.search(text):
        # A surrogate pair built of two escapes or code points is one real character: join it first.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    return _REMOVED.sub("", _TO_NEWLINE.sub("\n", text))


@dataclass
class TextCleaning:
    """Cleans the texts of one source and counts the items (records, lines) it changed."""

    source: str
    changed: list[str] = field(default_factory=list)

    def clean(self, text: str, item: str) -> str:
        cleaned = clean_text(text)
        if cleaned != text and (not self.changed or self.changed[-1] != item):
            self.changed.append(item)
        return cleaned

    def summary(self) -> str | None:
        """One warning line, or None when nothing was changed."""
        if not self.changed:
            return None
        shown = ", ".join(self.changed[:5]) + (", ..." if len(self.changed) > 5 else "")
        return (
            f"{self.source}: removed lone surrogates or control characters from {len(self.changed)} "
            f"record(s) ({shown}); see the Data section of the README"
        )
