"""``loraship run`` end to end: the real huggingface_hub client against a local Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import LLAMA, TOKENS, assert_same_tensors, load_tensors, peft_reference
from hub_server import Fault
from huggingface_hub import ModelCard, snapshot_download

from loraship.cli import main
from loraship.tiny import build_adapter

BASE_CARD = """---
license: other
license_name: tiny-license
license_link: LICENSE
pipeline_tag: text-generation
---
# Tiny base
"""
ADAPTER_CARD = """---
datasets:
- org/chat-data
language:
- en
- de
---
# alice/lora

A LoRA that makes the tiny base chattier. Trained for 3 epochs on org/chat-data.
"""


@dataclass
class Seeded:
    url: str
    base: Path
    adapter: Path
    base_sha: str
    adapter_sha: str


@pytest.fixture
def seeded(hub_server, model_cache, tmp_path: Path, monkeypatch) -> Seeded:
    """meta/base (license other, tokenizer) and alice/lora (tag v1) on the local Hub; HF_* set for it."""
    base = tmp_path / "base"
    shutil.copytree(model_cache(LLAMA, tokenizer=True), base)
    (base / "README.md").write_text(BASE_CARD)
    (base / "LICENSE").write_text("Tiny license text.\n")
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/base"}))
    (adapter / "README.md").write_text(ADAPTER_CARD)
    base_sha = hub_server.seed("meta/base", base)
    adapter_sha = hub_server.seed("alice/lora", adapter, tags=("v1",))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    return Seeded(hub_server.url, base, adapter, base_sha, adapter_sha)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["run", *map(str, args), "--quiet"])
    captured = capsys.readouterr()
    for token in TOKENS.values():  # tokens never appear in any output
        assert token not in captured.out and token not in captured.err
    return code, captured.out, captured.err


def test_run_publishes_one_verified_commit_and_reruns_are_no_ops(seeded, hub_server, tmp_path: Path, capsys) -> None:
    result_json = tmp_path / "result.json"
    config = tmp_path / "loraship.yaml"
    config.write_text("jobs:\n  chat:\n    adapter: alice/lora@v1\n    output: alice/merged\n"
                      "    publish:\n      tag: v1\n    verify:\n      generation_tokens: 4\n")  # fmt: skip
    code, out, err = run_cli(capsys, "--config", config, "--result", result_json)
    assert code == 0, err
    commits = hub_server.commit_list("alice/merged")
    assert [c.title for c in commits][1:] == ["initial commit"]  # exactly one new commit
    ours = commits[0]
    key = f"base {seeded.base_sha[:10]} adapter {seeded.adapter_sha[:10]}]"
    assert ours.title.startswith("Merge alice/lora into meta/base [loraship ") and ours.title.endswith(key)
    assert hub_server.repos["alice/merged"].tags == {"v1": ours.oid}

    # Read the published repo back with the real client.
    folder = Path(snapshot_download("alice/merged", endpoint=seeded.url, token=TOKENS["alice"],
                                    cache_dir=tmp_path / "readback"))  # fmt: skip
    assert_same_tensors(load_tensors(folder), peft_reference(seeded.base, seeded.adapter, tmp_path / "peft"))
    assert (folder / "LICENSE").read_text() == "Tiny license text.\n"
    assert (folder / "tokenizer.json").is_file()
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "meta/base" and data["base_model_relation"] == "finetune"
    assert (data["license"], data["license_name"], data["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert (data["library_name"], data["pipeline_tag"]) == ("transformers", "text-generation")
    assert data["tags"] == ["lora", "merge", "loraship"]
    assert (data["datasets"], data["language"]) == (["org/chat-data"], ["en", "de"])
    assert data["loraship"]["base_sha"] == seeded.base_sha and data["loraship"]["adapter_sha"] == seeded.adapter_sha
    assert "### loraship verification: passed" in card.text
    assert "A LoRA that makes the tiny base chattier." in card.text
    assert "jobs:\n  chat:\n    adapter: alice/lora@v1\n" in card.text

    result = json.loads(result_json.read_text())["results"][0]
    assert (result["status"], result["commit_sha"], result["tag"], result["verified"]) == ("published", ours.oid, "v1",
                                                                                            True)  # fmt: skip
    assert result["repo_url"] == f"{seeded.url}/alice/merged" and result["report"]["passed"] is True
    assert out.splitlines()[0].split() == [
        "job",
        "status",
        "output",
        "commit",
        "/",
        "PR",
        "/",
        "folder",
        "verification",
    ]
    assert out.splitlines()[2].split() == ["chat", "published", "alice/merged", ours.oid[:12], "passed"]

    # Rerun: nothing published, and the base is not even downloaded.
    before = len(hub_server.requests)
    code, out, _ = run_cli(capsys, "--config", config)
    assert code == 0
    assert f"Already published at {seeded.url}/alice/merged/commit/{ours.oid} (tag `v1`): nothing to do." in out
    assert len(hub_server.commit_list("alice/merged")) == 2
    assert not [p for m, p in hub_server.requests[before:] if p.startswith("/meta/base/resolve")]


TAGGED_JOB = (
    "jobs:\n  chat:\n    adapter: alice/lora@v1\n    output: alice/merged\n    publish:\n      tag: v1\n"
    "    verify:\n      outputs: false\n"
)


def test_stopped_between_commit_and_tag_the_rerun_tags_the_commit(seeded, hub_server, tmp_path: Path, capsys) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text(TAGGED_JOB)
    hub_server.faults.append(Fault("POST", "/alice/merged/tag/", "drop"))
    code, _, err = run_cli(capsys, "--config", config)
    (ours, _) = hub_server.commit_list("alice/merged")
    assert code == 1 and hub_server.repos["alice/merged"].tags == {}
    assert f"Cannot reach the Hub at {seeded.url} to tag `alice/merged`: RemoteProtocolError." in err
    code, out, err = run_cli(capsys, "--config", config)
    assert code == 0, err
    assert f"Already published at {seeded.url}/alice/merged/commit/{ours.oid} (tag `v1`): nothing to do." in out
    assert hub_server.repos["alice/merged"].tags == {"v1": ours.oid}
    assert len(hub_server.commit_list("alice/merged")) == 2


def test_a_lost_commit_reply_is_found_not_failed(seeded, hub_server, tmp_path: Path, capsys) -> None:
    """The commit lands, its reply is lost, the branch has moved (412): the provenance search decides."""
    config = tmp_path / "loraship.yaml"
    config.write_text(TAGGED_JOB)
    hub_server.seed("alice/merged", tmp_path / "nothing")
    hub_server.faults.append(Fault("POST", "/alice/merged/commit/main", "lost-reply"))
    code, _, err = run_cli(capsys, "--config", config, "--result", tmp_path / "r.json")
    assert code == 0, err
    (ours, _) = hub_server.commit_list("alice/merged")
    assert ours.title.startswith("Merge alice/lora into meta/base [loraship ")
    assert hub_server.repos["alice/merged"].tags == {"v1": ours.oid}
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert (result["status"], result["commit_sha"], result["tag"]) == ("already-published", ours.oid, "v1")


def test_a_commit_of_someone_else_in_between_is_a_transient_failure(seeded, hub_server, tmp_path: Path,
                                                                    capsys) -> None:  # fmt: skip
    config = tmp_path / "loraship.yaml"
    config.write_text(TAGGED_JOB)
    hub_server.seed("alice/merged", tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("someone else's commit\n")
    hub_server.faults.append(Fault("POST", "/alice/merged/commit/main", "pass",
                                   hook=lambda: hub_server.seed("alice/merged", tmp_path / "other")))  # fmt: skip
    code, _, err = run_cli(capsys, "--config", config)
    assert code == 1
    assert "`alice/merged` got another commit while loraship was pushing to it (412 Precondition Failed)." in err
    assert [c.title for c in hub_server.commit_list("alice/merged")] == ["Upload model", "Upload model"]


def test_pull_request_mode(seeded, hub_server, capsys) -> None:
    hub_server.seed("alice/merged", seeded.base)  # an existing, protected repo
    code, out, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged", "--create-pr")
    assert code == 0, err
    repo = hub_server.repos["alice/merged"]
    assert len(hub_server.commit_list("alice/merged")) == 1  # main untouched
    assert list(repo.prs) == [1] and repo.discussions[0].is_pr
    assert f"Published {seeded.url}/alice/merged/discussions/1." in out
    code, out, _ = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged", "--create-pr")
    assert "Already published at" in out and list(repo.prs) == [1]


def test_gated_base_gates_the_output(seeded, hub_server, capsys) -> None:
    hub_server.repos["meta/base"].gated = "manual"
    hub_server.repos["meta/base"].granted.add("alice")
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "team/merged", "--no-verify")
    assert code == 0, err
    assert hub_server.repos["team/merged"].gated == "manual"


def test_dry_run_publishes_nothing(seeded, hub_server, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged", "--dry-run", "--workdir",
                             tmp_path / "work")  # fmt: skip
    assert code == 0, err
    assert "alice/merged" not in hub_server.repos
    staged = tmp_path / "work" / "default" / "merged"
    assert f"Dry run: the repo's files are in {staged}; nothing was published." in out
    assert (staged / "README.md").is_file() and (staged / "model.safetensors").is_file()


def test_several_jobs_and_a_local_output(seeded, hub_server, tmp_path: Path, capsys) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text(
        f"jobs:\n"
        f"  local:\n    adapter: alice/lora@v1\n    output: dir:{tmp_path / 'out'}\n    verify:\n      enabled: false\n"
        f"  hub:\n    adapter: {seeded.adapter}\n    base: {seeded.base}\n    output: team/merged\n"
        f"    card:\n      tags: [chat]\n      extra: Merged for the demo.\n    verify:\n      generation_tokens: 4\n"
    )
    code, out, err = run_cli(capsys, "--config", config, "--result", tmp_path / "r.json")
    assert code == 0, err
    statuses = [(r["job"], r["status"]) for r in json.loads((tmp_path / "r.json").read_text())["results"]]
    assert statuses == [("local", "written"), ("hub", "published")]
    assert (tmp_path / "out" / "README.md").read_text().count("Not verified: verification was turned off") == 1
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.to_dict()["base_model"] == "meta/base"
    hub_card = hub_server.file("team/merged", "README.md").decode()
    assert "- chat" in hub_card and "Merged for the demo." in hub_card
    base_hash = hashlib.sha256((seeded.base / "config.json").read_bytes()).hexdigest()[:12]
    assert (
        f"| Base model | `base (local, config sha256:{base_hash})` |" in hub_card and str(seeded.base) not in hub_card
    )
    code, out, err = run_cli(capsys, "--config", config, "--job", "local", "--overwrite")
    assert code == 0 and "local  written" in out


# --------------------------------------------------------------------------- bad input: exit 1, nothing published


def test_hub_listing_a_file_outside_the_repo_is_refused(seeded, hub_server, capsys) -> None:
    from hub_server import StoredFile

    repo = hub_server.repos["alice/lora"]
    head = repo.commits[repo.branches["main"]]
    head.files["../../outside.txt"] = StoredFile(size=1, blob_oid="0" * 40)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged")
    assert (code, err) == (1, "Error: `alice/lora` lists a file named `../../outside.txt`, which would lie outside "
                              "the repo's folder; loraship does not download from a repo like that.\nFix: Use a repo "
                              "whose file names are plain paths inside it.\n")  # fmt: skip
    assert "alice/merged" not in hub_server.repos


@pytest.mark.parametrize("where", ["the output is the base", "the output holds the adapter"])
def test_local_output_overlapping_an_input_is_refused(seeded, tmp_path: Path, capsys, where: str) -> None:
    output = seeded.base if where == "the output is the base" else tmp_path
    before = sorted(p.name for p in seeded.base.iterdir())
    code, _, err = run_cli(capsys, "--adapter", seeded.adapter, "--base", seeded.base, "--output", f"dir:{output}",
                           "--overwrite", "--no-verify")  # fmt: skip
    overlapped = seeded.adapter if where == "the output holds the adapter" else seeded.base
    assert (code, err) == (1, f"Error: The output folder `{output}` overlaps the input folder `{overlapped}`.\n"
                              "Fix: Choose an `output: dir:...` outside the base and adapter folders.\n")  # fmt: skip
    assert sorted(p.name for p in seeded.base.iterdir()) == before and (seeded.adapter / "README.md").is_file()
    assert not [p for p in output.parent.iterdir() if ".loraship-staging-" in p.name]


def assert_failed(code: int, err: str, expected: str) -> None:
    assert code == 1
    assert err.endswith(expected), err


def test_unknown_repo(seeded, hub_server, capsys) -> None:
    code, _, err = run_cli(capsys, "--adapter", "alice/nope", "--output", "alice/merged")
    assert_failed(code, err, (
        f"Error: `alice/nope` was not found on {seeded.url}, or it is private and the given token cannot see it.\n"
        "Fix: Check the repo id. For a private repo, set HF_TOKEN (or --token) to a token that can read it.\n"
    ))  # fmt: skip
    assert "alice/merged" not in hub_server.repos


def test_unknown_revision(seeded, hub_server, capsys) -> None:
    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v9", "--output", "alice/merged")
    assert_failed(code, err, (
        "Error: `alice/lora` has no revision `v9`.\n"
        f"Fix: Use a branch, tag or commit of the repo (see {seeded.url}/alice/lora/tree/main).\n"
    ))  # fmt: skip
    assert "alice/merged" not in hub_server.repos


def test_private_adapter_without_token(seeded, hub_server, tmp_path: Path, capsys, monkeypatch) -> None:
    hub_server.seed("bob/secret-lora", seeded.adapter, private=True)
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(capsys, "--adapter", "bob/secret-lora", "--output", f"dir:{tmp_path / 'out'}")
    assert_failed(code, err, (
        f"Error: `bob/secret-lora` was not found on {seeded.url}, or it is private and an anonymous request (no token "
        "given) cannot see it.\n"
        "Fix: Check the repo id. For a private repo, set HF_TOKEN (or --token) to a token that can read it.\n"
    ))  # fmt: skip
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.loraship-staging-*"))


def test_the_token_hf_auth_login_stored_is_used(seeded, hub_server, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    stored = Path(constants.HF_TOKEN_PATH)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged", "--no-verify")
    assert (code, err) == (1, "Error: Publishing to the Hub needs a Hugging Face token, and none was given.\nFix: Sign "
                              "in with `hf auth login`, or set HF_TOKEN (or pass --token), with a token that has write "
                              "access: https://huggingface.co/settings/tokens.\n")  # fmt: skip
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(TOKENS["alice"])  # what `hf auth login` writes
    try:
        code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged", "--no-verify")
    finally:
        stored.unlink()
    assert code == 0, err
    assert hub_server.commit_list("alice/merged")[0].author == "alice"


def test_invalid_token(seeded, hub_server, capsys) -> None:
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged", "--token", "hf_wrong")
    assert_failed(code, err, (
        "Error: The Hub rejected the token while trying to check the token (401: invalid or expired token).\n"
        "Fix: Create a token at https://huggingface.co/settings/tokens and set HF_TOKEN (or --token).\n"
    ))  # fmt: skip


def test_gated_base_without_access(seeded, hub_server, capsys) -> None:
    hub_server.repos["meta/base"].gated = "manual"
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged")
    assert_failed(code, err, (
        "Error: `meta/base` is gated, and the given token has no access to it.\n"
        f"Fix: Request access at {seeded.url}/meta/base, then set HF_TOKEN (or --token) to a token of the account "
        "that was granted access.\n"
    ))  # fmt: skip
    assert "alice/merged" not in hub_server.repos


def test_adapter_repo_that_is_not_an_adapter(seeded, hub_server, capsys) -> None:
    hub_server.seed("alice/full-model", seeded.base)
    code, _, err = run_cli(capsys, "--adapter", "alice/full-model", "--output", "alice/merged")
    assert_failed(code, err, (
        "Error: `alice/full-model` is not a PEFT adapter: it has no adapter_config.json (it looks like a full model: "
        "it has config.json).\n"
        "Fix: Point `adapter:` at the repo PeftModel.push_to_hub() wrote (adapter_config.json + "
        "adapter_model.safetensors).\n"
    ))  # fmt: skip


@pytest.mark.parametrize("named", ["/etc", "../base", "./base"])
def test_hub_adapter_naming_a_local_base_publishes_nothing_of_the_host(
    named: str, seeded, hub_server, tmp_path: Path, capsys, monkeypatch
) -> None:
    """An adapter on the Hub must not make this machine's folders the base (and publish their files)."""
    (tmp_path / "base" / "secret.txt").write_text("host secret\n")
    monkeypatch.chdir(tmp_path / "adapter")
    hostile = tmp_path / "hostile"
    shutil.copytree(seeded.adapter, hostile)
    config = json.loads((hostile / "adapter_config.json").read_text())
    (hostile / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": named}))
    hub_server.seed("mallory/lora", hostile)
    code, _, err = run_cli(capsys, "--adapter", "mallory/lora", "--output", "alice/merged")
    label = err.split("`")[1]
    assert_failed(code, err, (
        f"Error: The adapter `{label}` comes from the Hub but names a local folder as its base (`{named}` in "
        "adapter_config.json): loraship takes a local base only from the job itself.\n"
        "Fix: Set `base:` in the job (or --base) to the base model's Hub repo id, or to the local folder if you "
        "mean it.\n"
    ))  # fmt: skip
    assert label.startswith("mallory/lora@")
    assert not any(p.startswith("/api/models/alice/merged/commit") for _, p in hub_server.requests)


def test_quantized_base(seeded, hub_server, tmp_path: Path, capsys) -> None:
    quantized = tmp_path / "quantized"
    shutil.copytree(seeded.base, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    sha = hub_server.seed("unsloth/base-bnb-4bit", quantized)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--base", "unsloth/base-bnb-4bit", "--output",
                           "alice/merged")  # fmt: skip
    assert_failed(code, err, (
        f"Error: The base model `unsloth/base-bnb-4bit@{sha}` is quantized (bitsandbytes, 4-bit; config.json has a "
        "quantization_config): merging a LoRA delta into quantized weights loses most of it.\n"
        "Fix: Set `base:` in the job (or --base) to the full-precision model (perhaps `unsloth/base`); adapters "
        "trained on a quantized copy merge into the original weights.\n"
    ))  # fmt: skip
    base_weights = [p for _, p in hub_server.requests if p.startswith("/unsloth/") and p.endswith(".safetensors")]
    assert base_weights == []  # refused before downloading the weights


def test_verification_failure_publishes_nothing(seeded, hub_server, capsys) -> None:
    config = seeded.base.parent / "strict.yaml"
    config.write_text("adapter: alice/lora\noutput: alice/merged\nverify:\n  max_error_ratio: 1.0e-30\n"
                      "  generation_tokens: 4\n")  # fmt: skip
    code, _, err = run_cli(capsys, "--config", config)
    assert_failed(code, err, (
        "Error: The merged model does not match base + adapter: outputs: merge error / adapter effect.\n"
        "Fix: Do not publish it. Merge again with `loraship merge` (and check that the adapter and base are the ones "
        "it was trained with); the report says which tensors or outputs differ.\n"
    ))  # fmt: skip
    assert "alice/merged" not in hub_server.repos


def test_output_repo_of_someone_else(seeded, hub_server, capsys) -> None:
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "bob/merged")
    assert_failed(code, err, (
        "Error: `alice` cannot publish `bob/merged`: the namespace `bob` is neither this account nor one of its "
        "organizations (team).\n"
        "Fix: Publish to `alice/merged` (or an organization you belong to), or use a token of a member of `bob`.\n"
    ))  # fmt: skip
    assert not [p for _, p in hub_server.requests if "/resolve/" in p]  # refused before any download


