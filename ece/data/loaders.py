"""Load an edit dataset of any supported shape into the canonical edit table.

One row per fact, in dataset order, with the columns and dtypes of `SCHEMA`. Shapes (`data.format`;
`auto` decides from the extension and, for .json, from the keys of the first record):

- counterfact: MEMIT's multi_counterfact.json (case_id, requested_rewrite{prompt, subject,
  target_new{str}, target_true{str}}, paraphrase_prompts, neighborhood_prompts, generation_prompts).
- counterfact_compact: the EasyEdit shape (case_id, prompt with the subject written out, subject,
  target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth).
- zsre: MEMIT's zsRE schema (subject, src, alt, answers, rephrase, loc, loc_ans).
- jsonl / csv: a user's own facts, one per line / row, with these columns (others are ignored):

  ====================  ========  ===========================================================
  id                    optional  unique id; without an id column rows get "row:<index>"
  subject               required  the entity whose fact changes, e.g. "Danielle Darrieux"
  prompt                required  the relation with exactly one "{}" for the subject
  target_new            required  the new object, e.g. "English"
  target_true           optional  the object the model should forget
  paraphrase_prompts    optional  full texts with the subject written out
  neighborhood_prompts  optional  full texts about other subjects that must keep their answer
  neighborhood_target   optional  their expected answer when it is not target_true
  generation_prompts    optional  full texts to sample from for fluency/consistency
  ====================  ========  ===========================================================

  List columns are JSON lists of strings in JSONL (a single string counts as a one-item list) and
  one `|`-separated string in CSV. Empty CSV cells count as missing.

Records without generation prompts of their own get those of `data.generation_prompts` (a JSON list
of strings) that mention the subject as a whole phrase.

Reading fails with an EceError naming the file, the place and the fix (missing file, bad bytes,
malformed JSON/CSV, wrong shape, non-string values); rules on the content (one "{}" per prompt, ...)
are checked afterwards by `ece.data.validation`, so that all content defects are listed at once.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from functools import partial
from io import StringIO
from pathlib import Path
from typing import Any

import polars as pl

from ece.config import FORMATS, DataCfg
from ece.data.io import sha256_bytes, sha256_json
from ece.errors import EceError

SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Utf8(),
    "subject": pl.Utf8(),
    "prompt": pl.Utf8(),
    "target_new": pl.Utf8(),
    "target_true": pl.Utf8(),
    "paraphrase_prompts": pl.List(pl.Utf8()),
    "neighborhood_prompts": pl.List(pl.Utf8()),
    "neighborhood_target": pl.Utf8(),
    "generation_prompts": pl.List(pl.Utf8()),
    "source": pl.Utf8(),
    "content_hash": pl.Utf8(),
}
TEXT_FIELDS = ("id", "subject", "prompt", "target_new", "target_true", "neighborhood_target")
LIST_FIELDS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")
HASHED_FIELDS = tuple(c for c in SCHEMA if c not in ("id", "source", "content_hash"))
REQUIRED_COLUMNS = ("subject", "prompt", "target_new")
LIST_SEPARATOR = "|"
MAX_LISTED = 20

Record = dict[str, Any]
_WORD = re.compile(r"\w+")
_COMPACT_KEYS = {"ground_truth", "rephrase_prompt", "locality_prompt"}
_FORMAT_HINT = f"set data.format to one of {', '.join(f for f in FORMATS if f != 'auto')}"


def load_edits(cfg: DataCfg) -> pl.DataFrame:
    """Read `cfg.edit_dataset` (first `cfg.n_facts` records when > 0) into the canonical table."""
    if cfg.format not in FORMATS:
        raise EceError(f"unknown data.format '{cfg.format}'", _FORMAT_HINT + " or auto")
    path = Path(cfg.edit_dataset)
    data = _read_bytes(path, "edit dataset", "data.edit_dataset")
    fmt, records = _parse(path, _decode(path, data), cfg.format)
    if cfg.n_facts > 0:
        records = records[: cfg.n_facts]
    if fmt in ("jsonl", "csv"):
        normalise = partial(_from_user, has_ids=any("id" in r for r in records))
    else:
        normalise = _NORMALISERS[fmt]
    rows = [normalise(i, rec) for i, rec in enumerate(records)]
    _check_types(path, rows)
    if cfg.generation_prompts and any(not r["generation_prompts"] for r in rows):
        index = generation_index(read_generation_prompts(Path(cfg.generation_prompts)))
        for row in rows:
            if not row["generation_prompts"] and row["subject"]:
                row["generation_prompts"] = prompts_for_subject(row["subject"], index)
    return _table(rows, f"{fmt}:{path.name}:{sha256_bytes(data)[:12]}")


def from_records(records: list[Record]) -> pl.DataFrame:
    """The canonical table of facts given in memory (the programmatic API): the user format's columns,
    a record without an id gets row:<i>. Validate it with ece.data.validation like a file."""
    has_ids = any("id" in r for r in records)
    rows = [_from_user(i, rec, has_ids) for i, rec in enumerate(records)]
    return _table(rows, f"records:{sha256_json(rows)[:12]}")


def _table(rows: list[Record], source: str) -> pl.DataFrame:
    rows = [row | {"source": source, "content_hash": content_hash(row)} for row in rows]
    return pl.DataFrame({c: [row[c] for row in rows] for c in SCHEMA}, schema=SCHEMA)


def content_hash(row: Record) -> str:
    """Hash of the fact itself (not its id or file), so the same fact hashes the same anywhere."""
    return sha256_json({k: row[k] for k in HASHED_FIELDS})


def dataset_hash(df: pl.DataFrame) -> str:
    """Hash of the ordered (id, content hash) pairs: changes with any fact, id or the order."""
    return sha256_json([list(p) for p in zip(df["id"].to_list(), df["content_hash"].to_list())])


def source_format(df: pl.DataFrame) -> str:
    """The format the table was read as (what `auto` resolved to): the first field of `source`."""
    return str(df["source"][0]).split(":", 1)[0]


def row_label(index: int, row_id: Any) -> str:
    """How reports name a row: '#<0-based index> <id>' (the index tells duplicate or empty ids apart)."""
    return f"#{index} {row_id}" if isinstance(row_id, str) and row_id.strip() else f"#{index}"


def generation_index(prompts: list[str]) -> dict[str, list[str]]:
    """Map each word to the prompts containing it; built once, so matching a subject is a lookup."""
    index: dict[str, list[str]] = {}
    for prompt in prompts:
        for word in dict.fromkeys(_WORD.findall(prompt)):
            index.setdefault(word, []).append(prompt)
    return index


def prompts_for_subject(subject: str, index: dict[str, list[str]]) -> list[str]:
    """Prompts that name `subject` as a whole phrase (not inside a longer word), in file order.

    Each word of the subject is then a word of the prompt, so the rarest one narrows the search.
    """
    words = _WORD.findall(subject)
    if not words:
        return []
    rarest = min(words, key=lambda w: len(index.get(w, ())))
    return [p for p in index.get(rarest, []) if _names(p, subject)]


def _names(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text` with no word character (regex \\w) right before or after it."""
    start = text.find(phrase)
    while start >= 0:
        end = start + len(phrase)
        if not (start > 0 and _is_word(text[start - 1])) and not (end < len(text) and _is_word(text[end])):
            return True
        start = text.find(phrase, start + 1)
    return False


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


