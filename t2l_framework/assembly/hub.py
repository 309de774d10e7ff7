"""Runs on the Hugging Face Hub: the one place that decides "local folder or hub id", and
``T2LRun``, a run folder that is saved, loaded and pushed the way ``huggingface_hub``'s
``ModelHubMixin`` expects (``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``).

A pushed run is the run folder itself, without its checkpoints and logs, plus the files the
Hub reads: ``README.md`` (the model card, ``assembly/model_card.py``), ``config.json`` (what
the run generates for; the Hub counts downloads by it) and ``training_tasks.txt``. Weights stay
safetensors (``hypernet/hypernet.safetensors``); a downloaded run is an untrusted folder and
goes through the same checks as a local one (``loading.check_run_trust``).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelHubMixin, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
    RevisionNotFoundError,
)

from t2l_framework.atomic import atomic_file, write_text_atomic
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import HYPERNET_CONFIG, RunFolder

LIBRARY = "t2l-framework"
TAGS = ["text-to-lora", "t2l", "lora", "hypernetwork", "peft"]
REPO_URL = "https://github.com/t2l-framework/t2l-framework"
# What a run needs to be loaded, evaluated, inspected and described; checkpoints and logs stay home.
RUN_FILES = ["recipe.yaml", "hypernet/*", "adapter/*", "report.md", "report.json", "training_status.json",
             "eval/results.json", "eval/results.md", "training_tasks.txt", "config.json", "README.md"]
# The reference's released checkpoints (SakanaAI/text-to-lora trained_t2l/*): read by import-reference.
REFERENCE_FILES = ["hypermod.pt", "args.yaml", "adapter_config.json"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def is_hub_id(source: str) -> bool:
    """``ORG/NAME`` as the Hub spells repo ids (no '..', no '--', no path beyond one slash)."""
    return bool(_HUB_ID.match(source)) and ".." not in source and "--" not in source


def resolve_run(source: str | Path, revision: str | None = None, subfolder: str | None = None,
                cache_dir: str | Path | None = None, files: list[str] | None = None,
                local_files_only: bool = False) -> Path:
    """A local folder for ``source``: an existing folder as it is, else a hub id downloaded into
    the Hub's cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads the cache only).

    subfolder: a folder inside the repo (``import-reference ORG/NAME --subfolder trained_t2l/x``);
    files: glob patterns to fetch (default: a run's files, ``RUN_FILES``). Every command that
    opens a run asks this function, so a hub id works wherever a folder does.
    """
    text = str(source)
    local = Path(text).expanduser()
    if local.exists():
        if revision:
            raise T2LError(f"--revision: {text} is a local folder; a revision applies to hub ids (ORG/NAME)")
        return local / subfolder if subfolder else local
    if not is_hub_id(text):
        raise T2LError(f"{text}: no such folder, and not a hub id (ORG/NAME)")
    sub = subfolder.strip("/") if subfolder else ""
    if sub and (".." in Path(sub).parts or Path(sub).is_absolute()):
        raise T2LError(f"--subfolder: '{subfolder}' must be a relative folder inside the repo")
    patterns = [f"{sub}/{p}" if sub else p for p in (files or RUN_FILES)]
    where = f"{text}" + (f"@{revision}" if revision else "")
    try:
        snapshot = Path(snapshot_download(text, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                          local_files_only=local_files_only))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise T2LError(f"{where}: not in the Hub cache, and the Hub cannot be reached (HF_HUB_OFFLINE=1 or no "
                       "network); download it once online") from None
    except GatedRepoError:
        raise T2LError(f"{where}: a gated repo; accept its terms on the Hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise T2LError(f"{where}: no such model repo on the Hub (or it is private: log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise T2LError(f"{where}: the repo has no revision '{revision}'") from None
    except HfHubHTTPError as exc:
        raise T2LError(f"{where}: the Hub answered {exc.response.status_code if exc.response is not None else 'an error'}"
                       " while downloading") from None
    folder = snapshot / sub if sub else snapshot
    if not folder.is_dir():
        raise T2LError(f"{where}: the repo has no folder '{sub}'" if sub else f"{where}: the snapshot is empty")
    return folder


def hub_config(run: RunFolder) -> dict:
    """``config.json`` of a pushed run: what it generates for (read from ``hypernet_config.json``)."""
    from t2l_framework.hypernet.checkpoint import read_config

    if not run.has_hypernet():
        raise T2LError(f"{run.root}: not a T2L run (no hypernet/{HYPERNET_CONFIG}); `t2l push` uploads trained runs")
    meta = read_config(run.hypernet)
    return {"library_name": LIBRARY, "format": "t2l-run", "hypernet": "hypernet/",
            "base_model": meta["base_model"], "encoder": meta["encoder"].get("model", ""),
            "head": meta["hypernet"].get("head", "per_layer"), "rank": meta["lora"]["rank"],
            "alpha": meta["lora"]["alpha"], "use_rslora": bool(meta["lora"].get("use_rslora", False)),
            "target_modules": meta["lora"]["target_modules"]}


class T2LRun(ModelHubMixin, library_name=LIBRARY, tags=TAGS, repo_url=REPO_URL,
             docs_url=f"{REPO_URL}/blob/main/docs/hub.md"):
    """A trained run folder with the Hub's save / load / push API.

    ``T2LRun.from_pretrained("ORG/NAME" | folder, revision=...)`` gives a local run folder
    (``.root``) that ``load_runtime`` opens; ``save_pretrained(dir)`` writes the Hub layout;
    ``push_to_hub(repo_id, private=, create_pr=)`` uploads it.
    """

    def __init__(self, root: Path):
        self.run = RunFolder(root)
        self._hub_mixin_config = None  # config.json is written by _save_pretrained, never the local path
        self.repo_id = "ORG/NAME"  # what the card's usage lines name; push_to_hub sets it

    @property
    def root(self) -> Path:
        return self.run.root

    def _save_pretrained(self, save_directory: Path) -> None:
        from t2l_framework.assembly.model_card import model_card, training_task_ids

        config = hub_config(self.run)
        save_directory = Path(save_directory)
        for pattern in RUN_FILES:
            for path in sorted(self.root.glob(pattern)):
                if path.is_file() and not path.is_symlink():
                    target = save_directory / path.relative_to(self.root)
                    with atomic_file(target) as tmp:
                        shutil.copyfile(path, tmp)
        tasks = training_task_ids(self.run)
        if tasks:
            write_text_atomic(save_directory / "training_tasks.txt", "\n".join(tasks) + "\n")
        write_text_atomic(save_directory / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        model_card(self.run, tasks, self.repo_id).save(save_directory / "README.md")

    def generate_model_card(self, *args, **kwargs):
        from t2l_framework.assembly.model_card import model_card, training_task_ids

        return model_card(self.run, training_task_ids(self.run), self.repo_id)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, **model_kwargs) -> "T2LRun":
        return cls(resolve_run(model_id, revision, model_kwargs.get("subfolder"), cache_dir,
                               local_files_only=local_files_only))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, create_pr: bool | None = None,
                    branch: str | None = None, commit_message: str = "Upload a Text-to-LoRA run with t2l push",
                    token: str | None = None, endpoint: str | None = None, **_ignored) -> str:
        """Create ``repo_id`` (private if asked), then one commit with the run's Hub layout, to
        ``branch`` (created if missing) or as a pull request; returns the commit (or PR) url.
        endpoint: another Hub (default ``HF_ENDPOINT``)."""
        if not is_hub_id(repo_id):
            raise T2LError(f"'{repo_id}': a hub repo id is ORG/NAME")
        if create_pr and branch:
            raise T2LError("--create-pr opens a pull request against the default branch; leave out --revision")
        hub_config(self.run)  # a clear error before anything is created
        api = HfApi(endpoint=endpoint, token=token)
        try:
            repo_id = self.repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
            if branch:
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="t2l-push-") as tmp:
                self.save_pretrained(Path(tmp) / "run")
                info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=Path(tmp) / "run",
                                         commit_message=commit_message, revision=branch, create_pr=create_pr)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "an error"
            raise T2LError(f"{repo_id}: the Hub answered {status} while uploading"
                           + (" (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else "")) from None
        return str(getattr(info, "pr_url", None) or info)

