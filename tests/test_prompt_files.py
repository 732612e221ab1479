"""One prompt reader for the trainer's ``prompts=`` and prepare-prompts (issue 13, item 5): the formats,
duplicates, control characters, huge lines and non-UTF-8 files, all caught before training starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mixgrpo.data import DataError, PrepareSettings, read_prompts
from mixgrpo.train import load_prompts

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow star"]


def write(path: Path, fmt: str, prompts: list[str]) -> Path:
    if fmt == "txt":
        path.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    elif fmt == "csv":
        path.write_text("id,prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts)), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(prompts)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), path)
    return path


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_trainer_reads_every_format_as_prepare_prompts_does(tmp_path, fmt):
    path = write(tmp_path / f"prompts.{fmt}", fmt, PROMPTS)
    assert load_prompts(str(path), "train") == PROMPTS
    assert [v for v in read_prompts(str(path)).values if v] == PROMPTS          # the prepare-prompts reader agrees


def test_a_csv_is_not_read_as_plain_text(tmp_path):
    path = write(tmp_path / "prompts.csv", "csv", PROMPTS)
    prompts = load_prompts(str(path), "train")
    assert "id,prompt" not in prompts and not any(p.startswith("1,") for p in prompts)


def test_duplicates_are_reported_and_dropped(tmp_path, capsys):
    path = write(tmp_path / "prompts.txt", "txt", PROMPTS + [PROMPTS[0], PROMPTS[0]])
    assert load_prompts(str(path), "train") == PROMPTS
    assert f"prompt file {path}: dropped 2 duplicate prompt(s) (line 4 = line 1, line 5 = line 1)" in capsys.readouterr().out


def test_control_characters_fail_naming_file_and_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n{PROMPTS[1]}\na bell \x07 in a prompt\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: prompt has a control character '\\x07' at column 8"):
        load_prompts(str(path), "train")


def test_a_huge_line_fails_without_printing_it(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n" + "x" * 8_000_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        load_prompts(str(path), "train")
    message = str(error.value)
    assert message.startswith(f"{path}:2: prompt of 8000000 characters is longer than 500")
    assert len(message) < 500


def test_non_utf8_names_the_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a red circle\n\xff\xfe caf\xe9\n")
    with pytest.raises(DataError, match=rf"prompt input {path} is not UTF-8 text"):
        load_prompts(str(path), "train")


def test_bad_prompt_file_fails_before_training_starts(tmp_path):
    """`mixgrpo train prompts=...` stops with one line, before any model work or output."""
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPTS[0]}\n{PROMPTS[1]}\n\x1b[31mred\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "mixgrpo.cli", "train", f"prompts={path}",
                             f"output_dir={tmp_path / 'run'}", "max_iterations=1", "progress_bar=false"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"mixgrpo: error: {path}:3: prompt has a control character" in result.stderr
    assert not (tmp_path / "run").exists()


def test_prepare_report_never_holds_a_huge_prompt(tmp_path):
    from mixgrpo.data import clean_prompts

    raw = read_prompts(str(write(tmp_path / "p.txt", "txt", PROMPTS + ["y" * 100_000])))
    cleaned = clean_prompts(raw, PrepareSettings())
    assert cleaned.dropped["too_long"] == 1
    assert len(cleaned.examples["too_long"][0]["value"]) < 200