# --- reading --------------------------------------------------------------------------------------


def read_generation_prompts(path: Path) -> list[str]:
    """The `data.generation_prompts` file: a JSON list of strings."""
    prompts = _load_json(path, _decode(path, _read_bytes(path, "generation prompts file", "data.generation_prompts")))
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise EceError(
            f"{path}: expected a JSON list of strings",
            "point data.generation_prompts at such a list, or set it to null",
        )
    return prompts


def _read_bytes(path: Path, what: str, key: str) -> bytes:
    if not path.is_file():
        raise EceError(
            f"{what} not found: {path}", f"set {key} to an existing file (paths are relative to the project root)"
        )
    return path.read_bytes()


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EceError(
            f"{path}: not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line})",
            "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`",
        ) from None
    return text.removeprefix("\ufeff")


def _parse(path: Path, text: str, declared: str) -> tuple[str, list[Record]]:
    """Resolve the format and return the raw records (each a dict)."""
    container = declared if declared in ("jsonl", "csv") else _container(path, declared)
    if container == "csv":
        records = _parse_csv(path, text)
    elif container == "jsonl":
        records = _parse_jsonl(path, text)
    else:
        records = _parse_json(path, text)
    if not records:
        raise EceError(f"{path}: the file holds no records", "add at least one fact")
    if container != "json":
        return container, records
    return (declared if declared != "auto" else _detect(path, records[0])), records


