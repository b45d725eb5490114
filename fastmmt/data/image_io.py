"""Image decoding with one clear error for every way a file can be unreadable."""
from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from fastmmt.data.records import ImageReadError


def load_image(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB PIL image.

    Raises :class:`ImageReadError` (a ``DatasetError``) naming the path when the file is missing,
    truncated or not an image, so a bad file fails at its own name rather than deep in a worker.
    """
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode: truncated JPEGs fail here, not later
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated ({exc})") from None
