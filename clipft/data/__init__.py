"""Data sources (synthetic scenes, CSV/TSV/JSONL tables) and the Lightning data module."""

from clipft.data.batch import Batch
from clipft.data.datamodule import ImageTextDataModule, TransformedImages
from clipft.data.table import DataError, Table, read_table

__all__ = ["Batch", "DataError", "ImageTextDataModule", "Table", "TransformedImages", "read_table"]