def _container(path: Path, declared: str) -> str:
    if declared != "auto":
        return "json"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".json"):
        return suffix[1:]
    raise EceError(
        f"{path}: cannot tell the format from the extension '{suffix}'",
        f"rename to .json/.jsonl/.csv or {_FORMAT_HINT}",
    )


def _detect(path: Path, first: Record) -> str:
    keys = set(first)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "alt"} <= keys:
        return "zsre"
    if {"prompt", "subject"} <= keys and keys & _COMPACT_KEYS:
        return "counterfact_compact"
    raise EceError(
        f"{path}: cannot tell which dataset shape this is from the keys of its first record {sorted(keys)}",
        f"{_FORMAT_HINT}; for your own facts use a .jsonl or .csv file (columns in data/README.md)",
    )


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EceError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            "fix the syntax there (`python -m json.tool FILE` points at it)",
        ) from None


def _parse_json(path: Path, text: str) -> list[Record]:
    value = _load_json(path, text)
    if not isinstance(value, list):
        raise EceError(
            f"{path}: the top-level JSON value is {_kind(value)}, expected a list of records",
            "wrap the records in [ ... ]",
        )
    for i, rec in enumerate(value):
        if not isinstance(rec, dict):
            raise EceError(
                f"{path}: record {i} is {_kind(rec)}, expected an object", "every list item must be a {...} record"
            )
    return value


def _parse_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EceError(
                f"{path}: malformed JSON on line {n}, column {exc.colno}: {exc.msg}",
                "each line must be one complete JSON object",
            ) from None
        if not isinstance(rec, dict):
            raise EceError(
                f"{path}: line {n} is {_kind(rec)}, expected an object", "each line must be one {...} record"
            )
        records.append(rec)
    return records


