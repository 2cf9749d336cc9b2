"""Data as users bring it: number-like option texts, targets written as text, options missing inside a list,
duplicate rows, Windows and UTF-16 encodings, folders of split files, other split names."""
from __future__ import annotations

import json
import logging
import random
import warnings

import numpy as np
import pandas as pd
import pytest

from rankalloc.config import DataConfig
from rankalloc.data import train_eval_frames
from rankalloc.errors import DataError
from rankalloc.metrics import classification_metrics
from rankalloc.tasks import load_raw_task


def count_questions(n: int = 40) -> pd.DataFrame:
    """Options that are numbers written as text ("0", "1", "2" in shuffled order); the answer is an option's text."""
    rng = random.Random(10)
    rows = []
    for i in range(n):
        options = ["0", "1", "2"]
        rng.shuffle(options)
        rows.append({"question": f"how many apples in picture {i}?", "o1": options[0], "o2": options[1],
                     "o3": options[2], "answer": rng.choice(options)})
    return pd.DataFrame(rows)


def test_a_number_like_answer_is_the_options_text_where_types_say_so_and_refused_where_they_cannot(tmp_path):
    df = count_questions()
    df.to_json(tmp_path / "mc.jsonl", orient="records", lines=True)  # answers are strings: option texts
    flags = dict(text_column="question", choice_columns=["o1", "o2", "o3"], label_column="answer")
    raw = load_raw_task(DataConfig(task=str(tmp_path / "mc.jsonl"), **flags))
    chosen = [options[label] for options, label in zip(raw.train["choices"], raw.train["label"])]
    assert chosen == df["answer"].tolist()
    df.to_csv(tmp_path / "mc.csv", index=False)  # "1" is an index or an option's text: a CSV cannot say
    with pytest.raises(DataError, match=r"every label is both an option index and the text of one of its row's "
                                        r"options, and the two readings differ in \d+ row\(s\)"):
        load_raw_task(DataConfig(task=str(tmp_path / "mc.csv"), **flags))


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_index_labels_over_numeric_options_are_indices_in_every_format(tmp_path, suffix):
    df = pd.DataFrame({"q": [f"question {i}" for i in range(8)], "o0": [1] * 8, "o1": [2] * 8, "o2": [3] * 8,
                       "o3": [4] * 8, "label": [1, 2, 3, 0, 1, 2, 3, 0]})
    path = tmp_path / f"mc{suffix}"
    {".csv": lambda: df.to_csv(path, index=False), ".tsv": lambda: df.to_csv(path, index=False, sep="\t"),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path, index=False)}[suffix]()
    raw = load_raw_task(DataConfig(task=str(path), text_column="q", choice_columns=["o0", "o1", "o2", "o3"]))
    assert raw.train["label"].tolist() == [1, 2, 3, 0, 1, 2, 3, 0]


def test_csv_index_labels_written_as_floats_are_indices(tmp_path):
    df = pd.DataFrame({"q": [f"q{i}" for i in range(6)], "a": ["x"] * 6, "b": ["y"] * 6, "c": ["z"] * 6,
                       "label": [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]})
    df.to_csv(tmp_path / "mc.csv", index=False)
    raw = load_raw_task(DataConfig(task=str(tmp_path / "mc.csv"), text_column="q", choice_columns=["a", "b", "c"]))
    assert raw.train["label"].tolist() == [0, 1, 2, 0, 1, 2]


