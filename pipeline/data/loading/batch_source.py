"""The callback that DALI's parallel external source runs in its worker processes.

Batch i of the stream -> (encoded images, labels, sample rows, status per sample, then one array of random
parameters per random view). It keeps no state between calls: everything follows from i through the sample order,
so any worker can produce any batch, in any order, as DALI requires. A sample's random parameters (augmentations.py)
are drawn for the whole batch from uniforms that depend on (seed, epoch, sample row, view) alone.

Problems with the data never raise here: an image that is not a whole JPEG/PNG (or that the loader found undecodable
after a decoder failure) is replaced by a small grey placeholder, a label that is not an integer the split allows
becomes -1, and both are flagged in `status`; the loader, which knows the shard and key of every row, counts, logs,
or stops (strict).
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.worker_lifetime import die_with_parent

from ..image_bytes import MAX_PIXELS, CorruptImage, encode_pixels, jpeg_frame, png_frame, sniff
from ..shard_format import UNLABELED, parse_label
from .augmentations import ViewSpec, draw_params, uniform_count
from .counter_random import uniforms
from .sample_order import SampleOrder

OK, CORRUPT_IMAGE, BAD_LABEL = 0, 1, 2
STATUS_TEXT = {CORRUPT_IMAGE: "corrupt image", BAD_LABEL: "bad label"}
PLACEHOLDER_SIDE = 8
PLACEHOLDER = np.frombuffer(encode_pixels(np.full((PLACEHOLDER_SIDE,) * 2 + (3,), 128, np.uint8), "png"), np.uint8)
AUGMENTATION_STREAM = 0xA06  # keeps the augmentation generators apart from the sample order's


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Cheap structural check (no decode): a JPEG with its headers and end marker, or a PNG ending in IEND, whose
    header claims at most `max_pixels`; returns its (height, width)."""
    kind = sniff(data)
    if kind == "jpg":
        return jpeg_frame(data, max_pixels)[1:]
    if kind == "png":
        return png_frame(data, max_pixels)
    raise CorruptImage("neither JPEG nor PNG")


class BatchSource:
    def __init__(self, order: SampleOrder, start_epoch: int, start_position: int, reader, index_columns: dict,
                 num_classes: int, random_views: list[ViewSpec], undecodable: frozenset[int] = frozenset(),
                 max_pixels: int = MAX_PIXELS):
        self.order, self.start_epoch, self.start_position = order, start_epoch, start_position
        self.reader, self.num_classes, self.undecodable = reader, num_classes, undecodable
        self.random_views, self.max_pixels = random_views, max_pixels
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
        sizes = np.empty((len(rows), 2), np.int64)  # (height, width) from each image's header
        for i, (row, span) in enumerate(zip(rows, spans)):
            image = span[c["image_offset"][row] : c["image_offset"][row] + c["image_size"][row]]
            label = span[c["label_offset"][row] : c["label_offset"][row] + c["label_size"][row]]
            try:
                if row in self.undecodable:
                    raise CorruptImage("the decoder failed on it before")
                sizes[i] = check_image(image, self.max_pixels)
            except CorruptImage:
                status[i], image, sizes[i] = CORRUPT_IMAGE, PLACEHOLDER, PLACEHOLDER_SIDE
            try:
                labels[i] = parse_label(label, self.num_classes)
            except ValueError:  # UnicodeDecodeError is one
                status[i], labels[i] = status[i] or BAD_LABEL, UNLABELED
            images.append(np.frombuffer(image, np.uint8) if isinstance(image, bytes) else image)
        params = [draw_params(spec, uniforms((self.order.seed, epoch, AUGMENTATION_STREAM, view), rows,
                                             uniform_count(spec)), sizes[:, 0], sizes[:, 1])
                  for view, spec in enumerate(self.random_views)]
        return images, labels, rows.astype(np.int64), status, *params
