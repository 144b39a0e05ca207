"""Image-text (or image-label) tables: CSV, TSV or JSON Lines, image paths relative to the file.

Everything is checked when the table is read, before any training: the columns, every
image (exists and opens as an image), every caption (not empty). A bad row is an error that
names the file and line, or, with ``on_bad_sample="skip"``, is skipped and counted.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from PIL import Image

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


@dataclass
class Table:
    """The usable rows of a table: image path, text (caption or label) and source line."""

    path: Path
    images: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one reason per skipped row
    negatives: Optional[list[list[str]]] = None  # per row, when a negatives column is read

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Split:
    """The rows of a table that a split file assigns to one split: ``file`` is a JSON object
    ``{split name: [ids]}`` (other keys, such as a seed or counts, are ignored), relative to the
    table's folder unless absolute; ``key`` is the table column whose values the file lists."""

    file: str
    name: str
    key: str

    def path(self, table: str | Path) -> Path:
        file = Path(self.file)
        return file if file.is_absolute() else Path(table).parent / file

    def ids(self, table: str | Path) -> set[str]:
        """The ids of this split; a DataError names the file and the splits it holds."""
        splits = read_split_file(self.path(table))
        if self.name not in splits:
            raise DataError(f"{self.path(table)}: no split '{self.name}' (splits: {', '.join(splits) or 'none'})")
        return splits[self.name]


def read_split_file(path: Path) -> dict[str, set[str]]:
    """The splits of a split file: every key whose value is a list of ids."""
    if not path.is_file():
        raise DataError(f"split file '{path}' not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a JSON split file ({err})") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: a split file is a JSON object {{split name: [ids]}}")
    return {str(k): {str(i) for i in v} for k, v in data.items() if isinstance(v, list)}


def concat_tables(tables: list[Table]) -> Table:
    """Several tables as one (training on several data sets): rows in order, the first's path."""
    if len(tables) == 1:
        return tables[0]
    out = Table(path=tables[0].path, negatives=[] if all(t.negatives is not None for t in tables) else None)
    for table in tables:
        out.images += table.images
        out.texts += table.texts
        out.lines += table.lines
        out.skipped += table.skipped
        if out.negatives is not None and table.negatives is not None:
            out.negatives += table.negatives
    return out


def _separator(path: Path, separator: Optional[str]) -> str:
    if separator is not None:
        return "\t" if separator in ("\\t", "tab") else separator
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _rows(path: Path, separator: Optional[str]) -> Iterator[tuple[int, dict[str, Any], list[str]]]:
    """Yield (line number, row, column names) for CSV/TSV (header line 1) or JSONL."""
    if path.suffix.lower() in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {line_no}: not valid JSON ({err.msg})") from err
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {line_no}: each line must be a JSON object")
                yield line_no, row, []  # JSON rows carry their own keys: checked per row
        return
    # utf-8-sig: spreadsheet programs put a byte-order mark before the first column name
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=_separator(path, separator))
        columns = list(reader.fieldnames or [])
        for row in reader:
            yield reader.line_num, row, columns