def test_forbidden_by_the_hub(seeded, hub_server, capsys, monkeypatch) -> None:
    """The Hub itself answers 403 (e.g. the repo exists but the account lost its rights)."""
    hub_server.seed("team/merged", seeded.base)
    hub_server.users[TOKENS["alice"]].orgs = ()
    hub_server.users[TOKENS["alice"]].name = "team-admin"  # whoami passes for another namespace check below
    monkeypatch.setattr("loraship.run.pipeline.check_write_access", lambda ctx: None)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "team/merged", "--no-verify")
    assert_failed(code, err, (
        "Error: The token's account may not upload to `team/merged` (403 Forbidden).\n"
        "Fix: Use a token with write access to that namespace, or publish to a repo in your own namespace.\n"
    ))  # fmt: skip
    assert len(hub_server.commit_list("team/merged")) == 1


def test_read_only_token(seeded, hub_server, capsys) -> None:
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged", "--token",
                           TOKENS["alice-read"])  # fmt: skip
    assert_failed(code, err, (
        "Error: The token of `alice` is read-only: it cannot publish `alice/merged`.\n"
        "Fix: Use a token with write access (https://huggingface.co/settings/tokens) in HF_TOKEN or --token.\n"
    ))  # fmt: skip


def test_config_with_unknown_key_and_wrong_type(seeded, tmp_path: Path, capsys) -> None:
    config = tmp_path / "loraship.yaml"
    config.write_text("jobs:\n  chat:\n    adapter: alice/lora\n    output: alice/merged\n    privat: true\n"
                      "    publish:\n      mode: push\n    verify:\n      generation_tokens: many\n")  # fmt: skip
    code, _, err = run_cli(capsys, "--config", config)
    assert_failed(code, err, (
        f"Error: `{config}` has 3 problem(s):\n"
        "  line 5: unknown key `privat` (known keys: adapter, allow_pickle, base, card, dtype, max_shard_size, output, "
        "private, publish, requantize, trust_remote_code, verify)\n"
        "  line 7: `publish.mode`: input should be 'commit' or 'pr' (got 'push')\n"
        "  line 9: `verify.generation_tokens`: input should be a valid integer, unable to parse string as an integer "
        "(got 'many')\n"
        "Fix: Correct the keys named above (the README lists every key of a job).\n"
    ))  # fmt: skip


