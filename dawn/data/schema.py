"""The preprocessed shard schema (docs/data_schema.md) in one place: column names, dtypes, shapes, and the
encode/decode helpers between a segment's numpy arrays and a Parquet row.

A row is one segment of one video (T consecutive 25 fps frames at resolution S). Array columns are stored as
raw little-endian bytes in `large_binary` columns; their shapes follow from `num_frames` (T) and
`resolution` (S), so no shape metadata travels with them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from dawn.config import BLINK_DIM as EYE_DIM
from dawn.config import POSE_DIM, SAMPLES_PER_FRAME

HUBERT_DIM = 1024
BOX_DIM = 6  # x_min, x_max, y_min, y_max, H, W

# Scalar columns: name -> arrow type.
SCALAR_COLUMNS = {
    "video_id": pa.string(),
    "identity": pa.string(),
    "split": pa.string(),
    "source_path": pa.string(),
    "segment": pa.int32(),
    "start_frame": pa.int32(),
    "num_frames": pa.int32(),
    "resolution": pa.int32(),
}

# Array columns: name -> (numpy dtype, shape). In shapes, "T" = num_frames, "S" = resolution and
# "A" = T * SAMPLES_PER_FRAME audio samples.
ARRAY_COLUMNS = {
    "frames": (np.uint8, ("T", "S", "S", 3)),  # RGB face crop
    "audio": (np.float32, ("A",)),  # 16 kHz mono
    "hubert": (np.float16, ("T", HUBERT_DIM)),  # HuBERT features at 25 fps
    "pose": (np.float32, ("T", POSE_DIM)),
    "eyes": (np.float32, ("T", EYE_DIM)),
    "mouth": (np.float32, ("T",)),  # inner-lip gap / mouth width
    "face_box": (np.float32, ("T", BOX_DIM)),  # in crop pixels
    "lip_box": (np.float32, ("T", BOX_DIM)),
    "eye_box": (np.float32, ("T", BOX_DIM)),  # both eyes, a band tall enough for open lids (dawn.face)
    "found": (np.uint8, ("T",)),  # 1 where a face was detected, else interpolated
}

COLUMNS = list(SCALAR_COLUMNS) + list(ARRAY_COLUMNS)

SCHEMA = pa.schema([pa.field(name, kind, nullable=False) for name, kind in SCALAR_COLUMNS.items()]
                   + [pa.field(name, pa.large_binary(), nullable=False) for name in ARRAY_COLUMNS])


def array_shape(name: str, num_frames: int, resolution: int) -> tuple[int, ...]:
    """Shape of array column `name` for a segment of `num_frames` frames at `resolution` pixels."""
    sizes = {"T": num_frames, "S": resolution, "A": num_frames * SAMPLES_PER_FRAME}
    return tuple(sizes.get(dim, dim) for dim in ARRAY_COLUMNS[name][1])


def encode_segment(segment: Mapping) -> dict:
    """Segment dict (scalar columns + numpy arrays of the shapes above, any numeric dtype) -> Parquet row dict.

    Arrays are checked against their declared shape and cast to the column dtype (e.g. HuBERT float32 ->
    float16). Raises ValueError naming the column when a shape or a key is wrong.
    """
    missing = [name for name in COLUMNS if name not in segment]
    if missing:
        raise ValueError(f"segment is missing columns {missing}")
    row = {name: _python_scalar(segment[name]) for name in SCALAR_COLUMNS}
    num_frames, resolution = row["num_frames"], row["resolution"]
    for name, (dtype, _) in ARRAY_COLUMNS.items():
        array = np.asarray(segment[name])
        expected = array_shape(name, num_frames, resolution)
        if array.shape != expected:
            raise ValueError(f"column {name!r}: expected shape {expected}, got {array.shape}")
        row[name] = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    return row


def decode_row(row: Mapping) -> dict:
    """Parquet/Ray Data row -> dict of python scalars and numpy arrays (read-only views of the bytes).

    Works on rows holding only some of the array columns (e.g. read without `frames`).
    """
    decoded = {name: _python_scalar(row[name]) for name in SCALAR_COLUMNS if name in row}
    num_frames, resolution = decoded["num_frames"], decoded["resolution"]
    for name, (dtype, _) in ARRAY_COLUMNS.items():
        if name in row:
            data = np.frombuffer(row[name], dtype=np.dtype(dtype).newbyteorder("<"))
            decoded[name] = data.reshape(array_shape(name, num_frames, resolution))
    return decoded


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Encoded rows -> a pyarrow Table with SCHEMA (ValueError when a row lacks a column)."""
    for row in rows:
        missing = [name for name in COLUMNS if row.get(name) is None]
        if missing:
            raise ValueError(f"row lacks columns {missing}")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _python_scalar(value):
    return value.item() if isinstance(value, np.generic) else value
