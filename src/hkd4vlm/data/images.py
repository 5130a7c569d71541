"""Safe image access: paths confined to the images folder, pixel limits, mode and EXIF handling."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

#: default pixel limit (width × height); larger images are refused as possible decompression bombs
DEFAULT_MAX_PIXELS = 40_000_000
#: the HTTP service's own limit on an uploaded image (``serve --max-image-pixels``), lower than
#: DEFAULT_MAX_PIXELS (the guard for one's own files, in the data layer and the Detector): there anyone who
#: can reach the server picks the image, and each decoding thread may hold one at full size (3 bytes a pixel)
#: outside the service's in-flight memory budget; 16 M pixels is still more than a judge reads (the service
#: scales every image down to ``max_image_side``)
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000
#: the image formats that are opened (PIL's names); any other is refused before a decoder sees it. PIL would
#: otherwise pick a plugin by the file's first bytes, and some run external programs (EPS: Ghostscript) or
#: are rarely exercised parsers: a dataset or an upload may only be these
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class ImageProblem(ValueError):
    """An image that cannot be used; the message says why, ``file`` which file (None for bytes, a PIL image or a
    name not yet resolved to a file)."""

    def __init__(self, message: str, *, file: str | None = None):
        super().__init__(message)
        self.file = file


def resolve_image_path(images_dir: str | os.PathLike, image_id: str) -> Path:
    """The file for ``image_id`` inside ``images_dir``; refuses anything that leaves that folder.

    Absolute ids, ``..`` components and symlinks pointing out of the folder are all refused.
    """
    if not image_id or not image_id.strip():
        raise ImageProblem("empty image_id")
    if "\x00" in image_id:
        raise ImageProblem(f"{image_id!r} contains a NUL byte, which no file name can hold")
    if os.path.isabs(image_id) or image_id.startswith(("/", "\\")) or (len(image_id) > 1 and image_id[1] == ":"):
        raise ImageProblem(f"{image_id!r} is an absolute path; image_id must be relative to the images folder")
    if ".." in Path(image_id.replace("\\", "/")).parts:
        raise ImageProblem(f"{image_id!r} leaves the images folder ('..')")
    try:
        base = Path(images_dir).resolve()
        path = (base / image_id).resolve()
    except RuntimeError as e:  # Python < 3.13 reports a symlink loop as a RuntimeError
        raise ImageProblem(f"{image_id!r} cannot be resolved: {e} (a symlink loop?)") from None
    if base != path and base not in path.parents:
        raise ImageProblem(
            f"{image_id!r} resolves to {path}, outside the images folder {base} (symlink?)", file=str(path)
        )
    return path


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16/32-bit greyscale is rescaled, alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = ((arr - lo) * scale).clip(0, 255).astype("uint8")
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(
    source: str | os.PathLike | bytes | bytearray | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> Image.Image:
    """Load an image fully as RGB with EXIF orientation applied.

    ``source`` is a path, raw bytes or a PIL image. Raises :class:`ImageProblem` for a missing,
    empty, truncated or non-image file, or one over ``max_pixels``. ``max_side``: an image longer than
    that on a side is scaled down to fit, keeping its aspect ratio (a JPEG is decoded at a reduced scale
    at once, so a large photo never exists in memory at full size); None keeps the size.
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be at least 1 (or None), got {max_side}")
    file = None if isinstance(source, (Image.Image, bytes, bytearray)) else str(source)
    if isinstance(source, Image.Image):
        img = source
        _check_pixels(img, max_pixels)
    else:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise ImageProblem("empty image data")
            fp = io.BytesIO(source)
        else:
            path = Path(source)
            if not path.exists():
                raise ImageProblem(f"file not found: {path}", file=file)
            if not path.is_file():
                raise ImageProblem(f"not a regular file: {path}", file=file)
            if path.stat().st_size == 0:
                raise ImageProblem(f"empty file: {path}", file=file)
            fp = io.BytesIO(path.read_bytes())
        with warnings.catch_warnings():
            # PIL's own bomb check warns or raises at its global limit; ours is explicit and configurable
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                img = Image.open(fp, formats=IMAGE_FORMATS)
                _check_pixels(img, max_pixels, file)
                if max_side is not None:  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still at least max_side
                    img.draft("RGB", (max_side, max_side))
                img.load()
            except ImageProblem:
                raise
            except UnidentifiedImageError:
                raise ImageProblem(
                    f"not an image file in a supported format ({', '.join(IMAGE_FORMATS)})", file=file
                ) from None
            except Image.DecompressionBombError as e:
                raise ImageProblem(f"image too large: {e}", file=file) from None
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageProblem(f"corrupt or truncated image: {e}", file=file) from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # a broken EXIF block should name itself, not crash a training run
        raise ImageProblem(f"corrupt EXIF data: {e}", file=file) from None
    img = to_rgb(img)
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)  # a new image: the caller's is kept
    return img


def _check_pixels(img: Image.Image, max_pixels: int, file: str | None = None) -> None:
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageProblem(f"image has no pixels ({w}x{h})", file=file)
    if w * h > max_pixels:
        raise ImageProblem(
            f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
            "(possible decompression bomb; raise --max-pixels if it is genuine)",
            file=file,
        )
