"""Loaders: every input shape lands in the same canonical table, and bad files fail with a clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from ece.config import DataCfg
from ece.data.loaders import SCHEMA, dataset_hash, generation_index, load_edits, prompts_for_subject, source_format
from ece.errors import EceError

ROOT = Path(__file__).resolve().parents[2]
COMPACT = ROOT / "data/counterfact/counterfact_compact_0-19999.json"
GENERATION = ROOT / "data/counterfact/generation_prompts.json"
ZSRE = ROOT / "data/zsre/zsre_mem_eval_837.json"

MEMIT_RECORD = {
    "case_id": 7,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
    },
    "paraphrase_prompts": ["Danielle Darrieux spoke the language", "Danielle Darrieux, a native"],
    "neighborhood_prompts": ["The mother tongue of Michel Rocard is", "Jean Dujardin is a native speaker of"],
    "attribute_prompts": ["Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
USER_FACT = {"subject": "Ada Lovelace", "prompt": "{} was born in", "target_new": "Paris", "target_true": "London"}


def load(path: Path, fmt: str = "auto", **kw: Any) -> pl.DataFrame:
    return load_edits(DataCfg(edit_dataset=str(path), format=fmt, **kw))


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def jsonl(path: Path, records: list[Any]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def error_of(path: Path, fmt: str = "auto", **kw: Any) -> str:
    with pytest.raises(EceError) as info:
        load(path, fmt, **kw)
    return str(info.value)


# --- shapes -----------------------------------------------------------------------------------------


def test_counterfact_memit_shape(tmp_path: Path) -> None:
    path = write(tmp_path / "multi_counterfact.json", json.dumps([MEMIT_RECORD]))
    df = load(path, generation_prompts=str(GENERATION))
    assert df.schema == pl.Schema(SCHEMA)
    row = df.row(0, named=True)
    assert row["id"] == "counterfact:7"
    assert (row["subject"], row["prompt"]) == ("Danielle Darrieux", "The mother tongue of {} is")
    assert (row["target_new"], row["target_true"], row["neighborhood_target"]) == ("English", "French", None)
    assert row["paraphrase_prompts"] == MEMIT_RECORD["paraphrase_prompts"]
    assert row["neighborhood_prompts"] == MEMIT_RECORD["neighborhood_prompts"]
    assert row["generation_prompts"] == MEMIT_RECORD["generation_prompts"]  # its own, not the file's
    assert source_format(df) == "counterfact"
    assert (
        row["source"].startswith("counterfact:multi_counterfact.json:") and len(row["source"].rsplit(":", 1)[1]) == 12
    )


def test_counterfact_compact_real_file() -> None:
    df = load(COMPACT, n_facts=3, generation_prompts=str(GENERATION))
    assert df["id"].to_list() == ["counterfact:0", "counterfact:1", "counterfact:2"]
    row = df.row(0, named=True)
    assert row["prompt"] == "The mother tongue of {} is"
    assert (row["target_new"], row["target_true"], row["neighborhood_target"]) == ("English", "French", "French")
    assert row["paraphrase_prompts"] == ["Where Danielle Darrieux is from, people speak the language of"]
    assert row["neighborhood_prompts"] == ["Michel Rocard is a native speaker of"]
    assert row["generation_prompts"] == [
        "Danielle Darrieux was born in",
        "Danielle Darrieux's mother tongue is",
        "Where Danielle Darrieux is from, people speak the language of",
    ]
    assert df["prompt"][2] == "{}, the"
    assert source_format(df) == "counterfact_compact"


def test_compact_without_generation_file_has_empty_lists() -> None:
    assert load(COMPACT, n_facts=2)["generation_prompts"].to_list() == [[], []]


def test_zsre_real_file() -> None:
    df = load(ZSRE, n_facts=2)
    row = df.row(0, named=True)
    assert df["id"].to_list() == ["zsre:0", "zsre:1"]
    assert row["prompt"] == "When was the inception of {}?"
    assert (row["target_new"], row["target_true"]) == ("1998", None)  # MEMIT: answers[0], no true object
    assert row["paraphrase_prompts"] == ["When was the IAAF Combined Events Challenge launched?"]
    assert row["neighborhood_prompts"] == ["nq question: what is the name of the last episode of spongebob?"]
    assert row["neighborhood_target"] == "The String"
    assert source_format(df) == "zsre"


def test_jsonl_user_facts(tmp_path: Path) -> None:
    path = jsonl(
        tmp_path / "facts.jsonl",
        [
            {"id": "ada", **USER_FACT, "paraphrase_prompts": ["Ada Lovelace's birthplace is"]},
            {"id": 2, "subject": "Alan Turing", "prompt": "{} worked in", "target_new": "Berlin"},
        ],
    )
    df = load(path)
    assert df["id"].to_list() == ["ada", "2"]
    assert df["target_true"].to_list() == ["London", None]
    assert df["paraphrase_prompts"].to_list() == [["Ada Lovelace's birthplace is"], []]
    assert source_format(df) == "jsonl"


def test_csv_user_facts(tmp_path: Path) -> None:
    path = write(
        tmp_path / "facts.csv",
        (
            "\ufeffsubject,prompt,target_new,target_true,neighborhood_prompts,note\n"
            "Ada Lovelace,{} was born in,Paris,London,Byron was born in | Babbage was born in,ignored\n"
            'Alan Turing,"{}, a mathematician, worked in",Berlin,,,\n'
        ),
    )
    df = load(path)
    assert df["id"].to_list() == ["row:0", "row:1"]
    assert df["prompt"][1] == "{}, a mathematician, worked in"
    assert df["target_true"].to_list() == ["London", None]
    assert df["neighborhood_prompts"].to_list() == [["Byron was born in", "Babbage was born in"], []]


def test_same_fact_same_hash_across_formats_and_stable(tmp_path: Path) -> None:
    a = load(jsonl(tmp_path / "a.jsonl", [USER_FACT]))
    b = load(
        write(
            tmp_path / "b.csv", "id,subject,prompt,target_new,target_true\nx,Ada Lovelace,{} was born in,Paris,London\n"
        )
    )
    assert a["content_hash"][0] == b["content_hash"][0]
    assert (a["id"][0], b["id"][0]) == ("row:0", "x")
    assert dataset_hash(a) != dataset_hash(b)  # the ids differ
    again = load(tmp_path / "a.jsonl")
    assert again.equals(a) and dataset_hash(again) == dataset_hash(a)


def test_dataset_hash_follows_content_and_order(tmp_path: Path) -> None:
    other = {**USER_FACT, "subject": "Alan Turing"}
    base = load(jsonl(tmp_path / "a.jsonl", [{"id": "a", **USER_FACT}, {"id": "b", **other}]))
    edited = load(jsonl(tmp_path / "b.jsonl", [{"id": "a", **USER_FACT}, {"id": "b", **other, "target_new": "Rome"}]))
    assert base["content_hash"][0] == edited["content_hash"][0] and base["content_hash"][1] != edited["content_hash"][1]
    assert len({dataset_hash(base), dataset_hash(edited), dataset_hash(base.reverse())}) == 3


def test_n_facts_keeps_the_first_records() -> None:
    assert load(ZSRE, n_facts=5)["id"].to_list() == [f"zsre:{i}" for i in range(5)]


def test_every_zsre_record_loads() -> None:
    """With MEMIT's target (answers[0]) no record is a no-op edit: all 837 pass validation."""
    assert load(ZSRE, n_facts=0).height == 837
    assert load(ZSRE).height == 837


