"""mixgrpo.data: reading, cleaning, great-expectations validation, split, embeddings, publishing.

Local files and a real SeaweedFS S3 server (no mocks)."""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mixgrpo.data import (
    DataError,
    PrepareSettings,
    PromptValidationError,
    clean_prompts,
    load_prepared_embeddings,
    load_prepared_prompts,
    prepare_prompts,
    read_prompts,
    split_prompts,
    validate_prompts,
)
from mixgrpo.storage import MANIFEST_NAME, open_store, read_manifest
from services import S3Endpoint

PROMPTS = [f"a {colour} {shape} on a plain background" for colour in ("red", "green", "blue", "black", "white")
           for shape in ("circle", "square", "star", "cross")]  # 20 distinct prompts


def write_txt(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_format(path: Path, fmt: str, prompts: list[str], column: str = "prompt") -> str:
    """``prompts`` in one of the input formats, with an extra column beside the prompt column."""
    rows = [{"id": i, column: p} for i, p in enumerate(prompts)]
    if fmt == "txt":
        return write_txt(path, prompts)
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, ["id", column], delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "parquet":
        pq.write_table(pa.table({"id": [r["id"] for r in rows], column: prompts}), path)
    return str(path)


@pytest.fixture
def s3_env(s3_server: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


# --------------------------------------------------------------------------- happy path


def test_prepare_txt_publishes_split_report_and_manifest(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "prompts.txt", PROMPTS)
    out = tmp_path / "prepared"
    report_dir = tmp_path / "report"
    result = prepare_prompts(src, str(out), test_count=4, seed=3, min_rows=10, report_dir=report_dir)

    assert (result.n_input, result.n_train, result.n_test) == (21, 16, 4)  # 21 lines: the trailing newline
    assert result.dropped["empty"] == 1 and sum(result.dropped.values()) == 1
    train, test = load_prepared_prompts(str(out), "train"), load_prepared_prompts(str(out), "test")
    assert len(test) == 4 and not set(train) & set(test) and sorted(train + test) == sorted(PROMPTS)
    assert train == [p for p in PROMPTS if p in train]  # input order kept
    manifest = read_manifest(str(out))
    assert {f.path for f in manifest.files} == {"train.txt", "test.txt", "report.md", "validation.json"}
    assert manifest.metadata["counts"] == {"input": 21, "train": 16, "test": 4}
    assert manifest.metadata["kind"] == "mixgrpo-prompts/1" and manifest.metadata["source"] == src
    report = (report_dir / "report.md").read_text()
    assert "PASSED" in report and "train 16, test 4" in report
    assert json.loads((out / "validation.json").read_text())["success"] is True


def test_dataset_hash_is_stable_and_follows_content(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "prompts.txt", PROMPTS)
    first = prepare_prompts(src, str(tmp_path / "a"), min_rows=10)
    again = prepare_prompts(src, str(tmp_path / "b"), min_rows=10)
    other_seed = prepare_prompts(src, str(tmp_path / "c"), min_rows=10, seed=1)
    assert first.dataset_hash == again.dataset_hash
    assert other_seed.dataset_hash != first.dataset_hash
    assert load_prepared_prompts(str(tmp_path / "c"), "test") != load_prepared_prompts(str(tmp_path / "a"), "test")


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "json", "parquet"])
def test_every_format_gives_the_same_split(tmp_path: Path, fmt: str) -> None:
    src = write_format(tmp_path / f"prompts.{fmt}", fmt, PROMPTS)
    result = prepare_prompts(src, str(tmp_path / "out"), min_rows=10, test_count=5)
    reference = split_prompts(PROMPTS, PrepareSettings(min_rows=10, test_count=5))
    assert result.column == "prompt"
    assert load_prepared_prompts(str(tmp_path / "out"), "train") == reference["train"]
    assert load_prepared_prompts(str(tmp_path / "out"), "test") == reference["test"]


def test_json_list_of_strings_and_quoted_csv_cells(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps(PROMPTS[:3]))
    assert read_prompts(str(tmp_path / "p.json")).values == PROMPTS[:3]
    (tmp_path / "p.csv").write_text('prompt,id\n"a cat, sitting",1\n"a dog\non two lines",2\n')
    raw = read_prompts(str(tmp_path / "p.csv"))
    assert raw.values == ["a cat, sitting", "a dog\non two lines"] and raw.locations == [1, 2]
    assert clean_prompts(raw, PrepareSettings()).prompts == ["a cat, sitting", "a dog on two lines"]


@pytest.mark.parametrize("column", ["caption", "text"])
def test_prompt_column_is_auto_detected(tmp_path: Path, column: str) -> None:
    raw = read_prompts(write_format(tmp_path / "p.jsonl", "jsonl", PROMPTS, column=column))
    assert raw.column == column and raw.values == PROMPTS and raw.unit == "line"


