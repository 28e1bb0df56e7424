"""Interaction data as dense numpy arrays: MovieLens-100k (RecBole's copy or the original files).

Why dense arrays: training, evaluation and the Kafka replay all want contiguous int64
indices and time-sorted interactions, so every loader parses once into one `Dataset`
(loading ml-100k takes about 0.2 s; 0.3-0.5 s on a busy 2-core VM).

MovieLens' licence forbids redistribution, so the data is never committed:
`fetch_ml100k` pulls the recbole==1.2.1 wheel through pip at run time and keeps only
the three atomic files of its example dataset.

Why one module of this size: one loader per source format (RecBole's atomic files,
the original MovieLens files, the wheel fetch) producing the same dense arrays; they
share the id maps and the checks, and splitting them would split those.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np

from engine.codec import Profile

RECBOLE_WHEEL = "recbole==1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
_ML100K_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
KNOWN_DATASETS = ("ml-100k",)

# Used when a MovieLens folder has no u.genre file (the order of u.item's flags).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


class DataError(RuntimeError):
    """Data could not be fetched or parsed; the message says which file/line and why."""


# --------------------------------------------------------------------------- tables


class _IdTable:
    """A table whose rows are addressed by dense index and looked up by external id."""

    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def _lookup(self) -> dict[int, int]:
        return _id_lookup(self.ids)


@dataclass(frozen=True, eq=False)
class Users(_IdTable):
    """User profiles; the position in every field is the dense user index."""

    ids: np.ndarray  # int64 external ids
    age: np.ndarray  # float32 years, NaN if unknown
    gender: list[str]  # "M" / "F" / ""
    occupation: list[str]
    zip_code: list[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        object.__setattr__(self, "age", np.asarray(self.age, dtype=np.float32))
        _same_lengths("Users", ids=self.ids, age=self.age, gender=self.gender,
                      occupation=self.occupation, zip_code=self.zip_code)


@dataclass(frozen=True, eq=False)
class Items(_IdTable):
    """Item metadata; the position in every field is the dense item index."""

    ids: np.ndarray  # int64 external ids
    title: list[str]
    year: np.ndarray  # int32 release year, 0 if unknown
    genres: list[tuple[str, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        object.__setattr__(self, "year", np.asarray(self.year, dtype=np.int32))
        _same_lengths("Items", ids=self.ids, title=self.title, year=self.year, genres=self.genres)


@dataclass(frozen=True, eq=False)
class Dataset:
    """Interactions sorted by (ts, user, item), with the user and item tables they index."""

    name: str
    users: Users
    items: Items
    user: np.ndarray  # int64 dense user index per interaction
    item: np.ndarray  # int64 dense item index per interaction
    rating: np.ndarray  # float32, 1.0 when implicit
    ts: np.ndarray  # float64 unix seconds

    def __post_init__(self) -> None:
        for field, dtype in (("user", np.int64), ("item", np.int64),
                             ("rating", np.float32), ("ts", np.float64)):
            object.__setattr__(self, field, np.asarray(getattr(self, field), dtype=dtype))
        _same_lengths("Dataset", user=self.user, item=self.item, rating=self.rating, ts=self.ts)
        _check_range("user", self.user, len(self.users))
        _check_range("item", self.item, len(self.items))
        if not _is_sorted(self.ts, self.user, self.item):
            raise ValueError("Dataset interactions must be sorted by (ts, user, item)")

    def __len__(self) -> int:
        return len(self.ts)

    def subset(self, mask: np.ndarray) -> Dataset:
        """The interactions where `mask` (bool, one per interaction) is true; same tables."""
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (len(self),):
            raise ValueError(f"mask must be a bool array of shape ({len(self)},), "
                             f"got {mask.dtype} {mask.shape}")
        return replace(self, user=self.user[mask], item=self.item[mask],
                       rating=self.rating[mask], ts=self.ts[mask])

    def split_time(self, quantile: float = 0.8) -> float:
        """The timestamp of the interaction at `quantile`: at most that share falls before it."""
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0, 1), got {quantile}")
        if not len(self):
            raise ValueError(f"{self.name}: no interactions to split")
        return float(self.ts[min(int(quantile * len(self)), len(self) - 1)])

    def time_split(self, quantile: float = 0.8) -> tuple[Dataset, Dataset]:
        """(before, after): interactions with ts < split_time(quantile), and the rest."""
        cut = int(np.searchsorted(self.ts, self.split_time(quantile), side="left"))
        return self._slice(0, cut), self._slice(cut, len(self))

    def user_index(self) -> dict[int, int]:
        """External user id -> dense index (cached; do not mutate)."""
        return self.users._lookup

    def item_index(self) -> dict[int, int]:
        """External item id -> dense index (cached; do not mutate)."""
        return self.items._lookup

    def summary(self) -> str:
        """One line for logs: name, table sizes, interaction count and time range."""
        head = f"{self.name}: {len(self.users)} users, {len(self.items)} items, "
        if not len(self):
            return head + "0 interactions"
        return head + f"{len(self)} interactions, {_iso(self.ts[0])} .. {_iso(self.ts[-1])}"

    def _slice(self, start: int, stop: int) -> Dataset:
        return replace(self, user=self.user[start:stop], item=self.item[start:stop],
                       rating=self.rating[start:stop], ts=self.ts[start:stop])


def _same_lengths(what: str, **fields: Sequence | np.ndarray) -> None:
    lengths = {name: len(value) for name, value in fields.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{what}: fields differ in length: {lengths}")


def _check_range(what: str, index: np.ndarray, size: int) -> None:
    if len(index) and (index.min() < 0 or index.max() >= size):
        raise ValueError(f"{what} index out of range [0, {size}): "
                         f"min {index.min()}, max {index.max()}")


def _is_sorted(ts: np.ndarray, user: np.ndarray, item: np.ndarray) -> bool:
    """Lexicographic (ts, user, item) order, checked pairwise in one vectorised pass."""
    if len(ts) < 2:
        return True
    dt, du, di = np.diff(ts), np.diff(user), np.diff(item)
    tie = dt == 0
    return bool(np.all(dt >= 0) and np.all(du[tie] >= 0) and np.all(di[tie & (du == 0)] >= 0))


def _id_lookup(ids: np.ndarray) -> dict[int, int]:
    return dict(zip(ids.tolist(), range(len(ids)), strict=True))


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- assembly


def build_dataset(name: str, user_ids: np.ndarray, item_ids: np.ndarray, rating: np.ndarray,
                  ts: np.ndarray, users: Users, items: Items) -> Dataset:
    """Dense-index interactions given by external ids, and sort them.

    Every id of the tables or the interactions gets a dense index, in ascending id order;
    an id missing from a table gets unknown fields.
    """
    all_users = np.unique(np.concatenate([users.ids, user_ids]))
    all_items = np.unique(np.concatenate([items.ids, item_ids]))
    user = np.searchsorted(all_users, user_ids)
    item = np.searchsorted(all_items, item_ids)
    order = np.lexsort((item, user, ts))
    return Dataset(name=name, users=_reindex_users(users, all_users),
                   items=_reindex_items(items, all_items), user=user[order], item=item[order],
                   rating=np.asarray(rating, dtype=np.float32)[order],
                   ts=np.asarray(ts, dtype=np.float64)[order])


def _reindex_users(table: Users, ids: np.ndarray) -> Users:
    pos = np.searchsorted(ids, table.ids)
    age = np.full(len(ids), np.nan, dtype=np.float32)
    age[pos] = table.age
    return Users(ids=ids, age=age, gender=_scatter(len(ids), pos, table.gender, ""),
                 occupation=_scatter(len(ids), pos, table.occupation, ""),
                 zip_code=_scatter(len(ids), pos, table.zip_code, ""))


def _reindex_items(table: Items, ids: np.ndarray) -> Items:
    pos = np.searchsorted(ids, table.ids)
    year = np.zeros(len(ids), dtype=np.int32)
    year[pos] = table.year
    return Items(ids=ids, title=_scatter(len(ids), pos, table.title, ""), year=year,
                 genres=_scatter(len(ids), pos, table.genres, ()))


def _scatter(n: int, pos: np.ndarray, values: Sequence, default: object) -> list:
    out = [default] * n
    for p, value in zip(pos.tolist(), values, strict=True):
        out[p] = value
    return out


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Table:
    """A delimited text file split into columns of strings, with line numbers for errors."""

    path: Path
    header: list[str] | None
    columns: list[list[str]]
    lines: list[int]  # 1-based file line number of each row

    def __len__(self) -> int:
        return len(self.lines)


def _read_text(path: Path) -> str:
    """UTF-8 (RecBole's copy) or, failing that, latin-1 (the original MovieLens files)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"missing file: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_table(path: Path, sep: str, *, header: bool, ncols: int | None = None) -> _Table:
    """Split a file into columns; blank lines are skipped, a wrong field count is an error."""
    raw = _read_text(path).replace("\r\n", "\n").split("\n")
    head = None
    first = 1
    if header:
        if not raw[0].strip():
            raise DataError(f"{path}:1: empty header line")
        head, raw, first = raw[0].split(sep), raw[1:], 2
        ncols = len(head)
    numbers = [n for n, line in enumerate(raw, first) if line.strip()]
    lines = [raw[n - first] for n in numbers]
    if ncols is None:
        ncols = lines[0].count(sep) + 1 if lines else 0
    bad = _bad_field_count(lines, sep, ncols)
    if bad is not None:
        got = lines[bad].count(sep) + 1
        raise DataError(f"{path}:{numbers[bad]}: expected {ncols} fields separated by {sep!r}, "
                        f"got {got}: {lines[bad][:120]!r}")
    flat = sep.join(lines).split(sep) if lines else []
    return _Table(path, head, [flat[j::ncols] for j in range(ncols)], numbers)


def _bad_field_count(lines: list[str], sep: str, ncols: int) -> int | None:
    """Index of the first line without ncols fields (separators counted per line in numpy)."""
    if not lines:
        return None
    joined = np.frombuffer("\n".join(lines).encode("utf-8"), dtype=np.uint8)
    newlines = np.flatnonzero(joined == ord("\n"))
    line_of_sep = np.searchsorted(newlines, np.flatnonzero(joined == ord(sep)))
    wrong = np.bincount(line_of_sep, minlength=len(lines)) != ncols - 1
    return int(np.argmax(wrong)) if wrong.any() else None


def _parse(table: _Table, col: int, what: str, dtype: type, convert: Callable) -> np.ndarray:
    """A strictly numeric column; on failure, name the first bad line."""
    values = table.columns[col]
    try:
        return np.array(values, dtype=dtype)
    except (ValueError, OverflowError):
        for number, value in zip(table.lines, values, strict=True):
            try:
                convert(value)
            except (ValueError, OverflowError):
                where = f"{table.path}:{number}"
                raise DataError(f"{where}: {what} is not a number: {value!r}") from None
        raise DataError(f"{table.path}: cannot parse column {what} as {dtype.__name__}") from None


def _ids(table: _Table, col: int, what: str) -> np.ndarray:
    return _parse(table, col, what, np.int64, int)


def _lenient(values: list[str], dtype: type, convert: Callable, default: object) -> np.ndarray:
    """A numeric column where anything unparsable means unknown (e.g. year 'unkonwn')."""
    try:
        return np.array(values, dtype=dtype)
    except (ValueError, OverflowError):
        out = []
        for value in values:
            try:
                out.append(convert(value))
            except (ValueError, OverflowError):
                out.append(default)
        return np.array(out, dtype=dtype)


def _unique_ids(table: _Table, ids: np.ndarray, what: str) -> np.ndarray:
    """A side table lists each id once; a repeat is an error naming its line."""
    if len(np.unique(ids)) != len(ids):
        seen: set[int] = set()
        for number, value in zip(table.lines, ids.tolist(), strict=True):
            if value in seen:
                raise DataError(f"{table.path}:{number}: duplicate {what} {value}")
            seen.add(value)
    return ids


def _gender(values: list[str]) -> list[str]:
    return [g if g in ("M", "F") else "" for g in (v.strip().upper() for v in values)]


def _empty_users() -> Users:
    return Users(ids=np.zeros(0, np.int64), age=np.zeros(0, np.float32), gender=[],
                 occupation=[], zip_code=[])


def _empty_items() -> Items:
    return Items(ids=np.zeros(0, np.int64), title=[], year=np.zeros(0, np.int32), genres=[])


# --------------------------------------------------------------------------- RecBole format


def _recbole_columns(table: _Table, required: tuple[str, ...]) -> dict[str, int]:
    """Column positions by field name (`name:type` headers); the required ones must be there."""
    header = table.header or []
    if not header or not all(":" in field for field in header):
        shown = "\t".join(header)
        raise DataError(f"{table.path}:1: bad header {shown!r}: expected RecBole "
                        "'name:type' fields, e.g. 'user_id:token'")
    columns = {field.split(":", 1)[0].strip(): k for k, field in enumerate(header)}
    missing = [name for name in required if name not in columns]
    if missing:
        raise DataError(f"{table.path}:1: bad header: no {', '.join(missing)} column "
                        f"(found {', '.join(columns)})")
    return columns


def _first(columns: dict[str, int], *names: str) -> int | None:
    return next((columns[n] for n in names if n in columns), None)


def _recbole_users(path: Path) -> Users:
    if not path.exists():
        return _empty_users()
    table = _read_table(path, "\t", header=True)
    cols = _recbole_columns(table, ("user_id",))
    ids = _unique_ids(table, _ids(table, cols["user_id"], "user_id"), "user_id")
    n = len(table)

    def text(name: str) -> list[str]:
        return table.columns[cols[name]] if name in cols else [""] * n

    age = (_lenient(table.columns[cols["age"]], np.float32, float, np.nan) if "age" in cols
           else np.full(n, np.nan, np.float32))
    return Users(ids=ids, age=age, gender=_gender(text("gender")),
                 occupation=text("occupation"), zip_code=text("zip_code"))


def _recbole_items(path: Path) -> Items:
    if not path.exists():
        return _empty_items()
    table = _read_table(path, "\t", header=True)
    cols = _recbole_columns(table, ("item_id",))
    ids = _unique_ids(table, _ids(table, cols["item_id"], "item_id"), "item_id")
    n = len(table)
    title_col = _first(cols, "movie_title", "title")
    year_col = _first(cols, "release_year", "year")
    genre_col = _first(cols, "class", "genre", "genres")
    title = table.columns[title_col] if title_col is not None else [""] * n
    year = (_lenient(table.columns[year_col], np.int32, int, 0) if year_col is not None
            else np.zeros(n, np.int32))
    genres = ([tuple(v.split()) for v in table.columns[genre_col]] if genre_col is not None
              else [()] * n)
    return Items(ids=ids, title=title, year=year, genres=genres)


def load_recbole(folder: Path, name: str = "ml-100k") -> Dataset:
    """RecBole atomic files `<name>.inter` (required), `.user` and `.item` (optional).

    Columns are found by header name; the interactions need user_id, item_id and
    timestamp (rating is optional: implicit feedback gets 1.0).
    """
    folder = Path(folder)
    inter = _read_table(folder / f"{name}.inter", "\t", header=True)
    cols = _recbole_columns(inter, ("user_id", "item_id", "timestamp"))
    rating = (_parse(inter, cols["rating"], "rating", np.float32, float) if "rating" in cols
              else np.ones(len(inter), np.float32))
    return build_dataset(
        name,
        _ids(inter, cols["user_id"], "user_id"),
        _ids(inter, cols["item_id"], "item_id"),
        rating,
        _parse(inter, cols["timestamp"], "timestamp", np.float64, float),
        _recbole_users(folder / f"{name}.user"),
        _recbole_items(folder / f"{name}.item"),
    )


# --------------------------------------------------------------------------- MovieLens format


def _movielens_genres(path: Path) -> tuple[str, ...]:
    """Genre names in flag order, from u.genre (`name|index`) or the standard 19."""
    if not path.exists():
        return ML100K_GENRES
    table = _read_table(path, "|", header=False, ncols=2)
    index = _ids(table, 1, "genre index")
    if sorted(index.tolist()) != list(range(len(index))):
        raise DataError(f"{path}: genre indices must be 0..{len(index) - 1}, got {index.tolist()}")
    names = [""] * len(index)
    for name, k in zip(table.columns[0], index.tolist(), strict=True):
        names[k] = name
    return tuple(names)


def _movielens_users(path: Path) -> Users:
    if not path.exists():
        return _empty_users()
    table = _read_table(path, "|", header=False, ncols=5)
    ids = _unique_ids(table, _ids(table, 0, "user id"), "user id")
    return Users(ids=ids, age=_lenient(table.columns[1], np.float32, float, np.nan),
                 gender=_gender(table.columns[2]), occupation=table.columns[3],
                 zip_code=table.columns[4])


def _release_year(date: str) -> int:
    """'01-Jan-1995' -> 1995; anything else -> 0 (unknown)."""
    tail = date.strip().rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _movielens_items(path: Path, genre_names: tuple[str, ...]) -> Items:
    if not path.exists():
        return _empty_items()
    table = _read_table(path, "|", header=False, ncols=5 + len(genre_names))
    ids = _unique_ids(table, _ids(table, 0, "item id"), "item id")
    flags = np.stack([_parse(table, 5 + g, f"genre flag {name!r}", np.int8, int)
                      for g, name in enumerate(genre_names)], axis=1)
    names = np.array(genre_names, dtype=object)
    return Items(ids=ids, title=table.columns[1],
                 year=np.array([_release_year(d) for d in table.columns[2]], dtype=np.int32),
                 genres=[tuple(names[row != 0]) for row in flags])


def load_movielens(folder: Path) -> Dataset:
    """Original MovieLens-100k files: u.data (required), u.user, u.item, u.genre (optional).

    Titles stay as given ("Toy Story (1995)"); the year comes from the release date.
    """
    folder = Path(folder)
    data = _read_table(folder / "u.data", "\t", header=False, ncols=4)
    return build_dataset(
        folder.resolve().name or "movielens",
        _ids(data, 0, "user id"),
        _ids(data, 1, "item id"),
        _parse(data, 2, "rating", np.float32, float),
        _parse(data, 3, "timestamp", np.float64, float),
        _movielens_users(folder / "u.user"),
        _movielens_items(folder / "u.item", _movielens_genres(folder / "u.genre")),
    )


# --------------------------------------------------------------------------- fetching


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _ML100K_FILES)


