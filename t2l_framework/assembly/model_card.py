"""The model card (``README.md``) of a pushed run, written from what the run folder holds.

The YAML header is the Hub's metadata (``library_name``, ``tags``, ``base_model``, ``license``,
``datasets``) so the Hub indexes the run; the body says what the hypernetwork generates for
(base model, encoder, head, rank, targets), what it was trained on (tasks, steps, examples,
the data's licences), how it scored (the end-of-training table, ``t2l eval`` results) and how
to use it. Only files of the run and the data bundle are read; nothing is guessed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from t2l_framework.errors import T2LError
from t2l_framework.run_folder import RunFolder

LICENSE = "apache-2.0"  # the hypernetwork's own licence; the base model's and the data's are listed in the card
DATASETS = ["Lots-of-LoRAs/task-collection", "allenai/natural-instructions"]


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _recipe(run: RunFolder):
    from t2l_framework.assembly.lookups import load_recipe

    return load_recipe(run.recipe, check_files=False) if run.has_recipe() else None


def training_task_ids(run: RunFolder) -> list[str]:
    """The run's training tasks: ``data.train_tasks`` (``@file`` lists expanded), else the tasks
    the data selected (task set or role), else none when the data is not on this machine."""
    from t2l_framework.assembly.inspect import run_tasks

    cfg = _recipe(run)
    if cfg is None:
        return []
    try:
        return list(run_tasks(cfg, run.recipe).train)
    except T2LError:
        from t2l_framework.data.tasks import expand_task_ids

        try:
            return expand_task_ids(cfg.data.train_tasks, run.recipe)
        except T2LError:
            return []


def data_licences(cfg, recipe_file: Path | None, task_ids: list[str]) -> Counter:
    """Licence -> number of training tasks, from the tasks files' ``instance_license`` fields."""
    from t2l_framework.data.files import text_lines
    from t2l_framework.data.task_sets import task_sources

    wanted, found = set(task_ids), Counter()
    try:
        sources = task_sources(cfg.data, recipe_file)
    except T2LError:
        return found
    for tasks_file, _ in sources:
        if not tasks_file.is_file():
            continue
        for _, line in text_lines(tasks_file):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("task") in wanted:
                wanted.discard(rec["task"])
                found[str(rec.get("instance_license") or "not recorded")[:60]] += 1
    if wanted:
        found["not recorded"] += len(wanted)
    return found


def _meta(run: RunFolder) -> dict:
    from t2l_framework.hypernet.checkpoint import read_config

    return read_config(run.hypernet)


def model_card(run: RunFolder, task_ids: list[str], repo_id: str = "ORG/NAME") -> ModelCard:
    """The card for ``run``; ``task_ids``: its training tasks (``training_task_ids``)."""
    meta = _meta(run)
    cfg = _recipe(run)
    base, encoder = meta["base_model"], meta["encoder"].get("model", "")
    lora, head = meta["lora"], meta["hypernet"].get("head", "per_layer")
    status = _json(run.status) or {}
    licences = data_licences(cfg, run.recipe, task_ids) if cfg is not None else Counter()
    data = card_data(base, encoder)
    lines = [
        f"# Text-to-LoRA hypernetwork for {base}", "",
        "A [Text-to-LoRA](https://arxiv.org/abs/2506.06105) hypernetwork, trained with "
        "[t2l-framework](https://github.com/t2l-framework/t2l-framework): it turns a plain-language task description "
        "into a LoRA adapter for the frozen base model, in one forward pass.", "",
        "## What it generates", "",
        "| | |", "|---|---|",
        f"| base model | `{base}` |",
        f"| text encoder | `{encoder}` ({meta['encoder'].get('name', '')}, pooling {meta['encoder'].get('pooling', '')}) |",
        f"| hypernetwork head | `{head}` |",
        f"| LoRA rank / alpha | {lora['rank']} / {lora['alpha']}"
        f"{' (rsLoRA)' if lora.get('use_rslora') else ''} |",
        f"| target modules | {', '.join(f'`{m}`' for m in lora['target_modules'])} |",
        f"| layers | {meta['shapes']['n_layers']} |", "",
        "## Training", "",
        f"- training tasks: {len(task_ids)}" + (" (listed in `training_tasks.txt`)" if task_ids else ""),
    ]
    if status:
        lines.append(f"- steps: {status.get('steps', '?')} of {status.get('max_steps', '?')}, "
                     f"examples: {status.get('examples', '?'):,}" if isinstance(status.get("examples"), int)
                     else f"- steps: {status.get('steps', '?')}")
    if cfg is not None:
        lines.append(f"- mode: {cfg.training.mode}, lr {cfg.training.lr}, seed {cfg.training.seed}; "
                     "the full recipe is `recipe.yaml`")
    if licences:
        lines += ["", "### Data licences", "",
                  "Training data: Super-NaturalInstructions tasks (the Lots-of-LoRAs collection; Apache-2.0 "
                  "collection, per-task instance licences below) and the T2L authors' task descriptions "
                  "(Apache-2.0). Training tasks per instance licence:", "",
                  "| licence | tasks |", "|---|---|"]
        lines += [f"| {name} | {n} |" for name, n in licences.most_common()]
    if run.report_md.is_file():
        lines += ["", "## End-of-training evaluation", "", run.report_md.read_text().strip()]
    results_md = run.eval_dir / "results.md"
    if results_md.is_file():
        lines += ["", "## `t2l eval` results", "", results_md.read_text().strip()]
    lines += [
        "", "## Usage", "",
        "```bash",
        "pip install t2l-framework",
        f't2l generate {repo_id} "Classify the sentiment of a movie review as positive or negative." -o sentiment',
        f't2l inspect {repo_id} "Classify the sentiment of a movie review."   # how familiar the description is',
        f"t2l serve {repo_id}   # web page + OpenAI-compatible API",
        "```", "",
        "The generated folder is a PEFT adapter:", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "sentiment")',
        "```", "",
        "In Python: `T2LRun.from_pretrained(repo_id, revision=...)` (`t2l_framework.assembly.hub`) gives the run "
        "folder; `t2l_framework.load_runtime(repo_id)` loads it. Nothing in the repo runs as code unless you pass "
        "`--trust-remote-code`.",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def card_data(base_model: str, encoder: str) -> ModelCardData:
    """The Hub metadata header; ``base_model`` only when it is a hub id (a local path means nothing there)."""
    from t2l_framework.assembly.hub import LIBRARY, TAGS, is_hub_id

    fields = {"library_name": LIBRARY, "tags": list(TAGS), "license": LICENSE, "datasets": list(DATASETS),
              "pipeline_tag": "text-generation"}
    if is_hub_id(base_model):
        fields["base_model"] = base_model
    if encoder and is_hub_id(encoder):
        fields["tags"].append(f"encoder:{encoder}")
    return ModelCardData(**fields)