def test_numbers_and_booleans_in_text_columns_are_written_as_they_were(tmp_path):
    with open(tmp_path / "qa.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"question": f"what is {i}+{i}?", "answer": 2 * i}) + "\n")
    raw = load_raw_task(DataConfig(task=str(tmp_path / "qa.jsonl"), text_column="question", answer_column="answer"))
    assert raw.train["answer"].tolist() == ["0", "2", "4", "6", "8", "10"]
    pd.DataFrame({"a": [True, False] * 4, "b": ["p"] * 8, "label": [0, 1] * 4}).to_json(
        tmp_path / "bools.jsonl", orient="records", lines=True)
    raw = load_raw_task(DataConfig(task=str(tmp_path / "bools.jsonl"), text_column="a", text_pair_column="b"))
    assert raw.train["text"].tolist() == ["True", "False"] * 4


def test_an_answer_that_is_an_option_text_beyond_the_option_count_is_not_refused(tmp_path):
    df = pd.DataFrame({"q": [f"{i} + 10 = ?" for i in range(6)], "a": ["14"] * 6, "b": ["15"] * 6,
                       "c": ["16"] * 6, "answer": ["16", "14", "15", "16", "14", "15"]})
    df.to_csv(tmp_path / "sums.csv", index=False)
    raw = load_raw_task(DataConfig(task=str(tmp_path / "sums.csv"), text_column="q", choice_columns=["a", "b", "c"],
                                   label_column="answer"))
    assert raw.train["label"].tolist() == [2, 0, 1, 2, 0, 1]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_regression_targets_written_as_text_are_a_regression_task(tmp_path, suffix):
    df = pd.DataFrame({"text": [f"sentence {i}" for i in range(20)],
                       "label": [f"{x:.2f}" for x in np.linspace(0, 5, 20)]})
    path = tmp_path / f"scores{suffix}"
    df.to_json(path, orient="records", lines=True) if suffix == ".jsonl" else df.to_parquet(path, index=False)
    raw = load_raw_task(DataConfig(task=str(path)))
    assert raw.family == "regression"
    assert raw.train["label"].to_numpy() == pytest.approx(np.round(np.linspace(0, 5, 20), 2))


def test_integer_class_names_and_class_codes_written_as_text_stay_classes(tmp_path):
    pd.DataFrame({"text": list("abcdef"), "label": ["1", "2", "1", "2", "1", "2"]}).to_json(
        tmp_path / "d.jsonl", orient="records", lines=True)
    raw = load_raw_task(DataConfig(task=str(tmp_path / "d.jsonl")))
    assert raw.family == "classification" and raw.label_names == ["1", "2"]
    pd.DataFrame({"text": list("abcdef"), "label": ["007", "0.5", "1.25"] * 2}).to_json(
        tmp_path / "codes.jsonl", orient="records", lines=True)
    raw = load_raw_task(DataConfig(task=str(tmp_path / "codes.jsonl")))
    assert raw.family == "classification" and raw.label_names == ["0.5", "007", "1.25"]


def test_an_option_missing_inside_a_list_is_not_the_option_none(tmp_path, caplog):
    with open(tmp_path / "mc.jsonl", "w") as f:
        for i in range(10):
            options = [f"a{i}", None if i == 0 else f"b{i}", f"c{i}"] + ([None] if i == 1 else [])
            f.write(json.dumps({"q": f"q{i}", "options": options, "label": i % 3}) + "\n")
    with caplog.at_level(logging.WARNING):
        raw = load_raw_task(DataConfig(task=str(tmp_path / "mc.jsonl"), text_column="q", choice_columns=["options"]))
    assert "dropping 1 row(s) missing an option before a present one" in caplog.text
    assert raw.train["text"].tolist() == [f"q{i}" for i in range(1, 10)]  # q0 lost its middle option
    assert raw.train["choices"].iloc[0] == ["a1", "b1", "c1"]  # a missing last option is skipped
    assert not any("None" in options for options in raw.train["choices"])


def test_evaluation_examples_that_repeat_a_training_input_are_warned_about(tmp_path, caplog):
    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "meh", "superb", "poor", "ok", "nice"]
    unique = pd.DataFrame({"text": [" ".join(rng.choices(words, k=5)) for _ in range(20)], "label": ["a", "b"] * 10})
    pd.concat([unique] * 4).to_csv(tmp_path / "dup.csv", index=False)
    unique.to_csv(tmp_path / "same.csv", index=False)
    for cfg, shared in ((DataConfig(task=str(tmp_path / "dup.csv")), "16 of the 16"),
                        (DataConfig(task=str(tmp_path / "same.csv"), eval_file=str(tmp_path / "same.csv")),
                         "20 of the 20")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train_eval_frames(load_raw_task(cfg), cfg)
        assert f"{shared} evaluation examples have the same input text as a training example" in caplog.text
    caplog.clear()
    cfg = DataConfig(task=str(tmp_path / "same.csv"))
    with caplog.at_level(logging.WARNING):
        train_eval_frames(load_raw_task(cfg), cfg)
    assert "same input text" not in caplog.text


def test_a_capped_evaluation_split_is_said(tmp_path, caplog):
    pd.DataFrame({"text": [f"t{i}" for i in range(30)], "label": ["a", "b"] * 15}).to_csv(tmp_path / "d.csv",
                                                                                          index=False)
    cfg = DataConfig(task=str(tmp_path / "d.csv"), eval_file=str(tmp_path / "d.csv"), max_eval_examples=10)
    with caplog.at_level(logging.INFO):
        _, evaluation = train_eval_frames(load_raw_task(cfg), cfg)
    assert len(evaluation) == 10
    assert "evaluating on a seeded sample of 10 of the 30 evaluation examples" in caplog.text


def test_windows_1252_and_utf16_files_read_their_characters(tmp_path):
    df = pd.DataFrame({"text": [f"nice \u201cquoted\u201d \u2013 \u20ac5 {i}" for i in range(8)],
                       "label": ["don\u2019t know", "yes"] * 4})
    (tmp_path / "cp1252.csv").write_bytes(df.to_csv(index=False).encode("cp1252"))
    (tmp_path / "utf16.csv").write_bytes(df.to_csv(index=False).encode("utf-16"))
    for name in ("cp1252.csv", "utf16.csv"):
        raw = load_raw_task(DataConfig(task=str(tmp_path / name)))
        assert raw.label_names == ["don\u2019t know", "yes"], name
        assert raw.train["text"].tolist() == df["text"].tolist(), name
    (tmp_path / "broken16.csv").write_bytes(b"\xff\xfet\x00e\x00x\x00t\x00\x00\xd8")
    with pytest.raises(DataError, match="UTF-16's byte-order mark but is not valid UTF-16"):
        load_raw_task(DataConfig(task=str(tmp_path / "broken16.csv")))


def test_a_folder_of_split_files_is_read_as_local_files_are(tmp_path, monkeypatch):
    import datasets

    def no_builder(*args, **kwargs):
        raise AssertionError("a folder with a train file must not go through load_dataset")

    folder = tmp_path / "my_task"
    folder.mkdir()
    codes = pd.DataFrame({"text": ["NA", "None", "hello", "null", "world", "foo", "bar", "baz"],
                          "label": ["007", "07"] * 4})
    codes.to_csv(folder / "train.csv", index=False)
    codes.iloc[:4].to_csv(folder / "dev.csv", index=False)
    monkeypatch.setattr(datasets, "load_dataset", no_builder)
    raw = load_raw_task(DataConfig(task=str(folder)))
    assert raw.name == "my_task" and raw.label_names == ["007", "07"]
    assert raw.train["text"].tolist() == codes["text"].tolist()  # "NA", "None" and "null" are text
    assert raw.eval["text"].tolist() == ["NA", "None", "hello", "null"]
    (folder / "train.jsonl").write_text("")
    with pytest.raises(DataError, match=r"2 files hold the train split \(train.csv, train.jsonl\); keep one"):
        load_raw_task(DataConfig(task=str(folder)))


def test_a_folder_without_a_train_file_or_saved_dataset_is_named_as_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"a folder holding neither a train\.\{csv,tsv,json,jsonl,parquet\} file "
                                        "nor a dataset written by save_to_disk"):
        load_raw_task(DataConfig(task=str(tmp_path / "empty")))