def test_output_dir_not_writable(seeded, tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    target = tmp_path / "a-file" / "merged"
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", f"dir:{target}")
    assert_failed(code, err, (
        f"Error: The output folder `{target}` cannot be written: File exists.\n"
        "Fix: Choose an `output: dir:...` in a folder you can write to.\n"
    ))  # fmt: skip


def test_base_precision_guess() -> None:
    from loraship.run.pipeline import full_precision_guess

    assert full_precision_guess("unsloth/llama-3-8b-bnb-4bit") == "unsloth/llama-3-8b"
    assert full_precision_guess("TheBloke/Llama-2-7B-GPTQ") == "TheBloke/Llama-2-7B"
    assert full_precision_guess("org/model-awq-4bit-gemm") == "org/model"
    assert full_precision_guess("meta/llama") is None


def test_weights_are_those_of_peft_for_bf16(seeded, hub_server, model_cache, tmp_path: Path, capsys) -> None:
    base = model_cache(LLAMA, dtype="bfloat16")
    adapter = build_adapter(base, tmp_path / "a16", target_modules=["o_proj"])
    code, _, err = run_cli(capsys, "--adapter", adapter, "--base", base, "--output", "alice/m16")
    assert code == 0, err
    folder = Path(snapshot_download("alice/m16", endpoint=seeded.url, token=TOKENS["alice"], cache_dir=tmp_path / "c"))
    assert_same_tensors(load_tensors(folder), peft_reference(base, adapter, tmp_path / "p", dtype=torch.bfloat16))


def test_offline_mode_is_a_known_failure_not_a_bug(seeded, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    result = tmp_path / "result.json"
    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged", "--result", result)
    assert code == 1
    assert err.endswith(
        "Error: The Hugging Face Hub is not reachable: HF_HUB_OFFLINE is set, and the files are not in the local "
        "cache.\n"
        "Fix: Unset HF_HUB_OFFLINE (or set it to 0) to download, or pass local folders instead of repo ids.\n"
    )
    assert "bug" not in err
    assert json.loads(result.read_text())["error"]["transient"] is False


def test_unreachable_network_is_a_known_transient_failure(tmp_path: Path, capsys, monkeypatch) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    result = tmp_path / "result.json"
    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged", "--result", result)
    assert code == 1
    assert f"127.0.0.1:{port}" in err and "Error: Cannot reach" in err
    assert "bug" not in err
    assert json.loads(result.read_text())["error"]["transient"] is True


def test_network_failures_from_any_library_are_known_and_bugs_are_not() -> None:
    import requests

    from loraship.errors import known_failure

    assert known_failure(RuntimeError("upload failed")) is None  # not the network: a bug
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = ConnectionError("xet: connection reset by peer")  # the xet uploader's error, chained
    found = known_failure(wrapped)
    assert found is not None and found.transient
    assert found.message == "Cannot reach the network: ConnectionError (xet: connection reset by peer)."
    request = requests.Request("GET", "https://huggingface.co/api/models/x").prepare()
    dns = known_failure(requests.exceptions.ConnectionError("Name or service not known", request=request))
    assert (
        dns is not None and dns.message == "Cannot reach `huggingface.co`: ConnectionError (Name or service not known)."
    )
    import httpx2  # what huggingface_hub 2.x speaks HTTP with: a dropped upload is the network, not a bug

    dropped = RuntimeError("Error while uploading 'model.safetensors' to the Hub.")
    dropped.__cause__ = httpx2.RemoteProtocolError("peer closed connection without sending complete message body")
    found = known_failure(dropped)
    assert found is not None and found.transient
    assert found.message == (
        "Cannot reach the network: RemoteProtocolError (peer closed connection without sending complete message body)."
    )


@pytest.mark.slow
def test_quiet_silences_every_libraries_progress_bars(model_cache, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from loraship.tiny import build_adapter

    base = model_cache(LLAMA)
    adapter = build_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}

    def run(out: str, *extra: str) -> str:
        cmd = [sys.executable, "-m", "loraship", "run", "--adapter", str(adapter), "--base", str(base), "--output",
               f"dir:{tmp_path / out}", *extra]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stderr

    assert "%|" in run("loud", "--progress")  # transformers' "Loading weights" bars, asked for on a pipe
    assert "%|" not in run("quiet", "--quiet")
    assert "%|" not in run("piped")  # stderr is not a terminal: no bars unless --progress


SEQUENTIAL_DISK = (
    r"\(the base's files, downloaded to the Hugging Face cache: (\S+ \S+) in `[^`]+`; the merged model, staged: "
    r"(\S+ \S+) in `[^`]+`\), which has 1\.0 MB free\. Nothing was downloaded\.\n"
    r"Fix: Free space there, or put the Hugging Face cache \(HF_HUB_CACHE or HF_HOME\) and the staging folder "
    r"\(--workdir\) on disks with more room, or run on a machine with a larger disk\.\n"
)
STREAMED_WHOLE_DISK = (
    r"\(the base's weights, downloaded for this run: (\S+ \S+) in `[^`]+/base`; the merged model, staged: "
    r"(\S+ \S+) in `[^`]+`\), which has 1\.0 MB free\. Nothing was downloaded\.\n"
    r"Fix: Free space there, or put the run's folder \(--workdir\) on a disk with more room\. Both models are on "
    r"disk because the output check reads both whole models: with `verify: \{outputs: false\}` \(every merged "
    r"tensor is still compared bit for bit with base \+ adapter\) a run to the Hub holds only a few shards at a "
    r"time\.\n"
)
STREAMED_DISK = (
    r"\(3 of the base's weight files at a time: (\S+ \S+) in `[^`]+/base`; 2 merged shards at a time: "
    r"(\S+ \S+) in `[^`]+`\), which has 1\.0 MB free\. Nothing was downloaded\.\n"
    r"Fix: Free space there, or put the run's folder \(--workdir\) on a disk with more room, or write smaller "
    r"shards \(`max_shard_size` in loraship\.yaml, or --max-shard-size\)\.\n"
)


@pytest.mark.parametrize(
    ("args", "outputs", "expected"),
    [(["--no-stream"], True, SEQUENTIAL_DISK), ([], True, STREAMED_WHOLE_DISK), ([], False, STREAMED_DISK)],
    ids=["sequential", "streamed-with-output-check", "streamed"],
)
def test_preflight_refuses_a_run_the_disk_cannot_hold_before_downloading(
    seeded, hub_server, capsys, monkeypatch, args: list[str], outputs: bool, expected: str
) -> None:
    import shutil as real_shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(real_shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**6, 10**6))
    config = seeded.base.parent / "job.yaml"
    config.write_text(f"adapter: alice/lora\noutput: alice/merged\nverify:\n  outputs: {str(outputs).lower()}\n")
    code, _, err = run_cli(capsys, "--config", config, *args)
    assert code == 1
    weights = (seeded.base / "model.safetensors").stat().st_size
    found = re.fullmatch(r"Error: Not enough disk space for this run: it needs about (\S+ \S+) on the disk of "
                         r"`[^`]+` " + expected, err)  # fmt: skip
    assert found, err
    assert all(_parse_bytes(found.group(i)) >= weights for i in (2, 3))  # the weights, downloaded, then merged
    weight_reads = [path for _, path in hub_server.requests if path.endswith("/model.safetensors")]
    assert weight_reads == [p for p in hub_server.ranged if p.endswith("/model.safetensors")]  # headers at most
    assert "alice/merged" not in hub_server.repos


def test_preflight_refuses_an_output_check_the_memory_cannot_hold(seeded, capsys, monkeypatch) -> None:
    from loraship.run import preflight

    monkeypatch.setattr(preflight, "available_memory", lambda: 10**6)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged")
    assert code == 1
    assert re.fullmatch(
        r"Error: The output check loads the model into memory, one model at a time: about \S+ MB in float32, and "
        r"this machine has 1\.0 MB available\. Nothing was downloaded\.\n"
        r"Fix: Run on a machine with more memory or a GPU \(`verify: \{device: cuda\}`\), set `verify: "
        r"\{max_memory: 1GB\}` \(or --max-memory 1GB: the layers that do not fit are read from disk as they run, "
        r"slower\), or check the weights only \(`verify: \{outputs: false\}`; every merged tensor is still compared "
        r"bit for bit with base \+ adapter\)\.\n",
        err,
    ), err
    code, _, err = run_cli(capsys, "--adapter", "alice/lora", "--output", "alice/merged", "--max-memory", "100KB")
    assert code == 1
    assert re.fullmatch(
        r"Error: The output check keeps up to max_memory = 100\.0 KB of weights in memory, about 536\.9 MB with the "
        r"rest it needs, and this machine has 1\.0 MB available\. Nothing was downloaded\.\n"
        r"Fix: Lower `max_memory` \(`verify: \{max_memory: \.\.\.\}` or --max-memory\), or check the weights only "
        r"\(`verify: \{outputs: false\}`\)\.\n",
        err,
    ), err
    config = seeded.base.parent / "weights-only.yaml"
    config.write_text("adapter: alice/lora\noutput: alice/merged\nverify:\n  outputs: false\n")
    code, _, err = run_cli(capsys, "--config", config)
    assert code == 0, err  # the weights are checked without loading a model: nothing to refuse


def _parse_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.slow
def test_a_new_version_leaves_no_file_of_the_old_one_in_the_repo(seeded, hub_server, tmp_path: Path, capsys) -> None:
    """v1 is one `model.safetensors`; v2 (another adapter, sharded) must not leave it beside its shards:
    transformers loads `model.safetensors` before an index, so a stale one would silently be the old model."""
    from huggingface_hub import snapshot_download
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged")
    assert code == 0, err
    assert "model.safetensors" in hub_server.commit_list("alice/merged")[0].files
    _seed_adapter(seeded, hub_server, "alice/lora2", ["k_proj"])
    job = tmp_path / "v2.yaml"
    job.write_text("adapter: alice/lora2\noutput: alice/merged\nmax_shard_size: 20KB\n")
    code, _, err = run_cli(capsys, "--config", job)
    assert code == 0, err
    commits = hub_server.commit_list("alice/merged")
    files = sorted(commits[0].files)
    assert len(commits) == 3  # the repo's creation, v1, v2
    assert "model.safetensors" not in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in shards)
    folder = snapshot_download("alice/merged", endpoint=seeded.url, token=TOKENS["alice"])
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    merged_v2 = {}
    for f in shards:
        merged_v2 |= load_file(str(Path(folder) / f))
    assert torch.equal(
        loaded["model.layers.0.self_attn.k_proj.weight"], merged_v2["model.layers.0.self_attn.k_proj.weight"]
    )


