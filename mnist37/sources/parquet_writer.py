"""Writing Hugging Face Parquet (the converter's `--to parquet`): what mnist37.sources.parquet reads.

`data/<split>-NNNNN-of-NNNNN.parquet`, an `image` column (struct of `bytes`, `path`) and an
int64 `label`, the class names as the label's ClassLabel `names` in the `huggingface` schema
metadata, as `datasets` writes them; row groups of ROW_GROUP_ROWS rows.
"""

from __future__ import annotations

import json

import pyarrow as pa

ROW_GROUP_ROWS = 1024  # rows per row group the converter writes


def output_name(split: str, index: int, total: int) -> str:
    """The converter's name for a split's index-th of `total` files (Hugging Face's layout)."""
    return f"data/{split}-{index:05d}-of-{total:05d}.parquet"


class ShardWriter:
    """One Parquet file of encoded images and labels, written a row group at a time."""

    def __init__(self, path, out, classes: list[str], shape: tuple[int, int], index: int):
        import pyarrow.parquet as pq

        features = {"image": {"_type": "Image"}, "label": {"names": list(classes), "_type": "ClassLabel"}}
        self.schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                                 ("label", pa.int64())],
                                metadata={"huggingface": json.dumps({"info": {"features": features}})})
        self.writer, self.batch, self.rows = pq.ParquetWriter(path, self.schema), [], 0

    def add(self, path: str, class_index: int, data: bytes) -> None:
        self.batch.append((path, class_index, data))
        self.rows += 1
        if len(self.batch) == ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        batch = self.batch
        self.writer.write_table(pa.table({
            "image": pa.StructArray.from_arrays([pa.array([b for _, _, b in batch], pa.binary()),
                                                 pa.array([p for p, _, _ in batch], pa.string())],
                                                names=["bytes", "path"]),
            "label": pa.array([c for _, c, _ in batch], pa.int64())}, schema=self.schema),
            row_group_size=ROW_GROUP_ROWS)
        self.batch = []

    def close(self) -> None:
        if self.batch or not self.rows:
            self._flush()
        self.writer.close()


def check_classes(classes: list[str]) -> str | None:
    """Any class names will do: they are stored as ClassLabel names."""
    return None


def finish(dest, written, classes: list[str], splits, shape) -> None:
    """Nothing: every file holds its class names."""
