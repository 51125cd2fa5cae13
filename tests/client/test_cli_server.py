"""The `loraplex` client commands against a real server: output, --json, exit codes, messages.

Most tests call `client.cli.main(argv)` in-process (the same code the console
script runs); one runs the installed entry point (`python -m server.cli`) as a
subprocess to cover the delegation from `loraplex` to the client.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from client import Client
from client.cli import main
from tests.client.server_fixtures import KEY, peft_dir, server_url, train_file  # noqa: F401
from tests.harness import REPO_ROOT

PROMPT = "Once upon a time"


@pytest.fixture
def cli(server_url: str, capsys: pytest.CaptureFixture):
    """Run one command against the test server; returns (exit code, stdout, stderr)."""

    def run(*argv: str, key: str | None = KEY) -> tuple[int, str, str]:
        auth = ["--api-key", key] if key else []
        code = main([*argv, "--url", server_url, *auth])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_generate_human_json_and_stream_agree(cli, server_url: str) -> None:
    with Client(server_url, KEY) as c:
        expected = c.generate(PROMPT, max_new_tokens=8, temperature=0).text
    code, out, _ = cli("generate", "--max-new-tokens", "8", "--temperature", "0", PROMPT)
    assert code == 0 and out == expected + "\n"
    code, out, _ = cli("generate", "--json", "--max-new-tokens", "8", "--temperature", "0", PROMPT)
    record = json.loads(out)
    assert code == 0 and record["text"] == expected and record["usage"]["completion_tokens"] > 0
    code, out, _ = cli("generate", "--stream", "--max-new-tokens", "8", "--temperature", "0", PROMPT)
    assert code == 0 and out == expected + "\n"
    code, out, _ = cli("generate", "--stream", "--json", "--max-new-tokens", "8", "--temperature", "0", PROMPT)
    events = [json.loads(line) for line in out.splitlines()]
    assert "".join(e["text"] for e in events[:-1]) == expected == events[-1]["text"]
    assert events[-1]["finish_reason"] in ("stop", "length")


def test_errors_print_the_server_message_and_exit_nonzero(cli) -> None:
    code, out, err = cli("generate", "--adapter", "ghost-adapter", PROMPT)
    assert code == 5 and out == "" and "ghost-adapter" in err and "404" in err
    code, _, err = cli("generate", "--max-new-tokens", "-3", PROMPT)
    assert code == 6 and "max_new_tokens" in err
    code, _, err = cli("adapters", "list", key="not-a-valid-key-1")
    assert code == 4 and "401" in err
    code, _, err = cli("adapters", "show", "Bad/Id")
    assert code in (5, 6) and err.startswith("error:")
    code, _, err = cli("jobs", "show", "no-such-job")
    assert code == 5 and "no-such-job" in err


def test_unreachable_server_and_usage_errors() -> None:
    assert main(["generate", "--url", "http://127.0.0.1:9", "hi"]) == 3
    assert main(["adapters", "frobnicate"]) == 2
    assert main(["--help"]) == 0


def test_adapters_upload_list_show_delete(cli, peft_dir: Path) -> None:
    code, out, _ = cli("adapters", "upload", "cli-lora", str(peft_dir), "--json")
    assert code == 0 and json.loads(out)["id"] == "cli-lora" and json.loads(out)["type"] == "lora"
    code, out, _ = cli("adapters", "list")
    header, *rows = out.splitlines()
    assert code == 0 and header.split()[:3] == ["ID", "TENANT", "TYPE"]
    assert any(r.split()[0] == "cli-lora" for r in rows)
    code, out, _ = cli("adapters", "list", "--json")
    assert "cli-lora" in [a["id"] for a in json.loads(out)]
    code, out, _ = cli("adapters", "show", "cli-lora")
    assert code == 0 and "sha256" in out and "q_proj" in out
    code, out, _ = cli("adapters", "delete", "cli-lora")
    assert code == 0 and "deleted cli-lora" in out
    code, _, err = cli("adapters", "show", "cli-lora")
    assert code == 5 and "cli-lora" in err


def test_adapters_merge_unmerge(cli, peft_dir: Path) -> None:
    assert cli("adapters", "upload", "cli-merge", str(peft_dir))[0] == 0
    code, out, err = cli("adapters", "merge", "cli-merge", "--json")
    assert code == 0, err
    assert json.loads(out)["mode"] == "merged"
    code, out, err = cli("adapters", "unmerge", "cli-merge", "--json")
    assert code == 0 and json.loads(out)["mode"] == "unmerged", err
    assert cli("adapters", "delete", "cli-merge")[0] == 0


def test_train_wait_shows_progress_and_prints_the_adapter_id(cli, train_file: Path) -> None:
    code, out, err = cli("train", "--adapter-id", "cli-trained", "--method", "lora", "--data", str(train_file),
                         "--rank", "4", "--steps", "3", "--lr", "1e-2", "--batch-size", "2",
                         "--target-modules", "q_proj,v_proj", "--wait", "--poll-interval", "0.1")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "cli-trained"
    assert "step 3/3" in err and "loss" in err
    code, out, _ = cli("jobs", "list", "--json")
    jobs = json.loads(out)
    assert any(j["adapter_id"] == "cli-trained" and j["status"] == "succeeded" for j in jobs)
    code, out, _ = cli("jobs", "show", jobs[0]["id"])
    assert code == 0 and "status" in out
    code, out, _ = cli("jobs", "list")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["ID", "ADAPTER"]


def test_train_then_cancel(cli, train_file: Path) -> None:
    code, out, err = cli("train", "--adapter-id", "cli-cancel", "--data", str(train_file), "--steps", "5000",
                         "--json")
    assert code == 0, err
    job_id = json.loads(out)["id"]
    code, out, err = cli("jobs", "cancel", job_id)
    assert code == 0 and job_id in out, err


def test_bad_training_data_is_a_clean_error(cli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\nnot json\n')
    code, _, err = cli("train", "--adapter-id", "cli-bad", "--data", str(bad))
    assert code == 6 and err.startswith("error:")
    code, _, err = cli("train", "--adapter-id", "cli-bad", "--data", str(tmp_path / "missing.jsonl"))
    assert code == 6 and "cannot read" in err


def test_loraplex_entry_point_delegates_to_the_client(server_url: str) -> None:
    base = [sys.executable, "-m", "server.cli"]
    env_args = ["--url", server_url, "--api-key", KEY]
    ok = subprocess.run([*base, "generate", *env_args, "--json", "--max-new-tokens", "4", PROMPT],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["usage"]["completion_tokens"] > 0
    bad = subprocess.run([*base, "generate", *env_args, "--adapter", "ghost", PROMPT],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 5 and "ghost" in bad.stderr


def test_generate_decoding_flags(cli, tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"enum": ["on", "off"]}))
    code, out, _ = cli("generate", "--json", "--json-schema", f"@{schema}", "--max-new-tokens", "8", PROMPT)
    assert code == 0 and json.loads(json.loads(out)["text"]) in ("on", "off")
    code, out, _ = cli("generate", "--json", "--logprobs", "1", "--max-new-tokens", "3", "--temperature", "1",
                       "-n", "2", "--seed", "4", "--frequency-penalty", "1", "--presence-penalty", "0.5",
                       "--repetition-penalty", "1.2", "--logit-bias", "665=5", "--min-tokens", "1",
                       "--stop-token-id", "2", "--ignore-eos", PROMPT)
    record = json.loads(out)
    assert code == 0 and len(record["choices"]) == 2 and len(record["logprobs"]) == 3
    code, out, _ = cli("generate", "-n", "2", "--temperature", "2", "--seed", "1", "--max-new-tokens", "3", PROMPT)
    assert code == 0 and out.startswith("[0] ") and "\n[1] " in out
    code, out, err = cli("generate", "--choice", "a", "--regex", "b", PROMPT)
    assert code != 0
    code, _, err = cli("generate", "--logit-bias", "the=1", PROMPT)
    assert code != 0 and "TOKEN_ID=BIAS" in err