def _wait_for_blob(hub_server, merged: Path, timeout: float = 30) -> str:
    """Block until the Hub holds the staged `model.safetensors` as an LFS blob; its sha256."""
    import hashlib
    import time

    oid = hashlib.sha256((merged / "model.safetensors").read_bytes()).hexdigest()
    deadline = time.monotonic() + timeout
    while oid not in hub_server.lfs:
        assert time.monotonic() < deadline, "the weights were not uploaded while verification ran"
        time.sleep(0.05)
    return oid


@pytest.mark.slow
def test_weights_upload_while_verification_runs_and_one_commit_references_them(
    seeded, hub_server, capsys, monkeypatch
) -> None:
    import loraship.check.verify

    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged")  # creates the repo
    assert code == 0, err
    before = len(hub_server.commit_list("alice/merged"))
    _seed_adapter(seeded, hub_server, "alice/lora2", ["o_proj"])
    real_verify, seen = loraship.check.verify.verify, []

    def verify_after_upload(base, adapter, merged, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_wait_for_blob(hub_server, merged))  # deadlocks (and fails) if the upload waited for this
        return real_verify(base, adapter, merged, **kwargs)

    monkeypatch.setattr(loraship.check.verify, "verify", verify_after_upload)
    puts_before = sum(1 for method, path in hub_server.requests if method == "PUT" and path.startswith("/lfs-upload"))
    code, _, err = run_cli(capsys, "--adapter", "alice/lora2", "--output", "alice/merged")
    assert code == 0, err
    commits = hub_server.commit_list("alice/merged")
    assert len(commits) == before + 1  # one commit, after verification
    assert commits[0].files["model.safetensors"].lfs_oid == seen[0]  # the uploaded blob is the verified bytes
    puts = [p for m, p in hub_server.requests if m == "PUT" and p.startswith("/lfs-upload")][puts_before:]
    assert puts == [f"/lfs-upload/{seen[0]}"]  # uploaded once: the commit found it there


