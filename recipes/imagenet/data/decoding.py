"""Decoding an image file or bytes to RGB, where a file that cannot be decoded becomes None and is named once
per worker instead of ending a multi-day run. Only decoding is guarded: it never catches a transform's error."""

from __future__ import annotations

import logging
import struct
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

# What PIL raises on truncated, corrupt or hostile files. Anything else is a bug and is not swallowed.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


class Decoding:
    """Decoding that turns a bad file into None and names the first one per process (i.e. per worker).

    The datasets hand None on for the loader's collate to drop from its batch and count; an exception raised
    by the transform itself is a bug and still propagates.
    """

    _warned = False

    def _bad(self, name: str, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("skipping unreadable image %s (%s); later ones in this worker are counted, not named",
                        name, why)

    def _read_image(self, source: Any, name: str) -> Image.Image | None:
        try:
            with Image.open(source) as im:
                return im.convert("RGB")  # forces the full decode inside the guard
        except DECODE_ERRORS as e:
            self._bad(name, f"{type(e).__name__}: {e}")
            return None