def test_generation_prompts_match_the_whole_subject() -> None:
    index = generation_index(
        [
            "Paris is the home of",
            "The mayor of Paris said",
            "Parisian food is",
            "Paris's river is",
            "Paris_2 is",
            "Paris Hilton works for",
            "Lyon is",
        ]
    )
    assert prompts_for_subject("Paris", index) == [
        "Paris is the home of",
        "The mayor of Paris said",
        "Paris's river is",
        "Paris Hilton works for",
    ]
    assert prompts_for_subject("Paris Hilton", index) == ["Paris Hilton works for"]
    assert prompts_for_subject("Marseille", index) == []
    assert prompts_for_subject("$9.99", generation_index(["$9.99 originates from", "$9.999 is"])) == [
        "$9.99 originates from"
    ]


# --- read errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.json")
    assert "not found" in message and "nope.json" in message and "data.edit_dataset" in message


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "cf.json", '[\n  {"case_id": 0,\n   "prompt": "x"\n  ,,\n]')
    message = error_of(path)
    assert "malformed JSON at line 4" in message and "cf.json" in message


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "facts.jsonl", json.dumps(USER_FACT) + "\n\n" + '{"subject": "x",\n')
    assert "malformed JSON on line 3" in error_of(path)


def test_non_utf8_names_the_byte_offset(tmp_path: Path) -> None:
    path = write(tmp_path / "facts.jsonl", json.dumps(USER_FACT).encode() + b'\n{"subject": "Andr\xe9"}\n')
    offset = len(json.dumps(USER_FACT)) + 1 + len('{"subject": "Andr')
    message = error_of(path)
    assert f"byte 0xe9 at byte offset {offset} (line 2)" in message and "UTF-8" in message