def _pip_download(dest: Path, quiet: bool) -> Path:
    """The recbole wheel through the machine's own pip configuration."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), RECBOLE_WHEEL]
    if not quiet:
        print(f"fetching MovieLens-100k: pip download {RECBOLE_WHEEL} ...", file=sys.stderr)
    hint = ("check network access and pip's index settings (`pip config list`), or put "
            f"{', '.join(_ML100K_FILES)} from the wheel's {_WHEEL_DIR} into the cache by hand")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"pip download {RECBOLE_WHEEL} failed: {exc}\nhint: {hint}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise DataError(f"pip download {RECBOLE_WHEEL} failed (exit {proc.returncode}):\n"
                        f"{tail}\nhint: {hint}")
    wheels = sorted(dest.glob("recbole-*.whl"))
    if not wheels:
        raise DataError(f"pip download {RECBOLE_WHEEL} left no wheel in {dest}\nhint: {hint}")
    return wheels[0]


def _extract(wheel: Path, dest: Path) -> None:
    """Only the three ml-100k atomic files, nothing else from the wheel."""
    dest.mkdir()
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            missing = [f for f in _ML100K_FILES if _WHEEL_DIR + f not in names]
            if missing:
                raise DataError(f"{wheel.name} has no {_WHEEL_DIR}{', '.join(missing)}")
            for f in _ML100K_FILES:
                with zf.open(_WHEEL_DIR + f) as src, open(dest / f, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{wheel}: not a valid wheel: {exc}") from None


def fetch_ml100k(cache_dir: Path, *, quiet: bool = False) -> Path:
    """cache_dir/ml-100k with ml-100k.{inter,user,item}, fetched once through pip.

    Extracts into a temporary folder beside the target and renames it into place, so an
    interrupted fetch never leaves half the files.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / "ml-100k"
    if _complete(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ml-100k-", dir=cache_dir) as tmp:
        wheel = _pip_download(Path(tmp) / "wheel", quiet)
        staged = Path(tmp) / "ml-100k"
        _extract(wheel, staged)
        wheel.unlink()
        if target.exists():  # an incomplete earlier copy
            shutil.rmtree(target)
        try:
            staged.rename(target)
        except OSError:
            if not _complete(target):  # lost a race only if the winner left it whole
                raise
    if not quiet:
        print(f"MovieLens-100k is in {target}", file=sys.stderr)
    return target


def load_dataset(name_or_path: str, cache_dir: Path) -> Dataset:
    """A known name ("ml-100k", fetched into cache_dir) or a folder of MovieLens/RecBole files.

    Known names win over a folder of the same name; write "./ml-100k" for the folder.
    """
    if name_or_path in KNOWN_DATASETS:
        return load_recbole(fetch_ml100k(Path(cache_dir)), name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".inter":
        return load_recbole(path.parent, path.stem)
    if path.is_dir():
        if (path / "u.data").is_file():
            return load_movielens(path)
        inters = sorted(path.glob("*.inter"))
        named = [p for p in inters if p.stem == path.resolve().name]
        if len(inters) == 1 or named:
            return load_recbole(path, (named or inters)[0].stem)
        if inters:
            raise DataError(f"{path} holds several RecBole datasets "
                            f"({', '.join(p.name for p in inters)}): pass the .inter file")
    known = ", ".join(KNOWN_DATASETS)
    raise DataError(f"unknown dataset {name_or_path!r}: expected one of {known}, "
                    "a folder with MovieLens files (u.data, u.user, u.item), or a folder/.inter "
                    "file of RecBole atomic files (<name>.inter, .user, .item)")


def profiles_of(ds: Dataset) -> list[Profile]:
    """One Profile per dense user index."""
    u = ds.users
    return [
        Profile(
            age=None if np.isnan(u.age[i]) else float(u.age[i]),
            gender=u.gender[i] or None,
            occupation=u.occupation[i] or None,
            zip_code=u.zip_code[i] or None,
        )
        for i in range(len(u))
    ]