def test_other_names_of_the_evaluation_split_are_used_and_unused_splits_are_said(tmp_path, caplog):
    import datasets

    def part(start: int, n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(start, start + n)],
                                           "label": ["a", "b"] * (n // 2)})

    datasets.DatasetDict({"train": part(0, 20), "dev": part(100, 6)}).save_to_disk(str(tmp_path / "dev"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "dev")))
    assert raw.eval is not None and raw.eval["text"].tolist() == [f"t{i}" for i in range(100, 106)]
    datasets.DatasetDict({"train": part(0, 20), "validation_matched": part(100, 6)}).save_to_disk(
        str(tmp_path / "matched"))
    with caplog.at_level(logging.WARNING):
        raw = load_raw_task(DataConfig(task=str(tmp_path / "matched")))
    assert raw.eval is None and "split(s) 'validation_matched' are not used" in caplog.text


def test_a_class_label_evaluation_split_is_mapped_by_name_onto_plain_training_names(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(9)], "label": ["neg", "neu", "pos"] * 3})
    validation = datasets.Dataset.from_dict(
        {"text": ["v0", "v1", "v2", "v3"], "label": [0, 1, 2, -1]},
        features=datasets.Features({"text": datasets.Value("string"),
                                    "label": datasets.ClassLabel(names=["pos", "neg", "neu"])}))
    datasets.DatasetDict({"train": train, "validation": validation}).save_to_disk(str(tmp_path / "d"))
    raw = load_raw_task(DataConfig(task=str(tmp_path / "d")))
    names = [raw.label_names[i] for i in raw.eval["label"]]
    assert raw.eval["text"].tolist() == ["v0", "v1", "v2"] and names == ["pos", "neg", "neu"]


def test_mcc_of_one_class_raises_no_library_warning():
    labels = np.array([0, 0, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = classification_metrics(np.eye(2)[[0, 0, 0, 0]] * 5, labels, 2)
    assert metrics["mcc"] == 0.0 and metrics["accuracy"] == 1.0


def test_a_list_in_a_text_column_is_refused_and_blank_texts_are_missing_in_every_format(tmp_path, caplog):
    rows = [{"text": ["a", "b"] if i == 3 else f"t{i}", "label": i % 2} for i in range(8)]
    (tmp_path / "lists.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"column 'text' holds a list in row 3 \(\['a', 'b'\]\); a text column needs "
                                        "one text per row"):
        load_raw_task(DataConfig(task=str(tmp_path / "lists.jsonl")))
    blanks = pd.DataFrame({"text": ["t0", "  ", "", "t3", "t4", "t5"], "label": [0, 1, 0, 1, 0, 1]})
    blanks.to_csv(tmp_path / "blanks.csv", index=False)
    blanks.to_json(tmp_path / "blanks.jsonl", orient="records", lines=True)
    for name in ("blanks.csv", "blanks.jsonl"):
        raw = load_raw_task(DataConfig(task=str(tmp_path / name)))
        assert raw.train["text"].tolist() == ["t0", "t3", "t4", "t5"], name