def _parse_csv(path: Path, text: str) -> list[Record]:
    reader = csv.DictReader(StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise EceError(
            f"{path}: CSV is missing required column(s) {', '.join(missing)}; its header is {header}",
            f"the first line must name at least {', '.join(REQUIRED_COLUMNS)} (columns in data/README.md)",
        )
    records = []
    try:
        for row in reader:
            if None in row:
                raise EceError(
                    f"{path}: line {reader.line_num} has more fields than the header",
                    "quote fields that contain commas",
                )
            records.append({k: _csv_cell(k, v) for k, v in row.items()})
    except csv.Error as exc:
        raise EceError(
            f"{path}: malformed CSV at line {reader.line_num}: {exc}", "check the quoting on that line"
        ) from None
    return records


def _csv_cell(column: str, value: str | None) -> Any:
    """An empty cell is missing; a list column holds `|`-separated texts."""
    if not value:
        return None
    return [part.strip() for part in value.split(LIST_SEPARATOR)] if column in LIST_FIELDS else value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


# --- normalising ----------------------------------------------------------------------------------


def _from_counterfact(i: int, rec: Record) -> Record:
    rw = rec.get("requested_rewrite")
    return {
        "id": _prefixed("counterfact", rec.get("case_id")),
        "subject": _dig(rw, "subject"),
        "prompt": _dig(rw, "prompt"),
        "target_new": _dig(rw, "target_new", "str"),
        "target_true": _dig(rw, "target_true", "str"),
        "paraphrase_prompts": _as_list(rec.get("paraphrase_prompts")),
        "neighborhood_prompts": _as_list(rec.get("neighborhood_prompts")),
        "neighborhood_target": None,
        "generation_prompts": _as_list(rec.get("generation_prompts")),
    }


def _from_compact(i: int, rec: Record) -> Record:
    subject = rec.get("subject")
    return {
        "id": _prefixed("counterfact", rec.get("case_id")),
        "subject": subject,
        "prompt": _template(rec.get("prompt"), subject),
        "target_new": rec.get("target_new"),
        "target_true": rec.get("ground_truth"),
        "paraphrase_prompts": _as_list(rec.get("rephrase_prompt")),
        "neighborhood_prompts": _as_list(rec.get("locality_prompt")),
        "neighborhood_target": rec.get("locality_ground_truth"),
        "generation_prompts": [],
    }


def _from_zsre(i: int, rec: Record) -> Record:
    """MEMIT's reading of a zsRE record (dsets/zsre.py, which AlphaEdit and ECE reuse): the edit writes
    `answers[0]` (not `alt`, EasyEdit's choice), there is no true object to compare with (scored by
    token accuracy), and the neighbourhood prompt is `loc` + "?" followed by `loc_ans`."""
    subject, answers = rec.get("subject"), rec.get("answers")
    loc = rec.get("loc")
    return {
        "id": f"zsre:{i}",
        "subject": subject,
        "prompt": _template(rec.get("src"), subject),
        "target_new": (answers[0] if answers else None) if isinstance(answers, list) else answers,
        "target_true": None,
        "paraphrase_prompts": _as_list(rec.get("rephrase")),
        "neighborhood_prompts": _as_list(loc + "?" if isinstance(loc, str) else loc),
        "neighborhood_target": rec.get("loc_ans"),
        "generation_prompts": [],
    }


def _from_user(i: int, rec: Record, has_ids: bool) -> Record:
    """Columns map one to one; integer ids are accepted as text, a file without ids gets row:<i>."""
    row = {k: rec.get(k) for k in TEXT_FIELDS} | {k: _as_list(rec.get(k)) for k in LIST_FIELDS}
    uid = row["id"]
    row["id"] = (str(uid) if _is_int(uid) else uid) if has_ids else f"row:{i}"
    return row


_NORMALISERS: dict[str, Callable[[int, Record], Record]] = {
    "counterfact": _from_counterfact,
    "counterfact_compact": _from_compact,
    "zsre": _from_zsre,
}


def _template(prompt: Any, subject: Any) -> Any:
    """Write the first occurrence of the subject as "{}"; a prompt without it is left for validation."""
    if isinstance(prompt, str) and isinstance(subject, str) and subject and subject in prompt:
        return prompt.replace(subject, "{}", 1)
    return prompt


def _prefixed(prefix: str, value: Any) -> Any:
    return f"{prefix}:{value}" if _is_int(value) or isinstance(value, str) else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dig(value: Any, *keys: str) -> Any:
    """Follow nested keys; a plain value where an object was expected is returned as is."""
    for key in keys:
        if not isinstance(value, dict):
            return value
        value = value.get(key)
    return value


def _as_list(value: Any) -> list[Any]:
    """None -> [], a single value (the compact/zsRE shapes hold one text) -> [value]; lists unchanged."""
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _check_types(path: Path, rows: list[Record]) -> None:
    """Refuse non-string values here, naming each one: the typed table could only fail or coerce them."""
    defects = []
    for i, row in enumerate(rows):
        label = row_label(i, row["id"])
        defects += [
            f"{label}: {k} is {_kind(row[k])}"
            for k in TEXT_FIELDS
            if row[k] is not None and not isinstance(row[k], str)
        ]
        defects += [
            f"{label}: {k}[{j}] is {_kind(e)}"
            for k in LIST_FIELDS
            for j, e in enumerate(row[k])
            if not isinstance(e, str)
        ]
    if defects:
        raise EceError(
            f"{path}: {len(defects)} value(s) of the wrong type (text fields must be strings, list fields lists of strings): "
            + "; ".join(defects[:MAX_LISTED])
            + (" ..." if len(defects) > MAX_LISTED else ""),
            'quote them as JSON strings, e.g. "1990" instead of 1990',
        )
