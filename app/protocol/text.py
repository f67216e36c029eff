"""Which characters a text field may hold (security review items H1 and L7).

Three classes, each a compiled character class the codec `search`es (one pass
in C, cheap enough for every message body):

- ``NUL``: U+0000, which PostgreSQL's ``text`` cannot store (one such body
  failed a whole group commit), and lone surrogates, which are not Unicode
  text (orjson already refuses them as ``bad_json``; this is the second line).
  No string field of a request accepts them.
- ``BODY``: the above plus every control character (Unicode category Cc)
  except tab and newline: a message is multi-line text, not a terminal script.
  Format characters (Cf) stay allowed in bodies, since right-to-left text, emoji
  sequences (U+200D) and Persian (U+200C) need them.
- ``LINE``: for one-line labels other users see next to a name (room names,
  presence text): no Cc at all, no Cf (bidi overrides and isolates such as
  U+202E, zero-width characters, U+FEFF, tags), no line or paragraph separator
  (U+2028, U+2029). These are the characters that make one label look like another.

``FORMAT_RANGES`` lists Unicode's Cf characters as of Unicode 15 (Python's
``unicodedata`` is 14.0 on 3.11): a test checks it still covers every Cf
character of the running Python, so an upgrade that adds some fails loudly.
"""

from __future__ import annotations

import re
from typing import Final

_SURROGATES: Final = "\ud800-\udfff"

# Unicode general category Cf (format), as closed code point ranges.
FORMAT_RANGES: Final[tuple[tuple[int, int], ...]] = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x0600, 0x0605),
    (0x061C, 0x061C),  # Arabic letter mark
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),  # Mongolian vowel separator
    (0x200B, 0x200F),  # zero width space/non-joiner/joiner, LRM, RLM
    (0x202A, 0x202E),  # bidi embeddings and overrides
    (0x2060, 0x2064),  # word joiner, invisible operators
    (0x2066, 0x206F),  # bidi isolates, deprecated format characters
    (0xFEFF, 0xFEFF),  # zero width no-break space (BOM)
    (0xFFF9, 0xFFFB),  # interlinear annotation
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),  # Egyptian hieroglyph format controls (1343F: Unicode 15)
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),  # language tag
    (0xE0020, 0xE007F),  # tag characters
)


def _ranges(pairs: tuple[tuple[int, int], ...]) -> str:
    return "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in pairs)


NUL: Final = re.compile(f"[\x00{_SURROGATES}]")
BODY: Final = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_SURROGATES}]")
LINE: Final = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_SURROGATES}{_ranges(FORMAT_RANGES)}]")