def test_explicit_column_wins(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("prompt,long_caption\nshort one,a much longer caption\n")
    assert read_prompts(str(tmp_path / "p.csv"), PrepareSettings(column="long_caption")).values == [
        "a much longer caption"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_wrong_column_lists_the_available_ones(tmp_path: Path, fmt: str) -> None:
    src = write_format(tmp_path / f"p.{fmt}", fmt, PROMPTS, column="caption")
    with pytest.raises(DataError, match=r"column 'prompts' is not in .*p\.\w+; available columns: 'id', 'caption'"):
        prepare_prompts(src, str(tmp_path / "out"), column="prompts")


def test_no_prompt_column_says_which_to_set(tmp_path: Path) -> None:
    src = write_format(tmp_path / "p.csv", "csv", PROMPTS, column="description")
    with pytest.raises(DataError, match=r"none of the prompt columns .*available columns: 'id', 'description'"):
        prepare_prompts(src, str(tmp_path / "out"))


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file_is_named(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "empty.txt").write_bytes(content)
    with pytest.raises(DataError, match=r"prompt input .*empty\.txt is empty"):
        prepare_prompts(str(tmp_path / "empty.txt"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_csv_with_only_empty_prompts_says_nothing_usable(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,prompt\n1,\n2,   \n")
    with pytest.raises(DataError, match=r"p\.csv has no usable prompt in column 'prompt' .*2 empty or missing"):
        prepare_prompts(str(tmp_path / "p.csv"), str(tmp_path / "out"))


def test_file_of_duplicates_fails_the_row_count_with_a_report(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "dups.txt", ["a red circle"] * 30 + ["  a red   circle "] * 5)
    out = tmp_path / "out"
    with pytest.raises(PromptValidationError) as info:
        prepare_prompts(src, str(out))
    message = str(info.value)
    assert "dups.txt" in message and "34 duplicate of an earlier prompt" in message
    assert "expect_table_row_count_to_be_between (at least 16 prompts): 1 rows" in message
    assert not (out / MANIFEST_NAME).exists()  # nothing published
    report = json.loads((out / "validation-failed" / "validation.json").read_text())
    assert report["success"] is False and report["dropped"]["duplicate"] == 34
    assert report["dropped_examples"]["duplicate"][0] == {"location": 2, "value": "a red circle", "first": 1}
    assert info.value.report_uri == (out / "validation-failed" / "report.md").as_uri()


def test_binary_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + os.urandom(200))
    with pytest.raises(DataError, match=r"weights\.txt looks binary \(NUL byte at offset 8\)"):
        prepare_prompts(str(tmp_path / "weights.txt"), str(tmp_path / "out"))


def test_non_utf8_text_says_where(tmp_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("a café on a street\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(byte 0xe9 at offset 5\)"):
        read_prompts(str(tmp_path / "latin1.txt"))


def test_fake_parquet_is_named(tmp_path: Path) -> None:
    (tmp_path / "p.parquet").write_text("prompt\na cat\n")
    with pytest.raises(DataError, match=r"p\.parquet is not a Parquet file"):
        read_prompts(str(tmp_path / "p.parquet"))


def test_missing_local_uri_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"prompt input .*nope\.txt does not exist"):
        prepare_prompts(str(tmp_path / "nope.txt"), str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"prompt input .*nope\.csv does not exist"):
        prepare_prompts((tmp_path / "nope.csv").as_uri(), str(tmp_path / "out"))
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"cannot tell the format of .*p\.xlsx .*\.parquet.*or set input_format"):
        read_prompts(str(tmp_path / "p.xlsx"))
    with pytest.raises(DataError, match=r"is a directory"):
        read_prompts(str(tmp_path), PrepareSettings(input_format="txt"))


def test_malformed_jsonl_and_non_string_values_name_the_line(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog",}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: not valid JSON"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": 42}\n')
    with pytest.raises(DataError, match=r"num\.jsonl line 2: column 'prompt' holds a int \(42\)"):
        read_prompts(str(tmp_path / "num.jsonl"))
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"column 'prompt' of .*ints\.parquet has type int64"):
        read_prompts(str(tmp_path / "ints.parquet"))


# --------------------------------------------------------------------------- cleaning


def test_cleaning_folds_whitespace_dedupes_and_bounds_length() -> None:
    settings = PrepareSettings(min_chars=5, max_chars=30)
    from mixgrpo.data import RawPrompts

    raw = RawPrompts("mem", "prompt", "row", [1, 2, 3, 4, 5, 6, 7],
                     ["  a red\tcircle ", "a red circle", "tiny", "x" * 31, None, "a blue\r\nsquare", "a red circle"])
    cleaned = clean_prompts(raw, settings)
    assert cleaned.prompts == ["a red circle", "a blue square"] and cleaned.locations == [1, 6]
    assert cleaned.dropped == {"empty": 1, "cjk": 0, "too_short": 1, "too_long": 1, "control_chars": 0,
                               "duplicate": 2}
    assert [ex["location"] for ex in cleaned.examples["duplicate"]] == [2, 7]


def test_cjk_prompts_are_dropped_as_the_reference_does(tmp_path: Path) -> None:
    cjk = ["一只红色的猫", "a cat named 小白", "ねこ on a mat", "고양이 portrait", "a cat，sitting"]
    src = write_txt(tmp_path / "p.txt", PROMPTS + cjk)
    result = prepare_prompts(src, str(tmp_path / "out"), min_rows=10)
    assert result.dropped["cjk"] == len(cjk)
    kept = load_prepared_prompts(str(tmp_path / "out"), "train") + load_prepared_prompts(str(tmp_path / "out"), "test")
    assert sorted(kept) == sorted(PROMPTS)
    assert "line 21: `一只红色的猫`" in (tmp_path / "out" / "report.md").read_text()
    kept_all = prepare_prompts(src, str(tmp_path / "out2"), min_rows=10, drop_cjk=False)
    assert kept_all.dropped["cjk"] == 0 and kept_all.n_train + kept_all.n_test == len(PROMPTS) + len(cjk)


def test_control_characters_fail_the_suite_naming_the_lines(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "p.txt", PROMPTS[:10] + ["a cat\x07 beeping", "escape \x1b[31mred"] + PROMPTS[10:])
    out = tmp_path / "out"
    with pytest.raises(PromptValidationError) as info:
        prepare_prompts(src, str(out), report_dir=tmp_path / "report")
    message = str(info.value)
    assert "1 of 5 expectations failed" in message
    assert "expect_column_values_to_not_match_regex (no control characters): 2 lines unexpected" in message
    assert "line 11: 'a cat\\x07 beeping'" in message and "line 12:" in message
    failed = [e for e in info.value.report.expectations if not e.success]
    assert [(e.expectation, e.observed, [x["location"] for x in e.examples]) for e in failed] == [
        ("expect_column_values_to_not_match_regex", 2, [11, 12])]
    report_md = (tmp_path / "report" / "report.md").read_text()
    assert "FAILED" in report_md and "| `expect_column_values_to_not_match_regex` | no control characters | **FAIL**" \
        in report_md
    assert "- line 11: `a cat\\x07 beeping`" in report_md
    saved = json.loads((out / "validation-failed" / "validation.json").read_text())
    assert saved == json.loads((tmp_path / "report" / "validation.json").read_text())
    assert not (out / MANIFEST_NAME).exists()

    result = prepare_prompts(src, str(out), drop_control_chars=True)
    assert result.dropped["control_chars"] == 2 and (out / MANIFEST_NAME).exists()
    assert not (out / "validation-failed").exists()  # the stale failure report is gone after a good publish


def test_suite_reports_every_expectation_with_rows() -> None:
    settings = PrepareSettings(min_chars=3, max_chars=10, min_rows=8, max_examples=3)
    prompts = ["a cat", "a cat", None, "xy", "much too long prompt", "bell\x07", "ok dog"]
    outcomes = {o.expectation: o for o in validate_prompts(prompts, [10, 20, 30, 40, 50, 60, 70], settings)}
    assert {k: o.success for k, o in outcomes.items()} == {
        "expect_column_values_to_not_be_null": False,
        "expect_column_values_to_be_unique": False,
        "expect_column_value_lengths_to_be_between": False,
        "expect_column_values_to_not_match_regex": False,
        "expect_table_row_count_to_be_between": False,
    }
    assert outcomes["expect_column_values_to_not_be_null"].examples == [{"location": 30, "value": None}]
    assert [x["location"] for x in outcomes["expect_column_values_to_be_unique"].examples] == [10, 20]
    assert [x["location"] for x in outcomes["expect_column_value_lengths_to_be_between"].examples] == [40, 50]
    assert outcomes["expect_column_values_to_not_match_regex"].examples == [{"location": 60, "value": "bell\x07"}]
    assert outcomes["expect_table_row_count_to_be_between"].observed == 7
    clean = validate_prompts(["a cat", "a dog"], [1, 2], PrepareSettings(min_rows=2))
    assert all(o.success for o in clean)


# --------------------------------------------------------------------------- split and embeddings


def test_split_settings_are_checked(tmp_path: Path) -> None:
    assert PrepareSettings().test_size(100) == 10
    assert PrepareSettings(test_fraction=0.25).test_size(100) == 25
    assert PrepareSettings(test_count=400).test_size(50_000) == 400
    with pytest.raises(DataError, match="not both"):
        PrepareSettings(test_count=3, test_fraction=0.1)
    with pytest.raises(DataError, match="leaves none to train on"):
        PrepareSettings(test_count=20).test_size(20)
    with pytest.raises(DataError, match="min_chars=9, max_chars=5"):
        PrepareSettings(min_chars=9, max_chars=5)
    with pytest.raises(DataError, match="settings or keyword options"):
        prepare_prompts("x.txt", str(tmp_path), settings=PrepareSettings(), seed=1)
    a = split_prompts(PROMPTS, PrepareSettings(seed=7, test_count=5))
    assert a == split_prompts(PROMPTS, PrepareSettings(seed=7, test_count=5))
    assert a != split_prompts(PROMPTS, PrepareSettings(seed=8, test_count=5))


def fake_embed(prompts: list[str]) -> dict[str, torch.Tensor]:
    """A deterministic stand-in text encoder: one row per prompt, values from the prompt's length."""
    lengths = torch.tensor([float(len(p)) for p in prompts])
    return {"pooled": lengths[:, None].repeat(1, 4), "tokens": lengths[:, None, None].repeat(1, 3, 2)}


def test_embeddings_are_sharded_and_load_back_in_order(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "p.txt", PROMPTS)
    out = tmp_path / "out"
    result = prepare_prompts(src, str(out), min_rows=10, test_count=5, embed_fn=fake_embed, shard_size=4)
    assert result.embedding_shards == 4 + 2  # 15 train prompts in 4 shards, 5 test prompts in 2
    files = sorted(f.path for f in read_manifest(str(out)).files if f.path.startswith("embeddings/"))
    assert files[0] == "embeddings/test-00000.safetensors" and files[-1] == "embeddings/train-00003.safetensors"
    for split in ("train", "test"):
        loaded = load_prepared_embeddings(str(out), split)
        expected = fake_embed(load_prepared_prompts(str(out), split))
        assert loaded.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(loaded[key], expected[key])


def test_bad_embed_fn_output_is_named(tmp_path: Path) -> None:
    src = write_txt(tmp_path / "p.txt", PROMPTS)
    with pytest.raises(DataError, match=r"embed_fn on train prompts 0\.\.3: 'pooled' is \(1, 4\); expected a Tensor "
                                        r"with first dimension 4"):
        prepare_prompts(src, str(tmp_path / "out"), min_rows=10, shard_size=4,
                        embed_fn=lambda ps: {"pooled": torch.zeros(1, 4)})
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    prepare_prompts(src, str(tmp_path / "out"), min_rows=10)
    with pytest.raises(DataError, match="has no embeddings for split 'train'"):
        load_prepared_embeddings(str(tmp_path / "out"), "train")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_prepared_prompts(str(tmp_path / "out"), "dev")


# --------------------------------------------------------------------------- S3


@pytest.mark.integration
@pytest.mark.parametrize("fmt", ["txt", "parquet"])
def test_s3_input_and_output(s3_env: S3Endpoint, tmp_path: Path, fmt: str) -> None:
    prefix = f"s3://{s3_env.bucket}/data-{uuid.uuid4().hex[:8]}"
    local = write_format(tmp_path / f"prompts.{fmt}", fmt, PROMPTS)
    open_store(prefix).put_file(local, f"raw/prompts.{fmt}")
    out = f"{prefix}/prepared"
    result = prepare_prompts(f"{prefix}/raw/prompts.{fmt}", out, min_rows=10, test_count=4, embed_fn=fake_embed)
    assert (result.n_train, result.n_test, result.embedding_shards) == (16, 4, 2)
    assert sorted(load_prepared_prompts(out, "train") + load_prepared_prompts(out, "test")) == sorted(PROMPTS)
    assert load_prepared_embeddings(out, "test")["pooled"].shape == (4, 4)
    keys = open_store(out).list()
    assert MANIFEST_NAME in keys and "report.md" in keys and "embeddings/train-00000.safetensors" in keys


@pytest.mark.integration
def test_s3_missing_object_and_failure_report(s3_env: S3Endpoint, tmp_path: Path) -> None:
    prefix = f"s3://{s3_env.bucket}/data-{uuid.uuid4().hex[:8]}"
    with pytest.raises(DataError, match=rf"prompt input {prefix}/nope\.txt does not exist"):
        prepare_prompts(f"{prefix}/nope.txt", f"{prefix}/out")
    open_store(prefix).put_bytes("few.txt", b"a red circle\na blue square\n")
    with pytest.raises(PromptValidationError, match="at least 16 prompts") as info:
        prepare_prompts(f"{prefix}/few.txt", f"{prefix}/out")
    assert info.value.report_uri == f"{prefix}/out/validation-failed/report.md"
    store = open_store(f"{prefix}/out")
    assert b"**FAIL**" in store.get_bytes("validation-failed/report.md")
    assert not store.exists(MANIFEST_NAME)