def test_csv_missing_required_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "facts.csv", "subject,prompt\nAda Lovelace,{} was born in\n")
    message = error_of(path)
    assert "missing required column(s) target_new" in message and "facts.csv" in message


def test_csv_row_with_too_many_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "facts.csv", "subject,prompt,target_new\nAda,{} was born in,Paris,France\n")
    assert "line 2 has more fields than the header" in error_of(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"case_id": 0}', "top-level JSON value is an object, expected a list"),
        ('"just text"', "top-level JSON value is a string"),
        ('[{"src": "a", "alt": "b"}, ["not", "a", "record"]]', "record 1 is a list, expected an object"),
        ("[]", "holds no records"),
    ],
)
def test_wrong_json_shape(tmp_path: Path, content: str, expected: str) -> None:
    assert expected in error_of(write(tmp_path / "data.json", content))


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    assert "line 2 is a list, expected an object" in error_of(
        write(tmp_path / "f.jsonl", json.dumps(USER_FACT) + "\n[1]\n")
    )


def test_unknown_or_undetectable_format(tmp_path: Path) -> None:
    path = write(tmp_path / "facts.json", json.dumps([USER_FACT]))
    assert "unknown data.format 'parquet'" in error_of(path, "parquet")
    assert "cannot tell which dataset shape" in error_of(path)
    assert "cannot tell the format from the extension '.txt'" in error_of(write(tmp_path / "facts.txt", "x"))


def test_non_string_values_name_row_and_field(tmp_path: Path) -> None:
    records = [USER_FACT, {**USER_FACT, "target_new": 1990}, {**USER_FACT, "paraphrase_prompts": ["ok", None]}]
    message = error_of(jsonl(tmp_path / "facts.jsonl", records))
    assert "2 value(s) of the wrong type" in message
    assert "#1 row:1: target_new is int" in message and "#2 row:2: paraphrase_prompts[1] is null" in message


def test_non_string_in_a_known_shape(tmp_path: Path) -> None:
    record = {**MEMIT_RECORD, "requested_rewrite": {**MEMIT_RECORD["requested_rewrite"], "subject": ["Danielle"]}}
    assert "#0 counterfact:7: subject is a list" in error_of(write(tmp_path / "cf.json", json.dumps([record])))


def test_missing_generation_prompts_file(tmp_path: Path) -> None:
    message = error_of(COMPACT, n_facts=1, generation_prompts=str(tmp_path / "gen.json"))
    assert "generation prompts file not found" in message and "data.generation_prompts" in message
