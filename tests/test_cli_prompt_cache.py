"""`kvsqueeze generate --prompt-cache FILE` on the tiny random Llama of conftest.py: written on first use,
reused (same output, only the rest prefilled) when the prompt starts with its tokens, recomputed and
overwritten for another prompt, refused (exit 2, file kept) for another --kv or a damaged file."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsqueeze.cli import main
from kvsqueeze.integrations.prompt_cache import KIND
from kvsqueeze.storage.persist import read_file

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "The committee met on Tuesday to discuss the budget of the new library, the roads and the park. " * 8


def run(capsys, model_dir: Path, prompt: str, *flags: str) -> tuple[int, str, str]:
    argv = [
        "generate",
        prompt,
        "--model",
        str(model_dir),
        "--no-chat",
        "--max-new-tokens",
        "6",
        "--kv",
        "k4v4",
    ]
    try:
        code = main([*argv, *flags])
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.split())


def saved_tokens(path: Path) -> int:
    return len(read_file(path, KIND)[1]["token_ids"])


def test_prompt_cache_is_written_reused_extended_and_overwritten(tiny_llama_dir, tmp_path, capsys) -> None:
    path = tmp_path / "prompt.safetensors"
    code, first, err = run(capsys, tiny_llama_dir, TEXT, "--prompt-cache", str(path))
    assert code == 0 and "does not exist yet" in err and "saved" in err, err
    n = saved_tokens(path)
    assert n > 140  # every prompt token but the last: blocks of 64 left the window
    code, again, err = run(capsys, tiny_llama_dir, TEXT, "--prompt-cache", str(path))
    assert code == 0 and f"reusing {n} of the prompt's {n + 1} tokens" in err and "saved" not in err, err
    assert again == first and first.strip()  # the loaded cache continues exactly as the saved one
    code, _, err = run(capsys, tiny_llama_dir, TEXT + " Then they voted.", "--prompt-cache", str(path))
    assert code == 0 and f"reusing {n} of the prompt's" in err and "saved" in err, err
    assert saved_tokens(path) > n
    code, _, err = run(
        capsys, tiny_llama_dir, "A different prompt about the sea.", "--prompt-cache", str(path)
    )
    assert code == 0 and "holds another prompt (0 of its" in err and "overwriting the file" in err, err
    assert saved_tokens(path) < 10


def test_prompt_cache_of_another_config_or_damaged_is_refused_and_kept(
    tiny_llama_dir, tmp_path, capsys
) -> None:
    path = tmp_path / "prompt.safetensors"
    assert run(capsys, tiny_llama_dir, TEXT, "--prompt-cache", str(path))[0] == 0
    raw = path.read_bytes()
    code, _, err = run(capsys, tiny_llama_dir, TEXT, "--prompt-cache", str(path), "--kv", "int8")
    assert (
        code == 2 and "--prompt-cache: prompt cache file" in err and "another cache config: key.bits 4" in err
    )
    path.write_bytes(raw[:-10] + bytes(10))
    code, _, err = run(capsys, tiny_llama_dir, TEXT, "--prompt-cache", str(path))
    assert code == 2 and "checksum does not match" in err, err
    assert path.read_bytes() == raw[:-10] + bytes(10)  # a refused file is left as it is
    code, _, err = run(capsys, tiny_llama_dir, TEXT, "--prompt-cache", str(tmp_path))
    assert code == 2 and "--prompt-cache: " in err and "is a directory" in err