def read_table(
    path: str | Path,
    image_key: str,
    text_key: str,
    separator: Optional[str] = None,
    on_bad_sample: str = "error",
    check_images: bool = True,
    what: str = "caption",
    negatives_key: Optional[str] = None,
    split: Optional[Split] = None,
) -> Table:
    """Read and check a table of image paths and texts.

    Args:
        path: .csv, .tsv or .jsonl file; image paths in it are relative to its folder.
        image_key, text_key: column names of the image path and the caption (or label).
        on_bad_sample: ``"error"`` stops at the first bad row; ``"skip"`` drops and counts it.
        check_images: open every image header (fast, no decoding) to catch unreadable files.
        what: the name of the text column's meaning in messages ("caption", "label").
        negatives_key: a column of negative captions per row — a list (JSON Lines), or a JSON
            or Python list literal in a CSV/TSV cell, as NegCLIP's ``neg_caption`` column.
        split: keep only the rows of this split (the others are not read, and not counted as bad).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file '{path}' not found")
    table = Table(path=path, negatives=[] if negatives_key else None)
    root = path.parent
    rows = _rows(path, separator)
    if split is not None:
        rows = _in_split(rows, path, split)
    if check_images:
        rows = _progress(rows, path)
    try:
        _collect(rows, table, image_key, text_key, root, check_images, what, on_bad_sample, negatives_key)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the file as UTF-8") from err
    if not table.images and not table.skipped:
        raise DataError(f"{path}: the file has no rows")
    if not table.images:
        raise DataError(f"{path}: no usable rows ({len(table.skipped)} skipped; first: {table.skipped[0]})")
    if table.skipped:
        log.warning("%s: skipped %d bad rows (first: %s)", path, len(table.skipped), table.skipped[0])
    return table


def _in_split(rows: Iterator[tuple[int, dict[str, Any], list[str]]], path: Path,
              split: Split) -> Iterator[tuple[int, dict[str, Any], list[str]]]:
    ids = split.ids(path)
    seen = 0
    for line_no, row, columns in rows:
        if columns and split.key not in columns:
            raise DataError(f"{path}: no column '{split.key}', whose values {split.path(path).name} lists "
                            f"(columns: {', '.join(map(str, columns))}); set the split key to the right column")
        if str(row.get(split.key, "")).strip() in ids:
            seen += 1
            yield line_no, row, columns
    if seen == 0:
        raise DataError(f"{path}: no row's '{split.key}' is among the {len(ids)} ids of split '{split.name}' "
                        f"in {split.path(path)}")


def _collect(
    rows: Iterator[tuple[int, dict[str, Any], list[str]]], table: Table, image_key: str, text_key: str, root: Path,
    check_images: bool, what: str, on_bad_sample: str, negatives_key: Optional[str] = None,
) -> None:
    path = table.path
    first = True
    required = [(image_key, "image path"), (text_key, what)] + ([(negatives_key, "negatives")] if negatives_key else [])
    for line_no, row, columns in rows:
        if first and columns:
            for key, role in required:
                if key not in columns:
                    raise DataError(
                        f"{path}: missing {role} column '{key}' (columns: {', '.join(map(str, columns)) or 'none'}); "
                        f"set data.image_key / data.caption_key (or the eval task's keys) to the right names"
                    )
            first = False
        problem = _check_row(row, image_key, text_key, root, check_images, what)
        negatives: list[str] = []
        if problem is None and negatives_key:
            negatives, problem = _negative_list(row.get(negatives_key), negatives_key)
        if problem is not None:
            message = f"{path}, line {line_no}: {problem}"
            if on_bad_sample != "skip":
                raise DataError(message + " (set data.on_bad_sample=skip to skip such rows)")
            table.skipped.append(message)
            continue
        table.images.append(root / str(row[image_key]).strip())
        table.texts.append(str(row[text_key]).strip())
        table.lines.append(line_no)
        if table.negatives is not None:
            table.negatives.append(negatives)


def _negative_list(cell: Any, key: str) -> tuple[list[str], Optional[str]]:
    """A cell of negative captions as a list of strings, or the problem with it."""
    import ast

    value = cell
    if isinstance(cell, str):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(cell)
            except (ValueError, SyntaxError):
                return [], f"'{key}' is not a list of captions (a JSON or Python list such as [\"a red car\"])"
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return [], f"'{key}' is not a list of captions"
    return [v.strip() for v in value if v.strip()], None


def _check_row(
    row: dict[str, Any], image_key: str, text_key: str, root: Path, check_images: bool, what: str
) -> Optional[str]:
    for key in (image_key, text_key):
        if key not in row:
            return f"no '{key}' key"
    image = row.get(image_key)
    text = row.get(text_key)
    if image is None or not str(image).strip():
        return "empty image path"
    if text is None or not str(text).strip():
        return f"empty {what}"
    image_path = root / str(image).strip()
    if not image_path.is_file():
        return f"image '{image_path}' not found"
    if check_images:
        try:
            with Image.open(image_path) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for broken files
            return f"image '{image_path}' cannot be read ({type(err).__name__}: {err})"
    return None


def _progress(rows: Iterator[Any], path: Path) -> Iterator[Any]:
    """A progress bar for long tables (checking images takes a while on big data sets)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with lightning
        return rows
    return iter(tqdm(rows, desc=f"checking {path.name}", unit=" rows", mininterval=2.0, leave=False, delay=3.0))


def load_rgb(path: Path) -> Image.Image:
    """Open an image as RGB; the error names the file (a file can break after the check)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise DataError(f"image '{path}' cannot be read ({type(err).__name__}: {err})") from err


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def read_image_folder(path: str | Path) -> Table:
    """An image-classification folder: ``path/<class name>/**/<image>``. The texts of the
    returned table are the class names (folder names)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder '{path}' not found")
    table = Table(path=path)
    classes = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{path}: no class sub-folders (expected {path}/<class name>/<images>)")
    for folder in classes:
        for image in sorted(folder.rglob("*")):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                table.images.append(image)
                table.texts.append(folder.name)
                table.lines.append(len(table.images))
    if not table.images:
        raise DataError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders")
    return table
