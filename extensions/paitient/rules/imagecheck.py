"""Is a file that starts like an image one, to its last byte? Pure: it is given bytes and reads them.

A magic number is eight bytes a kernel writes in front of anything; the contents API serves images to the
browser (base64), so a table behind a PNG header must not pass for a picture. :func:`carried` follows the
file's own structure and accepts it only when every byte has its place there:

- PNG: every chunk's length, type and CRC; IHDR first and well formed, IEND last and nothing after it;
  the IDAT stream inflates to exactly the scanlines IHDR declares (each with a valid filter byte), so its
  bytes are compressed pixels and not a table; only the chunk types of the PNG specification
  (no private chunk, no animation);
- JPEG: every marker segment up to EOI and nothing after it, only the markers of a baseline or progressive
  image, and the image decodes (Pillow);
- GIF: every block up to the trailer and nothing after it, and every frame decodes (Pillow).

What an image carries besides its pixels (PNG text, ICC profile, Exif and other ancillary chunks, JPEG APPn
and COM segments, GIF comment, plain-text and application extensions) is returned, decompressed where it is
compressed, so that it is read for rows like any text. What no decoder checks is the pixels' own values: a
table drawn into an image is counted, not detected (docs/security-model.md, 13-15).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

MAX_RAW_BYTES = 1 << 28
"""Largest decoded image (bytes of pixels) this reads; a larger one is not an image it opens."""
MAX_CARRIED_BYTES = 1 << 24
"""Largest total of decompressed text, profiles and metadata an image may carry."""
MAX_FRAMES = 1000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_ANCILLARY = {
    b"tRNS", b"cHRM", b"gAMA", b"iCCP", b"sBIT", b"sRGB", b"cICP", b"mDCV", b"cLLI",
    b"tEXt", b"zTXt", b"iTXt", b"bKGD", b"hIST", b"pHYs", b"sPLT", b"eXIf", b"tIME",
}  # fmt: skip
"""The ancillary chunks of the PNG specification (APNG's acTL, fcTL and fdAT are not among them)."""
PNG_BITS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
"""Colour type: the bit depths it allows."""
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""Interlace passes: (x start, y start, x step, y step)."""

JPEG_SEGMENTS = {0xC4, 0xCC, 0xDB, 0xDD, 0xDC, *range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC)}
JPEG_SEGMENTS |= {0xCD, 0xCE, 0xCF}
"""Markers with a length: frame headers (SOFn), Huffman and arithmetic tables, quantisation tables, restart
interval, number of lines. APPn, COM and SOS are handled on their own."""


class NotAnImage(ValueError):
    """The bytes start like an image and are not one; the message says where (never quoting them)."""


def carried(data: bytes, mimetype: str) -> bytes:
    """What the image ``data`` (of ``mimetype``) carries besides its pixels, one block a line; raises
    :class:`NotAnImage` when ``data`` is not that image to its last byte."""
    try:
        if mimetype == "image/png":
            return _png(data)
        if mimetype == "image/jpeg":
            blocks = _jpeg(data)
        elif mimetype == "image/gif":
            blocks = _gif(data)
        else:
            raise NotAnImage(f"{mimetype} is not an image format this reads")
    except (IndexError, struct.error, zlib.error) as e:
        raise NotAnImage(f"its structure breaks off ({type(e).__name__})") from None
    _decodes(data, "JPEG" if mimetype == "image/jpeg" else "GIF")
    return b"\n".join(blocks)


def _inflate(data: bytes, limit: int) -> bytes:
    z = zlib.decompressobj()
    out = z.decompress(data, limit + 1)
    if len(out) > limit or z.unconsumed_tail:
        raise NotAnImage("a compressed block inflates beyond what an image carries")
    if not z.eof or z.unused_data:
        raise NotAnImage("a compressed block does not end where its chunk ends")
    return out


def png_chunks(data: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Every chunk of the PNG ``data`` as (type, body), each length, type and CRC checked, up to and including
    IEND; and where IEND ends (what follows it is the caller's to judge). Raises :class:`NotAnImage`."""
    if not data.startswith(PNG_SIGNATURE):
        raise NotAnImage("no PNG signature")
    pos = len(PNG_SIGNATURE)
    chunks: list[tuple[bytes, bytes]] = []
    while True:
        if pos + 12 > len(data):
            raise NotAnImage("a chunk breaks off before IEND")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if length > 0x7FFFFFFF or pos + 12 + length > len(data) or not kind.isalpha():
            raise NotAnImage("a chunk's length or type is not one PNG allows")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise NotAnImage("a chunk's CRC does not match its bytes")
        pos += 12 + length
        chunks.append((kind, body))
        if kind == b"IEND":
            return chunks, pos


def _png(data: bytes) -> bytes:
    chunks, end = png_chunks(data)
    if end != len(data):
        raise NotAnImage("there are bytes after IEND")
    header: tuple[int, ...] | None = None
    idat: list[bytes] = []
    idat_done = False
    texts: list[bytes] = []
    budget = MAX_CARRIED_BYTES
    for kind, body in chunks:
        if header is None:
            if kind != b"IHDR" or len(body) != 13:
                raise NotAnImage("the first chunk is not IHDR")
            header = struct.unpack(">IIBBBBB", body)
            width, height, depth, colour, compression, filtering, interlace = header
            if not (0 < width < 1 << 31 and 0 < height < 1 << 31) or depth not in PNG_BITS.get(colour, ()):
                raise NotAnImage("IHDR declares an image PNG does not have")
            if compression or filtering or interlace not in (0, 1):
                raise NotAnImage("IHDR declares a method PNG does not have")
            continue
        if kind == b"IEND":
            if body:
                raise NotAnImage("IEND is not empty")
            break
        if kind == b"IDAT":
            if idat_done:
                raise NotAnImage("IDAT chunks are not consecutive")
            idat.append(body)
            continue
        idat_done = bool(idat)
        if kind == b"PLTE":
            if idat or len(body) % 3 or not 0 < len(body) <= 768:
                raise NotAnImage("PLTE is not a palette")
            continue
        if kind not in PNG_ANCILLARY:
            raise NotAnImage("it has a chunk type PNG images do not have")
        text = _png_text(kind, body, budget)
        budget -= len(text)
        if budget < 0:
            raise NotAnImage("it carries more text and metadata than an image does")
        texts.append(text)
    if header is None or not idat:
        raise NotAnImage("it has no image data")
    _png_pixels(b"".join(idat), header)
    return b"\n".join(texts)


def _png_text(kind: bytes, body: bytes, budget: int) -> bytes:
    """An ancillary chunk's content as text: compressed text and profiles inflated, other chunks as they are."""
    if kind in (b"zTXt", b"iCCP"):
        keyword, sep, rest = body.partition(b"\0")
        if not sep or not rest or rest[0] != 0:
            raise NotAnImage(f"a {kind.decode()} chunk is not well formed")
        return keyword + b"\0" + _inflate(rest[1:], budget)
    if kind == b"iTXt":
        keyword, sep, rest = body.partition(b"\0")
        if not sep or len(rest) < 2 or rest[0] not in (0, 1) or rest[1] != 0:
            raise NotAnImage("an iTXt chunk is not well formed")
        language, sep1, rest = rest[2:].partition(b"\0")
        translated, sep2, text = rest.partition(b"\0")
        if not (sep1 and sep2):
            raise NotAnImage("an iTXt chunk is not well formed")
        if body[len(keyword) + 1] == 1:
            text = _inflate(text, budget)
        return b"\0".join((keyword, language, translated, text))
    return body


def _png_pixels(stream: bytes, header: tuple[int, ...]) -> None:
    """The IDAT stream inflates to exactly the scanlines IHDR declares, each led by a filter type (0-4)."""
    width, height, depth, colour, _, _, interlace = header
    bits = depth * PNG_CHANNELS[colour]
    passes = ADAM7 if interlace else ((0, 0, 1, 1),)
    rows: list[tuple[int, int]] = []  # (bytes a scanline, scanlines) per pass
    for x0, y0, dx, dy in passes:
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            rows.append((1 + (w * bits + 7) // 8, h))
    expected = sum(n * count for n, count in rows)
    if expected > MAX_RAW_BYTES:
        raise NotAnImage("it declares more pixels than this opens")
    z = zlib.decompressobj()
    pending = stream
    line_starts = _line_starts(rows)
    next_start = next(line_starts, None)
    done = 0
    while True:
        chunk = z.decompress(pending, 1 << 20)
        pending = z.unconsumed_tail
        while next_start is not None and next_start < done + len(chunk):
            if chunk[next_start - done] > 4:
                raise NotAnImage("a scanline has a filter type PNG does not have")
            next_start = next(line_starts, None)
        done += len(chunk)
        if done > expected:
            raise NotAnImage("the image data is longer than IHDR declares")
        if not pending and (z.eof or not chunk):
            break
    if done != expected or not z.eof or z.unused_data:
        raise NotAnImage("the image data does not match what IHDR declares")


def _line_starts(rows: list[tuple[int, int]]) -> Iterator[int]:
    """Where each scanline (its filter byte) starts in the inflated stream."""
    pos = 0
    for n, count in rows:
        for _ in range(count):
            yield pos
            pos += n


def jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Every marker segment of the JPEG ``data`` with a length, as (marker, body), up to EOI, entropy-coded data
    skipped; and where EOI ends. Only the markers of a baseline, progressive, lossless or arithmetic-coded
    image are accepted. Raises :class:`NotAnImage`."""
    if not data.startswith(b"\xff\xd8"):
        raise NotAnImage("no JPEG start of image")
    pos = 2
    segments: list[tuple[int, bytes]] = []
    while True:
        if data[pos] != 0xFF:
            raise NotAnImage("a byte stands where a JPEG marker belongs")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return segments, pos + 2
        if not (0xE0 <= marker <= 0xEF or marker in (0xFE, 0xDA) or marker in JPEG_SEGMENTS):
            raise NotAnImage("it has a marker JPEG images do not have here")
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2 or pos + 2 + length > len(data):
            raise NotAnImage("a segment breaks off")
        segments.append((marker, data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
        if marker == 0xDA:  # entropy-coded data runs to the next marker other than RSTn (decoded by Pillow)
            while not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1


def is_jpeg_metadata(marker: int) -> bool:
    """APPn and COM: the segments that carry something other than how to decode the pixels."""
    return 0xE0 <= marker <= 0xEF or marker == 0xFE


def _jpeg(data: bytes) -> list[bytes]:
    segments, end = jpeg_segments(data)
    if end != len(data):
        raise NotAnImage("there are bytes after the end of the image")
    frame = any(0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC) for m, _ in segments)
    if not (frame and any(m == 0xDA for m, _ in segments)):
        raise NotAnImage("it has no frame or no scan")
    return [body for marker, body in segments if is_jpeg_metadata(marker)]


GIF_IMAGE = 0x2C
"""The image descriptor's introducer; :func:`gif_blocks` lists each image under it (with no payload)."""
GIF_GRAPHIC_CONTROL = 0xF9
"""The one extension that says only how a frame is drawn (delay, disposal, transparent index)."""


def _gif_sub_blocks(data: bytes, pos: int) -> tuple[int, bytes]:
    """The payload of the data sub-blocks from ``pos``, and the position after their terminator."""
    parts = []
    while (size := data[pos]) != 0:
        if pos + 1 + size >= len(data):
            raise NotAnImage("a block breaks off")
        parts.append(data[pos + 1 : pos + 1 + size])
        pos += 1 + size
    return pos + 1, b"".join(parts)


def gif_blocks(data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """Every block of the GIF ``data`` up to its trailer: each extension as (label, payload), each image as
    (:data:`GIF_IMAGE`, b""); and where the trailer ends. Raises :class:`NotAnImage`."""
    if data[:6] not in (b"GIF87a", b"GIF89a"):
        raise NotAnImage("no GIF header")
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    blocks: list[tuple[int, bytes]] = []
    frames = 0
    while True:
        introducer = data[pos]
        if introducer == 0x3B:
            return blocks, pos + 1
        if introducer == 0x21:
            label = data[pos + 1]
            pos, payload = _gif_sub_blocks(data, pos + 2)
            blocks.append((label, payload))
        elif introducer == GIF_IMAGE:
            flags = data[pos + 9]
            pos += 10 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
            if not 2 <= data[pos] <= 12:
                raise NotAnImage("an image's LZW code size is not one GIF has")
            pos, _ = _gif_sub_blocks(data, pos + 1)
            blocks.append((GIF_IMAGE, b""))
            frames += 1
            if frames > MAX_FRAMES:
                raise NotAnImage("it has more frames than this opens")
        else:
            raise NotAnImage("a block GIF does not have")


def _gif(data: bytes) -> list[bytes]:
    blocks, end = gif_blocks(data)
    if end != len(data):
        raise NotAnImage("there are bytes after the trailer")
    if not any(label == GIF_IMAGE for label, _ in blocks):
        raise NotAnImage("it has no image")
    # comment, plain text, application and any other extension: read as text
    return [payload for label, payload in blocks if label not in (GIF_IMAGE, GIF_GRAPHIC_CONTROL)]


def _decodes(data: bytes, fmt: str) -> None:
    """Every frame of ``data`` decodes as ``fmt`` (the pixels count is checked before any is decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=(fmt,)) as im:
            width, height = im.size
            frames = int(getattr(im, "n_frames", 1))
            if width * height * 4 * frames > MAX_RAW_BYTES:
                raise NotAnImage("it declares more pixels than this opens")
            for n in range(frames):
                im.seek(n)
                im.load()
    except NotAnImage:
        raise
    except Exception as e:
        raise NotAnImage(f"it does not decode as {fmt} ({type(e).__name__})") from None
