"""Built-in tasks prepared once from pinned PyPI sdists: download, verify, extract and cache.

``movie-reviews`` (vaderSentiment), ``multiemo-en``, ``social_iqa`` and ``goal_step_wikihow`` (all three
from one bigbench sdist) are extracted by
``python -m rankalloc.tasks prepare NAME`` (:func:`rankalloc.tasks.prepare_task`) into
:func:`task_cache_dir`, and read back by :func:`_load_prepared`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .errors import DataError, first_line
from .task_files import RawTask, _frame

logger = logging.getLogger("rankalloc.tasks")  # one logger for the task modules, as before the split

PREPARED_FORMAT = 1  # bump when the prepared files change shape; old caches then ask for --force


@dataclass(frozen=True)
class SdistSource:
    """A pinned PyPI sdist that holds a task's data, and how to turn it into a frame."""

    package: str
    version: str
    sha256: str
    size: str  # for log lines only
    extract: Callable[[Path], tuple[pd.DataFrame, list[str]]]
    family: str = "classification"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# --------------------------------------------------------------------------------------------------
# Built-ins prepared from pinned sdists: movie-reviews (vaderSentiment); multiemo-en, social_iqa and
# goal_step_wikihow (bigbench)
# --------------------------------------------------------------------------------------------------
def _read_tar_member(source: Path | bytes, suffix: str, where: str) -> bytes:
    """Stream a .tar.gz and return the first member whose path ends with ``suffix``.

    Reads sequentially (``r|gz``), so a large archive is never extracted or seeked.

    Raises:
        DataError: the archive is unreadable or has no such member.
    """
    fileobj = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    try:
        with tarfile.open(fileobj=fileobj, mode="r|gz") as tar:
            for member in tar:
                if member.isfile() and (member.name == suffix or member.name.endswith("/" + suffix)):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return handle.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{where}: not a readable .tar.gz ({first_line(e)})") from None
    finally:
        fileobj.close()
    raise DataError(f"{where}: has no member ending in {suffix}")


