"""Images for previews: decode an upload with Pillow, re-encode its pixels as a fresh PNG, and say what else the
file carries. Pure: bytes in, bytes out.

The preview of a figure is never the uploaded file. Only the PNG, JPEG and GIF decoders are tried; the pixel
count is checked before any pixel is decoded, so a decompression bomb is refused with a reason; the first
frame's pixels go into a new image that has no metadata, and that is saved as PNG (IHDR, IDAT and IEND chunks
only). The pixels are those a page shows (:func:`shown_pixels`): flattened onto white as RGB, with no colour
under a transparent pixel and no low bit of a channel that is not derived from the bits above it. A file that
only starts like an image (a table behind a PNG header) does not decode and has no preview.

:func:`beyond_pixels` walks the file's own structure (PNG chunks, JPEG segments, GIF blocks) and names what
the preview leaves out: metadata blocks by type and size, bytes after the end of the image, more frames. It
names types and counts bytes, never quotes them, so its lines can be shown next to the preview.
"""

from __future__ import annotations

import io
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

from paitient.rules import imagecheck

FORMATS = ("PNG", "JPEG", "GIF")
"""The decoders the airlock lets Pillow try; every other format has no image preview."""

PNG_CRITICAL = {b"IHDR", b"PLTE", b"IDAT", b"IEND"}


class ImageRefused(ValueError):
    """The bytes are not an image the airlock previews; the message says why."""


@dataclass(frozen=True)
class Reencoded:
    png: bytes
    """The canonical PNG: the first frame's pixels, nothing else."""
    format: str
    """What the upload decoded as: PNG, JPEG or GIF."""
    width: int
    height: int
    frames: int
    beyond_pixels: tuple[str, ...]
    """What the upload carries that the PNG leaves out (see :func:`beyond_pixels`)."""


def reencode(data: bytes, *, max_pixels: int, max_bytes: int) -> Reencoded:
    """Decode ``data`` as PNG, JPEG or GIF and re-encode the first frame as a metadata-free PNG.

    Raises :class:`ImageRefused` for anything else, for more than ``max_pixels`` pixels (before decoding
    them) and for a re-encoded PNG over ``max_bytes``.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise ImageRefused("it does not decode as a PNG, JPEG or GIF image") from None
    except Image.DecompressionBombError as e:
        raise ImageRefused(f"it declares more pixels than Pillow decodes ({e}); this is a decompression bomb") from None
    except Exception as e:
        raise ImageRefused(f"it does not decode as an image ({type(e).__name__})") from None
    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageRefused(f"it declares an empty image ({width}x{height} pixels)")
        if width * height > max_pixels:
            raise ImageRefused(
                f"it declares {width}x{height} = {width * height} pixels, more than the {max_pixels} a preview "
                "decodes (a decompression bomb or an oversized figure); save the figure at a lower resolution"
            )
        try:
            frames = int(getattr(im, "n_frames", 1))
            im.seek(0)
            im.load()
            clean = shown_pixels(im)
        except Exception as e:
            raise ImageRefused(f"its pixels do not decode ({type(e).__name__}: {str(e)[:200]})") from None
        fmt = str(im.format)
    out = io.BytesIO()
    clean.save(out, format="PNG", compress_level=6)
    png = out.getvalue()
    if len(png) > max_bytes:
        raise ImageRefused(f"re-encoded as PNG it has {len(png)} bytes, more than the {max_bytes} a preview shows")
    return Reencoded(png, fmt, width, height, frames, beyond_pixels(data, fmt, frames))


BACKGROUND = (255, 255, 255)
"""What a transparent figure is flattened onto: the white of the page a preview shows it on."""
KEPT_BITS = 6
"""Bits of each colour channel a released figure keeps; the low ones are each pixel's high bits repeated."""
_QUANTISE = [(v >> (8 - KEPT_BITS) << (8 - KEPT_BITS)) | (v >> KEPT_BITS) for v in range(256)]
"""A channel's value with its low ``8 - KEPT_BITS`` bits replaced by its high ones (bit replication): black stays
0 and white 255, a colour moves by at most 3 of 255, and applying it twice changes nothing."""


def shown_pixels(im: Any) -> Any:
    """The pixels of ``im`` (a loaded Pillow image) as a released figure holds them: flattened onto
    :data:`BACKGROUND` as RGB, each channel with its low bits derived from its high ones.

    A colour under a fully transparent pixel is never seen, and a low bit of a visible one is a change of 1 in
    255 nobody sees: kept, either carries a file of data inside a figure that looks like a plot. Flattening
    leaves no alpha channel; the quantisation leaves no bit that is not a function of the bits above it."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    else:
        flat = im.convert("RGB")
    return flat.point(_QUANTISE * 3)


def beyond_pixels(data: bytes, fmt: str, frames: int = 1) -> tuple[str, ...]:
    """Lines that name what a ``fmt`` file carries besides its first frame's pixels (empty: nothing found).

    The file's structure is followed by the walkers the egress gate judges images with
    (:mod:`paitient.rules.imagecheck`); here what they find is named, not judged, except that a structure they
    cannot follow to its end is said to be one."""
    walk = {"PNG": _png_blocks, "JPEG": _jpeg_blocks, "GIF": _gif_blocks}.get(fmt)
    if walk is None:
        return ()
    try:
        blocks, end = walk(data)
    except (IndexError, struct.error, ValueError):
        return ("its structure could not be followed to the end, so more may be hidden in it",)
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for name, size in blocks:
        counts[name] += 1
        sizes[name] += size
    lines = [
        f"{counts[name]} {name} block{'s' if counts[name] > 1 else ''} ({sizes[name]} bytes)" for name in sorted(counts)
    ]
    if frames > 1:
        lines.append(f"{frames - 1} more frame{'s' if frames > 2 else ''} (the preview shows the first)")
    if end < len(data):
        lines.append(f"{len(data) - end} bytes after the end of the image")
    return tuple(lines)


def _png_blocks(data: bytes) -> tuple[list[tuple[str, int]], int]:
    """Ancillary chunks (but tRNS, the transparency the figure is flattened with) and where IEND ends."""
    chunks, end = imagecheck.png_chunks(data)
    return [(k.decode("ascii"), len(b)) for k, b in chunks if k not in PNG_CRITICAL and k != b"tRNS"], end


def _jpeg_blocks(data: bytes) -> tuple[list[tuple[str, int]], int]:
    """APPn and COM segments and where the EOI marker ends."""
    segments, end = imagecheck.jpeg_segments(data)
    return [
        ("COM" if m == 0xFE else f"APP{m - 0xE0}", len(b)) for m, b in segments if imagecheck.is_jpeg_metadata(m)
    ], end


GIF_EXTENSIONS = {0xFE: "comment", 0xFF: "application", 0x01: "plain-text"}


def _gif_blocks(data: bytes) -> tuple[list[tuple[str, int]], int]:
    """Extension blocks other than graphic control, and where the trailer ends."""
    blocks, end = imagecheck.gif_blocks(data)
    named = [
        (GIF_EXTENSIONS.get(label, f"extension-{label:02x}"), len(payload))
        for label, payload in blocks
        if label not in (imagecheck.GIF_IMAGE, imagecheck.GIF_GRAPHIC_CONTROL)
    ]
    return named, end