def test_a_failed_verification_after_the_upload_publishes_nothing(seeded, hub_server, capsys, monkeypatch) -> None:
    import loraship.check.verify
    from loraship.errors import VerificationFailed

    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged")
    assert code == 0, err
    commits = hub_server.commit_list("alice/merged")
    _seed_adapter(seeded, hub_server, "alice/lora2", ["o_proj"])

    def failing_verify(base, adapter, merged, **kwargs):  # type: ignore[no-untyped-def]
        _wait_for_blob(hub_server, merged)
        raise VerificationFailed("outputs differ (simulated).", fix="Do not publish it.")

    monkeypatch.setattr(loraship.check.verify, "verify", failing_verify)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora2", "--output", "alice/merged")
    assert code == 1 and "outputs differ (simulated)." in err
    assert hub_server.commit_list("alice/merged") == commits  # the uploaded blob is referenced by nothing


def _seed_adapter(seeded: Seeded, hub_server, repo_id: str, modules: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Another adapter of meta/base on the local Hub."""
    folder = seeded.base.parent / repo_id.replace("/", "--")
    adapter = build_adapter(seeded.base, folder, target_modules=modules, seed=7)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta/base"}))
    hub_server.seed(repo_id, adapter)


def test_publishing_is_one_create_commit_never_upload_folder(seeded, hub_server, capsys, monkeypatch) -> None:
    """With hf_xet installed (every real install), huggingface_hub 2.4's upload_folder streams a large
    folder into several commits; the first would carry the provenance a rerun trusts. The test Hub has
    no xet, so the guard is on the call: publishing must not go through upload_folder."""
    from huggingface_hub import HfApi

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("upload_folder may split a publication into several commits")

    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged")
    assert code == 0, err
    assert hub_server.commit_list("alice/merged")[0].title.startswith("Merge alice/lora")


@pytest.mark.slow
def test_killed_during_the_upload_publishes_nothing_and_a_rerun_publishes_once(seeded, hub_server, capsys) -> None:
    import os
    import signal
    import subprocess
    import sys

    code, _, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged")  # the repo exists
    assert code == 0, err
    commits = hub_server.commit_list("alice/merged")
    _seed_adapter(seeded, hub_server, "alice/lora2", ["o_proj"])
    cmd = [sys.executable, "-m", "loraship", "run", "--adapter", "alice/lora2", "--output", "alice/merged", "--quiet"]
    env = {**os.environ, "HF_ENDPOINT": seeded.url, "HF_TOKEN": TOKENS["alice"]}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    hub_server.faults.append(Fault("PUT", "/lfs-upload/", "drop", hook=lambda: os.killpg(proc.pid, signal.SIGKILL)))
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # killed while its weights were on the way
    assert hub_server.commit_list("alice/merged") == commits  # nothing visible
    code, _, err = run_cli(capsys, "--adapter", "alice/lora2", "--output", "alice/merged")
    assert code == 0, err
    assert len(hub_server.commit_list("alice/merged")) == len(commits) + 1


def test_local_adapter_naming_a_hub_base_uses_hf_token(seeded, hub_server, tmp_path: Path, capsys) -> None:
    """No repo on the command line, the token only in HF_TOKEN: the base the adapter's config names
    (meta/base) is read from the Hub with it."""
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "--adapter", seeded.adapter, "--output", f"dir:{out}", "--verify", "weights")
    assert code == 0, err
    assert_same_tensors(load_tensors(out), peft_reference(seeded.base, seeded.adapter, tmp_path / "peft"))
    assert ModelCard.load(out / "README.md").data.to_dict()["loraship"]["base_sha"] == seeded.base_sha


# --------------------------------------------------------------------------- a hostile Hub, a hostile adapter config

HUB_FIX = (
    "Fix: Try again in a while; if it persists, check that HF_ENDPOINT ({url}) points at a Hugging Face Hub, and "
    "https://status.huggingface.co.\n"
)


@pytest.mark.parametrize("fault", ["no-id", "no-sha"])
def test_a_hub_reply_of_the_wrong_shape_is_not_understood(seeded, hub_server, fault: str, capsys) -> None:
    hub_server.faults.append(Fault("GET", "/api/models/meta/base", fault))
    code, out, err = run_cli(capsys, "--adapter", "alice/lora@v1", "--output", "alice/merged")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: The Hub's answer when trying to read `meta/base` was not understood: it has no `{fault[3:]}`.\n"
        + HUB_FIX.format(url=seeded.url)
    )


def test_an_adapter_naming_a_base_the_hub_refuses_is_refused(seeded, hub_server, tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "bad-adapter"
    shutil.copytree(seeded.adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/.."}))
    sha = hub_server.seed("alice/bad-lora", adapter)
    code, out, err = run_cli(capsys, "--adapter", "alice/bad-lora", "--output", "alice/merged")
    assert (code, out) == (1, "")
    assert err == (
        f"Error: The adapter `alice/bad-lora@{sha}` names its base as `acme/..` in adapter_config.json, which the Hub "
        "refuses as a repo id (huggingface_hub: Repo id must use alphanumeric chars, '-', '_' or '.'. The name cannot "
        "start or end with '-' or '.' and the maximum length is 96: 'acme/..').\n"
        "Fix: Set `base:` in the job (or --base) to the base model's Hub repo id.\n"
    )
    assert "alice/merged" not in hub_server.repos


def test_a_hub_failing_on_its_side_during_the_upload_says_so(seeded, hub_server, tmp_path: Path, monkeypatch,
                                                           capsys) -> None:  # fmt: skip
    """500s on preupload (huggingface_hub retries each 5 times): the Hub's side, transient, no raw dump."""
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retries, without their waits
    hub_server.seed("alice/merged", tmp_path / "nothing")  # an existing repo: the weights upload while verified
    hub_server.faults.extend(Fault("POST", "/alice/merged/preupload/", "error-500") for _ in range(30))
    code = main(["run", "--adapter", "alice/lora@v1", "--output", "alice/merged", "--no-stream", "--verify", "weights"])
    err = capsys.readouterr().err
    said = "The Hub failed on its side (500) when trying to {} `alice/merged`. It said: Internal Error - We're " \
        "working hard to fix this as soon as possible!"  # fmt: skip
    assert code == 1
    assert f"The upload during verification did not finish ({said.format('upload to')}): uploading now.\n" in err
    assert err.endswith(
        f"Error: {said.format('push to')}\n"
        "Fix: Nothing in the job is at fault: run again in a while (the bot retries by itself); if it persists, check "
        "https://status.huggingface.co.\n"
    )
    assert "x" * 100 not in err and "Request ID" not in err and "for url" not in err