def _extract_movie_reviews(sdist: Path) -> tuple[pd.DataFrame, list[str]]:
    """vaderSentiment sdist -> hutto_ICWSM_2014.tar.gz -> movieReviewSnippets_GroundTruth.txt.

    Lines are ``id<TAB>mean score<TAB>text``; label 1 if the score is positive, 0 if negative; a score
    of exactly 0 has no polarity and is dropped.
    """
    inner = _read_tar_member(sdist, "additional_resources/hutto_ICWSM_2014.tar.gz", str(sdist))
    raw = _read_tar_member(inner, "movieReviewSnippets_GroundTruth.txt", "hutto_ICWSM_2014.tar.gz")
    texts, labels, neutral = [], [], 0
    for number, line in enumerate(raw.decode("utf-8", errors="replace").split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        try:
            score = float(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"movieReviewSnippets_GroundTruth.txt line {number}: expected id, score and text "
                            "separated by tabs") from None
        if len(parts) < 3 or not parts[2].strip():
            raise DataError(f"movieReviewSnippets_GroundTruth.txt line {number}: no text")
        if score == 0:
            neutral += 1
            continue
        texts.append(parts[2].strip())
        labels.append(1 if score > 0 else 0)
    if neutral:
        logger.info("movie-reviews: dropped %d snippet(s) with a mean score of exactly 0", neutral)
    return _frame(texts, labels), ["negative", "positive"]


def _extract_multiemo(sdist: Path) -> tuple[pd.DataFrame, list[str]]:
    """bigbench sdist -> benchmark_tasks/multiemo/all_sentence_en/task.json; label = argmax of target_scores."""
    member = "bigbench/benchmark_tasks/multiemo/all_sentence_en/task.json"
    examples = _bigbench_examples(sdist, member)
    names = list(examples[0]["target_scores"])
    texts, labels = [], []
    for i, example in enumerate(examples):
        scores = example.get("target_scores", {})
        if set(scores) != set(names) or "input" not in example:
            raise DataError(f"{member}: example {i} lacks 'input' or has target_scores keys {list(scores)}, "
                            f"expected {names}")
        texts.append(str(example["input"]))
        labels.append(int(np.argmax([scores[n] for n in names])))
    return _frame(texts, labels), names


def _bigbench_examples(sdist: Path, member: str) -> list[dict]:
    try:
        examples = json.loads(_read_tar_member(sdist, member, str(sdist)))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{member}: not a BIG-bench task file with 'examples' ({first_line(e)})") from None
    if not examples:
        raise DataError(f"{member}: no examples")
    return examples


def _bigbench_multiple_choice(sdist: Path, members: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """BIG-bench multiple-choice items ``{"input", "target_scores": {option: 0|1}}`` from ``members``
    -> question, options (in the file's order) and the index of the option scored highest."""
    texts, choices, labels = [], [], []
    for member in members:
        for i, example in enumerate(_bigbench_examples(sdist, f"bigbench/benchmark_tasks/{member}")):
            scores = example.get("target_scores")
            if not isinstance(scores, dict) or len(scores) < 2 or "input" not in example:
                raise DataError(f"{member}: example {i} lacks 'input' or has fewer than two target_scores")
            options = [str(o) for o in scores]
            texts.append(str(example["input"]))
            choices.append(options)
            labels.append(int(np.argmax([float(scores[o]) for o in scores])))
    frame = pd.DataFrame({"text": texts, "choices": choices, "label": np.asarray(labels, dtype=np.int64)})
    return frame, [str(i) for i in range(max(map(len, choices)))]


SDIST_SOURCES: dict[str, SdistSource] = {
    "movie-reviews": SdistSource("vaderSentiment", "3.3.2",
                                 "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
                                 "2.5 MB", _extract_movie_reviews),
    "multiemo-en": SdistSource("bigbench", "1.0.0",
                               "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                               "358 MB", _extract_multiemo),
    "social_iqa": SdistSource("bigbench", "1.0.0",
                              "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", "358 MB",
                              lambda sdist: _bigbench_multiple_choice(sdist, ["social_iqa/task.json"]),
                              family="multiple_choice"),
    "goal_step_wikihow": SdistSource("bigbench", "1.0.0",
                                     "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", "358 MB",
                                     lambda sdist: _bigbench_multiple_choice(sdist, [
                                         f"goal_step_wikihow/{sub}/task.json"
                                         for sub in ("step_inference", "goal_inference", "step_ordering")]),
                                     family="multiple_choice"),
}
FAMILY_COLUMNS = {"classification": ["text", "label"], "multiple_choice": ["text", "choices", "label"]}


def task_cache_dir() -> Path:
    """Folder of prepared tasks: ``$RANKALLOC_CACHE/tasks``, else ``$XDG_CACHE_HOME/rankalloc/tasks``,
    else ``~/.cache/rankalloc/tasks``."""
    root = os.environ.get("RANKALLOC_CACHE")
    if root:
        return Path(root).expanduser() / "tasks"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "rankalloc" / "tasks"


def prepared_paths(name: str, cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(data parquet, metadata json) of a prepared task."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else task_cache_dir()
    return folder / f"{name}.parquet", folder / f"{name}.json"


def is_prepared(name: str, cache_dir: str | Path | None = None) -> bool:
    data, meta = prepared_paths(name, cache_dir)
    return data.is_file() and meta.is_file()


def prepare_command(name: str) -> str:
    return f"python -m rankalloc.tasks prepare {name}"


def _download_sdist(source: SdistSource, dest: Path) -> Path:
    """Run ``pip download`` of the pinned sdist into ``dest``; return the archive's path.

    Raises:
        DataError: pip fails (e.g. no network) or leaves no single archive behind.
    """
    # pip checks the pinned hash as soon as the archive arrives, before it runs the sdist's setup.py to read
    # its metadata: a tampered mirror or cache never gets to execute anything
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{source.requirement} --hash=sha256:{source.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
           "-r", str(requirements), "-d", str(dest)]
    logger.info("downloading the %s sdist (%s) from PyPI: %s", source.requirement, source.size, " ".join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise DataError(f"pip download {source.requirement} failed ({reason}); it needs access to PyPI, or pass "
                        "--sdist PATH to an already-downloaded copy")
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".tgz")))
    if len(archives) != 1:
        raise DataError(f"pip download {source.requirement} left {len(archives)} archives in {dest}, expected one")
    return archives[0]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_checked(source: SdistSource, sdist: Path) -> tuple[pd.DataFrame, list[str]]:
    if not sdist.is_file():
        raise DataError(f"--sdist {sdist}: no such file")
    actual = sha256_file(sdist)
    if actual != source.sha256:
        raise DataError(f"{sdist}: sha256 {actual} does not match the pinned {source.sha256} of "
                        f"{source.requirement}; refusing to use it")
    logger.info("%s: sha256 verified; extracting", sdist.name)
    return source.extract(sdist)


def _load_prepared(name: str) -> RawTask:
    """A task written by :func:`prepare_task`.

    Raises:
        DataError: not prepared yet (the message names the command to run), or an outdated/corrupt cache.
    """
    data_path, meta_path = prepared_paths(name)
    if not (data_path.is_file() and meta_path.is_file()):
        source = SDIST_SOURCES[name]
        raise DataError(f"task {name!r} is not prepared (no {data_path}); run once: {prepare_command(name)} "
                        f"(downloads the {source.requirement} sdist, {source.size}, from PyPI)")
    redo = f"run: {prepare_command(name)} --force"
    try:
        meta = json.loads(meta_path.read_text())
        frame = pd.read_parquet(data_path)
    except Exception as e:
        raise DataError(f"prepared task {name!r} in {data_path.parent} is unreadable ({first_line(e)}); "
                        f"{redo}") from None
    if meta.get("format") != PREPARED_FORMAT or meta.get("sha256") != SDIST_SOURCES[name].sha256:
        raise DataError(f"prepared task {name!r} in {data_path.parent} comes from an older version; {redo}")
    family = SDIST_SOURCES[name].family
    if len(frame) != meta.get("rows") or list(frame.columns) != FAMILY_COLUMNS[family]:
        raise DataError(f"prepared task {name!r} in {data_path.parent} is incomplete or corrupt; {redo}")
    frame["label"] = frame["label"].astype("int64")
    if family == "multiple_choice":  # parquet gives numpy arrays back
        frame["choices"] = frame["choices"].map(lambda options: [str(o) for o in options])
    return RawTask(name, frame, None, list(meta["label_names"]), False, family)
