"""Data loading: real ml-100k figures, both file formats, splits, and clear errors."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from engine import data
from engine.config import default_cache_dir
from engine.data import (
    ML100K_GENRES,
    DataError,
    Dataset,
    fetch_ml100k,
    load_dataset,
    load_movielens,
    load_recbole,
)


@pytest.fixture(scope="module")
def ml100k_cache(ml100k: Dataset) -> Path:
    """The cache folder the session's `ml100k` fixture fetched into (see conftest)."""
    return default_cache_dir() / "data"


def _assert_sorted(ds: Dataset) -> None:
    order = np.lexsort((ds.item, ds.user, ds.ts))
    assert np.array_equal(order, np.arange(len(ds)))


# --------------------------------------------------------------------------- real ml-100k


def test_ml100k_real_figures(ml100k: Dataset) -> None:
    ds = ml100k
    assert (len(ds.users), len(ds.items), len(ds)) == (943, 1682, 100_000)
    assert ds.user.dtype == np.int64 and ds.item.dtype == np.int64
    assert ds.rating.dtype == np.float32 and ds.ts.dtype == np.float64
    assert set(np.unique(ds.rating).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    _assert_sorted(ds)
    assert np.array_equal(ds.users.ids, np.arange(1, 944))
    assert np.array_equal(ds.items.ids, np.arange(1, 1683))
    assert len(np.unique(ds.user)) == 943 and len(np.unique(ds.item)) == 1682
    assert "943 users, 1682 items, 100000 interactions, 1997-09-20" in ds.summary()


def test_ml100k_tables(ml100k: Dataset) -> None:
    toy = ml100k.item_index()[1]
    assert ml100k.items.title[toy] == "Toy Story"
    assert ml100k.items.genres[toy] == ("Animation", "Children's", "Comedy")
    assert ml100k.items.year[toy] == 1995 and ml100k.items.year.dtype == np.int32
    assert ml100k.items.title[ml100k.item_index()[543]] == "Misérables, Les"  # UTF-8 in the wheel
    assert ml100k.items.year[ml100k.item_index()[267]] == 0  # "unkonwn" in the file
    one = ml100k.user_index()[1]
    users = ml100k.users
    assert (users.age[one], users.gender[one], users.occupation[one], users.zip_code[one]) == (
        24.0, "M", "technician", "85711")
    assert users.age.dtype == np.float32 and not np.isnan(users.age).any()
    assert set(users.gender) == {"M", "F"}


def test_fetch_is_atomic_and_idempotent(ml100k_cache: Path, monkeypatch) -> None:
    assert [p.name for p in ml100k_cache.iterdir()] == ["ml-100k"]  # no temp dir, no wheel
    folder = ml100k_cache / "ml-100k"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ml-100k.inter", "ml-100k.item", "ml-100k.user"]

    def no_pip(*args, **kwargs):
        raise AssertionError("fetch must not run pip when the files are there")

    monkeypatch.setattr(data.subprocess, "run", no_pip)
    start = time.perf_counter()
    assert fetch_ml100k(ml100k_cache, quiet=True) == folder
    assert time.perf_counter() - start < 0.1


def test_load_dataset_by_name_and_path(ml100k_cache: Path) -> None:
    by_name = load_dataset("ml-100k", ml100k_cache)
    by_path = load_dataset(str(ml100k_cache / "ml-100k"), ml100k_cache)
    by_file = load_dataset(str(ml100k_cache / "ml-100k" / "ml-100k.inter"), ml100k_cache)
    for ds in (by_name, by_path, by_file):
        assert ds.name == "ml-100k" and len(ds) == 100_000


def test_load_ml100k_is_fast(ml100k_cache: Path) -> None:
    start = time.perf_counter()
    load_recbole(ml100k_cache / "ml-100k")
    assert time.perf_counter() - start < 1.0


def test_fetch_reports_pip_failure(tmp_path: Path, monkeypatch) -> None:
    def failing_pip(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "recbole==1.2.1" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "lots of noise\nERROR: network down\n")

    monkeypatch.setattr(data.subprocess, "run", failing_pip)
    with pytest.raises(DataError, match="(?s)exit 1.*ERROR: network down.*hint"):
        fetch_ml100k(tmp_path / "cache", quiet=True)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written


# --------------------------------------------------------------------------- splits


def test_time_split_respects_the_cut(ml100k: Dataset) -> None:
    cut = ml100k.split_time(0.8)
    before, after = ml100k.time_split(0.8)
    assert len(before) + len(after) == len(ml100k)
    assert 79_000 <= len(before) <= 80_000
    assert before.ts.max() < cut <= after.ts.min()
    assert before.users is ml100k.users and after.items is ml100k.items
    _assert_sorted(before)
    _assert_sorted(after)
    with pytest.raises(ValueError):
        ml100k.split_time(1.0)


def test_subset_filters_interactions(ml100k: Dataset) -> None:
    liked = ml100k.rating >= 4
    good, bad = ml100k.subset(liked), ml100k.subset(~liked)
    assert len(good) == int(liked.sum()) and len(good) + len(bad) == len(ml100k)
    assert (good.rating >= 4).all() and (bad.rating < 4).all()
    assert good.users is ml100k.users and good.user_index() is ml100k.user_index()
    _assert_sorted(good)
    with pytest.raises(ValueError, match="bool"):
        ml100k.subset(np.arange(10))


def test_dataset_rejects_unsorted(ml100k: Dataset) -> None:
    with pytest.raises(ValueError, match="sorted"):
        Dataset("x", ml100k.users, ml100k.items, ml100k.user[::-1], ml100k.item[::-1],
                ml100k.rating[::-1], ml100k.ts[::-1])


# --------------------------------------------------------------------------- small files

# (user, item, rating, ts): unsorted, a tie at ts=100, user 9 has no profile row.
_CLICKS = [(2, 20, 3, 300), (1, 10, 5, 100), (9, 20, 1, 100), (1, 20, 4, 100), (2, 10, 2, 200)]
_USERS = [(1, "24", "M", "technician", "85711"), (2, "53", "F", "other", "94043"),
          (3, "", "M", "writer", "32067")]
_ITEMS = [(10, "Misérables, Les (1995)", "01-Jan-1995", ("Drama", "Musical")),
          (20, "Toy Story (1995)", "01-Jan-1995", ("Animation", "Children's", "Comedy")),
          (30, "unknown", "", ("unknown",))]


def _write_movielens(folder: Path, genre_file: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in _CLICKS))
    (folder / "u.user").write_text("".join("|".join(map(str, row)) + "\n" for row in _USERS))
    lines = []
    for item, title, date, genres in _ITEMS:
        flags = ["1" if g in genres else "0" for g in ML100K_GENRES]
        lines.append("|".join([str(item), title, date, "", "http://x"] + flags))
    (folder / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    if genre_file:
        (folder / "u.genre").write_text(
            "".join(f"{g}|{k}\n" for k, g in enumerate(ML100K_GENRES)) + "\n")
    return folder


def _write_recbole(folder: Path, name: str = "tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in _CLICKS]
    (folder / f"{name}.inter").write_text("\n".join(inter) + "\n")
    users = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    users += ["\t".join(map(str, row)) for row in _USERS]
    (folder / f"{name}.user").write_text("\n".join(users) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{i}\t{t}\t{d[-4:] or 'unkonwn'}\t{' '.join(g)}" for i, t, d, g in _ITEMS]
    (folder / f"{name}.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    return folder


def test_load_movielens_original_format(tmp_path: Path) -> None:
    ds = load_movielens(_write_movielens(tmp_path / "ml"))
    assert ds.name == "ml" and len(ds) == 5
    assert ds.users.ids.tolist() == [1, 2, 3, 9] and ds.items.ids.tolist() == [10, 20, 30]
    assert ds.users.ids.dtype == np.int64 and ds.items.ids.dtype == np.int64
    # sorted by (ts, user, item), dense indices follow ascending external ids
    assert ds.ts.tolist() == [100, 100, 100, 200, 300]
    assert ds.users.ids[ds.user].tolist() == [1, 1, 9, 2, 2]
    assert ds.items.ids[ds.item].tolist() == [10, 20, 20, 10, 20]
    assert ds.rating.tolist() == [5, 4, 1, 2, 3] and ds.rating.dtype == np.float32
    u = ds.user_index()
    assert ds.users.age[u[1]] == 24 and np.isnan(ds.users.age[u[3]])
    assert np.isnan(ds.users.age[u[9]]) and ds.users.gender[u[9]] == ""  # no profile row
    assert ds.users.occupation[u[2]] == "other" and ds.users.zip_code[u[2]] == "94043"
    i = ds.item_index()
    assert ds.items.title[i[10]] == "Misérables, Les (1995)"  # latin-1 file
    assert ds.items.genres[i[20]] == ("Animation", "Children's", "Comedy")
    assert ds.items.year.tolist() == [1995, 1995, 0] and ds.items.year.dtype == np.int32
    assert ds.items.genres[i[30]] == ("unknown",)


def test_movielens_without_u_genre_uses_standard_names(tmp_path: Path) -> None:
    ds = load_movielens(_write_movielens(tmp_path / "ml", genre_file=False))
    assert ds.items.genres[ds.item_index()[10]] == ("Drama", "Musical")


def test_both_formats_give_the_same_tables(tmp_path: Path) -> None:
    ml = load_movielens(_write_movielens(tmp_path / "ml"))
    rb = load_recbole(_write_recbole(tmp_path / "rb"), "tiny")
    for field in ("user", "item", "rating", "ts"):
        assert np.array_equal(getattr(ml, field), getattr(rb, field))
    assert np.array_equal(ml.users.ids, rb.users.ids)
    assert np.array_equal(ml.users.age, rb.users.age, equal_nan=True)
    assert (ml.users.gender, ml.users.occupation) == (rb.users.gender, rb.users.occupation)
    assert ml.users.zip_code == rb.users.zip_code
    assert np.array_equal(ml.items.year, rb.items.year) and ml.items.genres == rb.items.genres
    assert ml.items.title == rb.items.title


def test_load_dataset_detects_the_format(tmp_path: Path) -> None:
    assert load_dataset(str(_write_movielens(tmp_path / "ml")), tmp_path).name == "ml"
    assert load_dataset(str(_write_recbole(tmp_path / "rb")), tmp_path).name == "tiny"
    with pytest.raises(DataError, match="ml-100k"):
        load_dataset("netflix-prize", tmp_path)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset(str(tmp_path), tmp_path)  # a folder with neither format


# --------------------------------------------------------------------------- errors


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing file: .*u\.data"):
        load_movielens(tmp_path)
    with pytest.raises(DataError, match=r"missing file: .*ml-100k\.inter"):
        load_recbole(tmp_path)


def test_malformed_lines_are_named(tmp_path: Path) -> None:
    folder = _write_movielens(tmp_path / "ml")
    (folder / "u.data").write_text("1\t10\t5\t100\n2\t20\t3\t200\n3\tabc\t4\t300\n")
    with pytest.raises(DataError, match=r"u\.data:3: item id is not a number: 'abc'"):
        load_movielens(folder)
    (folder / "u.data").write_text("1\t10\t5\t100\n2\t20\t3\n")
    with pytest.raises(DataError, match=r"u\.data:2: expected 4 fields"):
        load_movielens(folder)


def test_bad_recbole_header(tmp_path: Path) -> None:
    folder = _write_recbole(tmp_path / "rb")
    (folder / "tiny.inter").write_text("1\t10\t5\t100\n")
    with pytest.raises(DataError, match=r"tiny\.inter:1: bad header"):
        load_recbole(folder, "tiny")
    (folder / "tiny.inter").write_text("user_id:token\titem_id:token\trating:float\n1\t10\t5\n")
    with pytest.raises(DataError, match="no timestamp column"):
        load_recbole(folder, "tiny")


def test_duplicate_profile_rows(tmp_path: Path) -> None:
    folder = _write_movielens(tmp_path / "ml")
    with open(folder / "u.user", "a") as f:
        f.write("2|30|M|other|00000\n")
    with pytest.raises(DataError, match=r"u\.user:4: duplicate user id 2"):
        load_movielens(folder)
