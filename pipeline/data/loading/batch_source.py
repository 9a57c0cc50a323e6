"""The callback that DALI's parallel external source runs in its worker processes.

Batch i of the stream -> (encoded images, labels, sample rows, status per sample). It keeps no state between calls:
everything follows from i through the sample order, so any worker can produce any batch, in any order, as DALI
requires. Problems with the data never raise here: an image that is not a whole JPEG/PNG (or that the loader found
undecodable after a decoder failure) is replaced by a small grey placeholder, a label that is not an integer the
split allows becomes -1, and both are flagged in `status`; the loader, which knows the shard and key of every row,
counts, logs, or stops (strict).
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.worker_lifetime import die_with_parent

from ..image_bytes import MAX_PIXELS, CorruptImage, check_png, encode_pixels, jpeg_components, sniff
from ..shard_format import UNLABELED, parse_label
from .sample_order import SampleOrder

OK, CORRUPT_IMAGE, BAD_LABEL = 0, 1, 2
STATUS_TEXT = {CORRUPT_IMAGE: "corrupt image", BAD_LABEL: "bad label"}
PLACEHOLDER = np.frombuffer(encode_pixels(np.full((8, 8, 3), 128, np.uint8), "png"), np.uint8)


def check_image(data: bytes, max_pixels: int) -> None:
    """Cheap structural check (no decode): a JPEG with its headers and end marker, or a PNG ending in IEND, whose
    header claims at most `max_pixels`."""
    kind = sniff(data)
    if kind == "jpg":
        jpeg_components(data, max_pixels)
    elif kind == "png":
        check_png(data, max_pixels)
    else:
        raise CorruptImage("neither JPEG nor PNG")


class BatchSource:
    def __init__(self, order: SampleOrder, start_epoch: int, start_position: int, reader, index_columns: dict,
                 num_classes: int, undecodable: frozenset[int] = frozenset(), max_pixels: int = MAX_PIXELS):
        self.order, self.start_epoch, self.start_position = order, start_epoch, start_position
        self.reader, self.num_classes, self.undecodable = reader, num_classes, undecodable
        self.max_pixels = max_pixels
        # plain numpy columns of the ShardIndex (not the index itself: workers need no keys, fs or manifest)
        self.columns = index_columns
        self.parent_pid, self.bound_to_parent = os.getpid(), False  # built in the loader's process

    def __call__(self, info):
        if not self.bound_to_parent:  # the first call in this worker process
            die_with_parent(self.parent_pid)
            self.bound_to_parent = True
        epoch, position = self.order.locate(self.start_epoch, self.start_position, info.iteration)
        rows, _ = self.order.batch(epoch, position)
        c = self.columns
        spans = self.reader.read(c["shard"][rows], c["span_start"][rows], c["span_end"][rows])
        images, labels = [], np.empty(len(rows), np.int32)
        status = np.zeros(len(rows), np.int32)
        for i, (row, span) in enumerate(zip(rows, spans)):
            image = span[c["image_offset"][row] : c["image_offset"][row] + c["image_size"][row]]
            label = span[c["label_offset"][row] : c["label_offset"][row] + c["label_size"][row]]
            try:
                if row in self.undecodable:
                    raise CorruptImage("the decoder failed on it before")
                check_image(image, self.max_pixels)
            except CorruptImage:
                status[i], image = CORRUPT_IMAGE, PLACEHOLDER
            try:
                labels[i] = parse_label(label, self.num_classes)
            except ValueError:  # UnicodeDecodeError is one
                status[i], labels[i] = status[i] or BAD_LABEL, UNLABELED
            images.append(np.frombuffer(image, np.uint8) if isinstance(image, bytes) else image)
        return images, labels, rows.astype(np.int64), status
