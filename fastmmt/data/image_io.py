"""Image decoding with one clear error for every way a file can be unreadable."""
from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

from fastmmt.data.records import ImageReadError


def load_image(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image (grayscale, palette, RGBA and 16-bit files too:
    16-bit samples keep their top 8 bits instead of saturating at 255).

    Raises :class:`ImageReadError` (a ``DatasetError``) naming the path when the file is missing,
    truncated or not an image, so a bad file fails at its own name rather than deep in a worker.
    """
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode: truncated JPEGs fail here, not later
            if img.mode in ("I", "I;16", "I;16B", "I;16L"):
                img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated ({exc})") from None
