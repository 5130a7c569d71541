"""Reader and writer of the challenge layout ``ROOT/<Task>/{images/, json/<split>.json}``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..files import write_text_atomic
from .images import DEFAULT_MAX_PIXELS, ImageProblem, open_image, resolve_image_path
from .records import TASK_DIRS, DatasetError, Problem, Record, Task, check_record, parse_record, record_key

SPLITS = ("train", "val", "test")


def task_dir(root: str | os.PathLike, task: Task) -> Path:
    if task not in TASK_DIRS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_DIRS)}")
    return Path(root) / TASK_DIRS[task]


def split_file(root: str | os.PathLike, task: Task, split: str) -> Path:
    return task_dir(root, task) / "json" / f"{split}.json"


def images_dir(root: str | os.PathLike, task: Task) -> Path:
    return task_dir(root, task) / "images"


@dataclass
class Split:
    """The records of one split, with where they came from and what was skipped."""

    root: Path
    task: Task
    name: str
    records: list[Record]
    skipped: list[Problem] = field(default_factory=list)

    @property
    def images_dir(self) -> Path:
        return images_dir(self.root, self.task)

    def image_path(self, record: Record) -> Path:
        return resolve_image_path(self.images_dir, record.image_id)

    def load_image(self, record: Record, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        return open_image(self.image_path(record), max_pixels=max_pixels)

    def __len__(self) -> int:
        return len(self.records)


def load_raw(path: Path) -> tuple[list, list[Problem]]:
    """The raw JSON list of a split file, or the problem that prevents reading it."""
    if not path.exists():
        return [], [Problem(str(path), "-", "-", "file not found")]
    if not path.is_file():
        return [], [Problem(str(path), "-", "-", "is a directory (or another non-file), not a JSON file")]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        return [], [Problem(str(path), "-", "-", f"not UTF-8 text: {e}")]
    except json.JSONDecodeError as e:
        return [], [Problem(str(path), "-", "-", f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}")]
    except RecursionError:
        return [], [Problem(str(path), "-", "-", "JSON nested too deeply to read (records are flat objects)")]
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        return [], [Problem(str(path), "-", "-", f"JSON that cannot be read: {e}")]
    except OSError as e:
        return [], [Problem(str(path), "-", "-", f"cannot be read: {e.strerror or e}")]
    if not isinstance(data, list):
        return [], [Problem(str(path), "-", "-", f"must hold a JSON list of records, got {type(data).__name__}")]
    return data, []


#: files that decoded cleanly, by (path, size, mtime, pixel limit): a split read again in the same process
#: (every stage of a recipe, every evaluation) is not decoded again unless a file changed
_DECODED_OK: set[tuple[str, int, int, int]] = set()


def check_image(images: Path, image_id: str, *, file: str, key: str, max_pixels: int) -> list[Problem]:
    try:
        path = resolve_image_path(images, image_id)
        try:
            st = path.stat()
            stamp = (str(path), st.st_size, st.st_mtime_ns, max_pixels)
        except OSError:
            stamp = None
        if stamp is not None and stamp in _DECODED_OK:
            return []
        open_image(path, max_pixels=max_pixels)
        if stamp is not None:
            _DECODED_OK.add(stamp)
    except ImageProblem as e:
        return [Problem(file, key, "image_id", str(e))]
    except (OSError, ValueError) as e:  # a name the file system refuses (too long, ...)
        return [Problem(file, key, "image_id", f"{image_id!r} cannot be opened: {e}")]
    return []


def check_images_dir(root: str | os.PathLike, task: Task) -> list[Problem]:
    """The images folder must lie inside the dataset root (itself a symlink out of it is refused, as an
    image id that leads out is)."""
    folder = images_dir(root, task)
    base, target = Path(root).resolve(), folder.resolve()
    if folder.is_symlink() and base not in target.parents:
        return [
            Problem(
                str(folder),
                "-",
                "-",
                f"is a symlink to {target}, outside the dataset root {base}; "
                "copy the images in, or point the root at where they are",
            )
        ]
    return []


def check_split(
    root: str | os.PathLike,
    task: Task,
    split: str,
    *,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list, dict[int, list[Problem]], list[Problem]]:
    """Raw records, the problems of each record (by index), and problems of the file itself."""
    path = split_file(root, task, split)
    raw, file_problems = load_raw(path)
    per_record: dict[int, list[Problem]] = {}
    images = images_dir(root, task)
    if check_images:
        file_problems += check_images_dir(root, task)
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        key = record_key(item, i)
        try:
            problems = check_record(item, task, file=str(path), index=i)
            image_id = item.get("image_id") if isinstance(item, dict) else None
            if isinstance(image_id, str) and image_id.strip():
                if not any(p.field == "image_id" for p in problems) and check_images and not file_problems:
                    problems += check_image(images, image_id, file=str(path), key=key, max_pixels=max_pixels)
                if image_id in seen:
                    # the challenge keys records by image_id; a repeat is flagged, as scorers would conflate them
                    problems.append(Problem(str(path), key, "image_id", f"duplicate of record #{seen[image_id]}"))
                seen.setdefault(image_id, i)
        except Exception as e:  # one record that breaks a check is one problem line, never the end of the report
            problems = [Problem(str(path), key, "-", f"could not be checked ({type(e).__name__}: {e})")]
        if problems:
            per_record[i] = problems
    return raw, per_record, file_problems


def read_split(
    root: str | os.PathLike,
    task: Task,
    split: str,
    *,
    skip_invalid: bool = False,
    check_images: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Split:
    """Read and validate one split. Invalid records raise :class:`DatasetError` naming each one,
    unless ``skip_invalid``: then they are left out and listed in ``Split.skipped``."""
    raw, per_record, file_problems = check_split(root, task, split, check_images=check_images, max_pixels=max_pixels)
    if file_problems:
        raise DatasetError(file_problems)
    if per_record and not skip_invalid:
        raise DatasetError([p for ps in per_record.values() for p in ps])
    records = [parse_record(item, task) for i, item in enumerate(raw) if i not in per_record]
    skipped = [p for ps in per_record.values() for p in ps]
    return Split(Path(root), task, split, records, skipped)


def write_split(root: str | os.PathLike, task: Task, split: str, records: Iterable[Record]) -> Path:
    """Write records as ``json/<split>.json`` (atomically: write, then rename)."""
    images_dir(root, task).mkdir(parents=True, exist_ok=True)
    text = json.dumps([r.to_dict() for r in records], indent=1, ensure_ascii=False)
    return write_text_atomic(split_file(root, task, split), text)


def available_splits(root: str | os.PathLike, task: Task) -> list[str]:
    folder = task_dir(root, task) / "json"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def validate_dataset(
    root: str | os.PathLike,
    *,
    tasks: Iterable[Task] | None = None,
    splits: Iterable[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[Problem], dict[str, int]]:
    """Every problem under a dataset root, and the number of records checked per ``task/split``."""
    root = Path(root)
    problems: list[Problem] = []
    counts: dict[str, int] = {}
    present = [t for t in (tasks or TASK_DIRS) if task_dir(root, t).is_dir()]
    if not present:
        expected = " or ".join(f"{root}/{d}" for d in TASK_DIRS.values())
        return [Problem(str(root), "-", "-", f"no task folder found; expected {expected}")], counts
    for task in present:
        names = list(splits) if splits else available_splits(root, task)
        if not names:
            problems.append(Problem(str(task_dir(root, task) / "json"), "-", "-", "no <split>.json files found"))
        for split in names:
            raw, per_record, file_problems = check_split(root, task, split, max_pixels=max_pixels)
            path = str(split_file(root, task, split))
            if not raw and not any(p.file == path for p in file_problems):
                file_problems.append(Problem(path, "-", "-", "holds no records (an empty list)"))
            problems += [p for p in file_problems if p not in problems]  # the images folder's, once per task
            problems += [p for ps in per_record.values() for p in ps]
            counts[f"{task}/{split}"] = len(raw)
    return problems, counts
