"""Cheap structural checks and conversions on encoded image bytes.

Conversion copies JPEG and PNG files byte for byte, so it must know what a file really is (a few ImageNet ".JPEG"
files are PNGs, a few are CMYK JPEGs) and whether it is whole, without paying for a full decode of every image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# An image whose header claims more pixels is refused without decoding (a decompression bomb: an 800-byte JPEG
# can claim 20000 x 20000 and make a decoder allocate gigabytes). PIL's own default limit.
MAX_PIXELS = 178_956_970
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); not DHT (C4), JPG (C8) or DAC (CC).
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class CorruptImage(ValueError):
    """The bytes are not a complete image of a format we can store."""


def sniff(data: bytes) -> str | None:
    """The real container format from the magic bytes: 'jpg', 'png', or None for anything else."""
    if data.startswith(JPEG_MAGIC):
        return "jpg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def jpeg_frame(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int, int]:
    """(colour components (1 grey, 3 YCbCr, 4 CMYK/YCCK), height, width) of a JPEG, read from its SOF header; checks
    it is not truncated and that its frame is within `max_pixels`."""
    pos = 2
    n = len(data)
    components = height = width = None
    while pos + 4 <= n:  # runs once per segment of every image converted: plain indexing, no slices
        if data[pos] != 0xFF:
            raise CorruptImage(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 10 > n:
                break
            components = data[pos + 9]
            height, width = data[pos + 5] << 8 | data[pos + 6], data[pos + 7] << 8 | data[pos + 8]
            check_pixels(width, height, max_pixels)
        if marker == 0xDA:  # start of scan: entropy-coded data follows, ended by EOI
            if components is None:
                raise CorruptImage("JPEG has no frame header before its scan")
            if data.rfind(b"\xff\xd9", pos) < 0:
                raise CorruptImage("JPEG is truncated (no end-of-image marker)")
            return components, height, width
        pos += 2 + length
    raise CorruptImage("JPEG is truncated in its headers")


def png_frame(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width) of a PNG, from its IHDR (bytes 16-24); checks that it is whole (its IEND chunk is present at the
    end) and within `max_pixels`."""
    if b"IEND" not in data[-16:]:
        raise CorruptImage("PNG is truncated (no IEND chunk)")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    check_pixels(width, height, max_pixels)
    return height, width


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise CorruptImage(f"header claims {width}x{height} pixels, over the limit of {max_pixels} "
                           "(a decompression bomb?)")


def encode_pixels(pixels: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """Encodes an HxWx3 (or HxW) uint8 array as PNG (lossless) or JPEG at the given quality."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"pixels must be uint8, got {pixels.dtype}")
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}; use 'png' or 'jpg'")
    return buf.getvalue()


def decode_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Fully decodes any image PIL reads into an HxWx3 uint8 array (CMYK and palettes converted to RGB), unless it
    claims more than `max_pixels`."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixels(*image.size, max_pixels)
            image.load()
            return np.asarray(image.convert("RGB"))
    except CorruptImage:
        raise
    except Exception as err:  # PIL raises many types for broken files
        raise CorruptImage(f"cannot decode image: {err}") from err


def normalise_encoded(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[str, bytes, str | None]:
    """Turns a source file's bytes into what a shard stores: (ext, bytes, note).

    JPEG and PNG are kept byte for byte (the extension follows the real format, not the file name). A CMYK/YCCK JPEG
    and any other format (WebP, BMP, GIF, TIFF...) are decoded and stored as lossless RGB PNG, so every sample is one
    DALI decodes; `note` says so for the report.
    """
    kind = sniff(data)
    if kind == "jpg":
        if jpeg_frame(data, max_pixels)[0] == 4:
            return "png", encode_pixels(decode_rgb(data, max_pixels), "png"), "CMYK JPEG converted to RGB PNG"
        return "jpg", data, None
    if kind == "png":
        png_frame(data, max_pixels)
        return "png", data, None
    return "png", encode_pixels(decode_rgb(data, max_pixels), "png"), "non-JPEG/PNG image converted to PNG"
