"""push_to_hub and from_pretrained("user/name") against a local stand-in for the hub: huggingface_hub's HfApi
(create_repo, upload_folder) and snapshot_download answered from a folder of repos, no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from softprompt import (PromptedTask, PromptModel, PromptTuningConfig, TrainConfig, describe_model, get_prompt_model,
                        to_examples)
from softprompt.cli import main
from softprompt.errors import SoftpromptError
from softprompt.peft_interop import export_peft
from softprompt.spec import resolve
from softprompt.tasks import get_task


class LocalHub:
    """What the hub keeps: one folder per repo id; uploads add files, downloads hand back the folder."""

    def __init__(self, root: Path) -> None:
        self.root, self.private, self.tokens = root, {}, []

    def api(self, token=None):
        self.tokens.append(token)
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, **_):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        self.private[repo_id] = private
        return f"https://hub.local/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, **_):
        if not (self.root / repo_id).is_dir():
            raise ValueError(f"Repository Not Found for url: https://hub.local/{repo_id}")
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)
        return f"https://hub.local/{repo_id}/commit/{len(self.tokens)}"

    def snapshot_download(self, repo_id, **_):
        if not (self.root / repo_id).is_dir():
            raise ValueError(f"404 Client Error: Repository Not Found for url: https://hub.local/{repo_id}")
        return str(self.root / repo_id)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    store = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", store.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", store.snapshot_download)
    monkeypatch.setattr("softprompt.assets.hub_unreachable", lambda: None)  # the stand-in answers
    monkeypatch.chdir(tmp_path)  # "user/name" is no local folder here
    return store


def test_prompted_task_pushes_and_loads_by_repo_id(tiny_dirs, hub):
    model = describe_model(tiny_dirs["bert"])
    prompted = PromptedTask.build(resolve(TrainConfig(model=tiny_dirs["bert"], prompt_length=4), model,
                                          get_task("sst2")), model)
    url = prompted.push_to_hub("user/sst2-prompt", private=True, token="t0k")
    assert url.startswith("https://hub.local/user/sst2-prompt") and hub.private["user/sst2-prompt"] is True
    assert hub.tokens == ["t0k"]
    loaded = PromptedTask.from_pretrained("user/sst2-prompt")
    texts = ["a gorgeous, moving film", "dull"]
    assert loaded.spec == prompted.spec
    examples = to_examples(texts, prompted.task.fields)
    assert torch.equal(loaded.scores(examples), prompted.scores(examples))


def test_prompt_model_pushes_and_loads_by_repo_id(tiny_dirs, tokenizer, hub):
    torch.manual_seed(0)
    ours = get_prompt_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]),
                            PromptTuningConfig(num_virtual_tokens=3), tokenizer)
    ours.push_to_hub("user/bare")
    back = PromptModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]), "user/bare")
    assert torch.equal(back.prompt.weight, ours.prompt.weight)


def test_cli_push_and_an_exported_peft_adapter_on_the_hub(tiny_dirs, tokenizer, hub, tmp_path, capsys):
    torch.manual_seed(0)
    ours = get_prompt_model(AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"]),
                            PromptTuningConfig(num_virtual_tokens=3, task_type="SEQ_CLS"), tokenizer)
    ours.save_pretrained(tmp_path / "ckpt")
    export_peft(tmp_path / "ckpt", tmp_path / "peft")
    assert main(["push", str(tmp_path / "peft"), "user/peft-prompt"]) == 0
    assert "pushed: https://hub.local/user/peft-prompt" in capsys.readouterr().out
    assert (hub.root / "user" / "peft-prompt" / "adapter_model.safetensors").is_file()
    back = PromptModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_dirs["bert"]),
                                       "user/peft-prompt")
    assert torch.equal(back.prompt.weight, ours.prompt.weight) and torch.equal(back.head.weight, ours.head.weight)


def test_hub_failures_are_one_line(tiny_dirs, tokenizer, hub, tmp_path, monkeypatch, capsys):
    with pytest.raises(SoftpromptError, match="neither a checkpoint folder nor a hub repo"):
        PromptedTask.from_pretrained("user/missing")
    (tmp_path / "junk").mkdir()
    assert main(["push", str(tmp_path / "junk"), "user/x"]) == 2  # not a checkpoint: refused before any upload
    assert "not a softprompt checkpoint" in capsys.readouterr().err and not (hub.root / "user" / "x").exists()
    monkeypatch.setattr("softprompt.assets.hub_unreachable", lambda: "no network to huggingface.co")
    ours = get_prompt_model(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]),
                            PromptTuningConfig(num_virtual_tokens=3), tokenizer)
    with pytest.raises(SoftpromptError, match="not reachable now .no network"):
        ours.push_to_hub("user/y")
