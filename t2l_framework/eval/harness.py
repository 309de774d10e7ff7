"""``t2l eval``: score adapters on benchmarks, all adapters of a benchmark in shared batches.

An *adapter* is a way of answering: ``base`` (no LoRA), ``base+description`` (the task
description in the prompt), ``t2l`` (a LoRA generated from the description), a description
control (the same hypernetwork given another text: ``DESCRIPTION_CONTROLS``), a PEFT folder
(oracle / multi-task LoRA), or ``arrow=LIBRARY_DIR`` (Arrow routing over a folder of task
LoRAs, ``lora/arrow.py``; no description). Adapters that use descriptions are scored once per description
(``n_descriptions`` of each benchmark's, drawn with a fixed seed) and averaged, as in the paper.

A benchmark's items may carry their own description (``Example.description``: a run's held-out
items, ``benchmarks.RunSplit``); then each item is scored once, with its own.

For each benchmark every (adapter, description) pair becomes a *unit*; the rows of all units
that are not in the result cache are pooled, sorted by length and batched, each row carrying
its own LoRA (zeros for the base model), so one batch mixes adapters. An Arrow unit routes
every token of its rows over the library, so its rows get batches of their own.

The protocol (``paper``, ``lm-eval``, ``chat``: ``eval.protocols``) decides prompts, answer
length and grading; each benchmark builds its examples and grades answers under it.
"""

from __future__ import annotations

import hashlib
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from t2l_framework.config import EvalConfig
from t2l_framework.console import say
from t2l_framework.data.description_controls import GENERIC_DESCRIPTION, other_task_description, random_description
from t2l_framework.errors import T2LError
from t2l_framework.eval.benchmarks import Benchmark, Example, GradeContext, Graded
from t2l_framework.eval.cache import ResultCache
from t2l_framework.eval.protocols import PROTOCOLS, adds_special_tokens, paper_chat_text, with_description
from t2l_framework.eval.stats import clustered_mean_se, mean_se, paired_difference
from t2l_framework.lora.arrow import ARROW_TEMPERATURE, ARROW_TOP_K, ArrowLibrary, load_arrow_library
from t2l_framework.lora.weights import LoraWeights
from t2l_framework.runtime.adapters import AdapterGenerator

HARNESS_VERSION = "2"
BUILTIN_ADAPTERS = ("base", "base+description", "t2l")
ANSWER_LOGLIK_TOKENS = 32  # reference-answer tokens (with EOS) that ``answer_logprob`` scores

# Controls: the evaluated run's hypernetwork given another text than the task's description.
# name -> text(description, task, slot, descs, seed); description: the one the item is asked with;
# descs[t]: the descriptions picked for task t of the benchmark.
DescriptionControl = Callable[[str, str, int, dict[str, list[str]], int], str]
DESCRIPTION_CONTROLS: dict[str, DescriptionControl] = {
    "other_description": lambda text, task, slot, descs, seed: other_task_description(
        f"{seed}-control-{task}-{slot}", task, list(descs), descs),
    "random_description": lambda text, task, slot, descs, seed: random_description(text, seed),
    "generic_description": lambda text, task, slot, descs, seed: GENERIC_DESCRIPTION,
}


def owner(example: Example) -> str:
    """Whose adapter an item's rows use: its task's, or its own when it carries its description."""
    return example.task if example.description is None else example.id


@dataclass
class AdapterSpec:
    """name: shown in the table. kind: base | description | t2l | peft | arrow | library. path: a PEFT
    folder, a T2L run or (arrow, library) a library of PEFT folders, one per task; None for ``t2l``
    means the hypernetwork of the run being evaluated. library: each item answered with its own
    task's adapter (the oracle of ``assembly.library_table``). control: a ``DESCRIPTION_CONTROLS``
    name (kind t2l): the text the hypernetwork gets instead of the description."""

    name: str
    kind: str
    path: Path | None = None
    control: str | None = None

    @property
    def uses_descriptions(self) -> bool:
        return self.kind in ("description", "t2l")


def parse_adapters(specs: Sequence[str], have_run: bool) -> list[AdapterSpec]:
    """``base``, ``base+description``, ``t2l`` (the evaluated run), a description control of the
    evaluated run (``other_description``, ``random_description``, ``generic_description``),
    ``arrow=LIBRARY_DIR``, ``NAME=PATH`` or ``PATH``.

    PATH is a PEFT adapter folder (``adapter_config.json``) or another T2L run / hypernet folder;
    LIBRARY_DIR holds one PEFT adapter folder per task (``data.lora_library``'s layout).
    """
    out: list[AdapterSpec] = []
    for spec in specs:
        spec = spec.strip()
        if not spec:
            continue
        if spec == "base":
            out.append(AdapterSpec("base", "base"))
        elif spec == "base+description":
            out.append(AdapterSpec("base+description", "description"))
        elif spec == "t2l":
            if not have_run:
                raise T2LError("--adapters t2l needs a trained run folder as RUN_OR_RECIPE "
                               "(or name one: t2l=runs/NAME)")
            out.append(AdapterSpec("t2l", "t2l"))  # no path: the evaluated run's hypernetwork
        elif spec in DESCRIPTION_CONTROLS:
            if not have_run:
                raise T2LError(f"--adapters {spec} needs a trained run folder as RUN_OR_RECIPE "
                               "(it gives that run's hypernetwork another text than the description)")
            out.append(AdapterSpec(spec, "t2l", control=spec))
        elif spec.startswith("arrow="):
            folder = Path(spec[len("arrow="):]).expanduser()
            if not folder.is_dir():
                raise T2LError(f"--adapters {spec}: the Arrow library {folder} does not exist")
            out.append(AdapterSpec("arrow", "arrow", folder))
        elif spec == "arrow":
            raise T2LError("--adapters arrow needs a library of PEFT task adapters: arrow=LIBRARY_DIR "
                           "(or the recipe's eval.arrow_library)")
        else:
            name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
            folder = Path(path).expanduser()
            if not folder.is_dir():
                raise T2LError(f"--adapters: '{spec}' is not base, base+description, t2l, "
                               f"{', '.join(DESCRIPTION_CONTROLS)} or an existing folder "
                               f"({folder} does not exist)")
            if (folder / "adapter_config.json").is_file():
                kind = "peft"
            elif (folder / "adapter" / "adapter_config.json").is_file():
                folder, kind = folder / "adapter", "peft"  # a LoRA-baseline run folder
            else:
                kind = "t2l"  # load_adapter_generator explains what is missing if it is not a T2L folder
            default_name = (folder.parent if folder.name in ("adapter", "hypernet") else folder).resolve().name
            out.append(AdapterSpec(name or default_name, kind, folder))
    names = [a.name for a in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise T2LError(f"--adapters: the name(s) {dupes} appear twice; name them: NAME=PATH")
    if not out:
        raise T2LError("--adapters: nothing to evaluate")
    return out


_DEFAULTS = EvalConfig()  # one home for evaluation defaults: the recipe schema


@dataclass
class EvalSettings:
    """limit: items per benchmark (0 = all). protocol: paper | lm-eval | chat (``eval.protocols``).
    scoring (chat only): multiple choice by 'loglik' or 'generate'. mc_answer (chat only):
    log-likelihood of the option 'label' (what the prompt asks for: "B") or its 'text'
    (normalised by its length in bytes). max_new_tokens: 0 = each benchmark's own length, else a cap.
    arrow_top_k / arrow_temperature: Arrow routing's experts per token (<= 0: all) and logit
    temperature (defaults: mttl's). answer_loglik: benchmarks of kind 'rouge' (reference answers,
    SNI) also get ``answer_logprob`` per item (``Evaluator._answer_logprobs``)."""

    limit: int = _DEFAULTS.limit
    n_descriptions: int = _DEFAULTS.n_descriptions
    scoring: str = "loglik"
    mc_answer: str = "label"
    batch_size: int = _DEFAULTS.batch_size
    max_new_tokens: int = 0
    code_timeout_s: float = 10.0
    seed: int = 0
    protocol: str = _DEFAULTS.protocol
    arrow_top_k: int = ARROW_TOP_K
    arrow_temperature: float = ARROW_TEMPERATURE
    answer_loglik: bool = _DEFAULTS.answer_loglik

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise T2LError(f"--protocol (eval.protocol) must be one of {', '.join(PROTOCOLS)}, not '{self.protocol}'")
        if self.scoring not in ("loglik", "generate"):
            raise T2LError(f"--scoring must be 'loglik' or 'generate', not '{self.scoring}'")
        if self.mc_answer not in ("label", "text"):
            raise T2LError(f"--mc-answer must be 'label' or 'text', not '{self.mc_answer}'")
        if self.n_descriptions < 1 or self.batch_size < 1 or self.limit < 0 or self.max_new_tokens < 0:
            raise T2LError("--n-descriptions and --batch-size must be >= 1, --limit and --max-new-tokens >= 0")
        if not self.arrow_temperature > 0:
            raise T2LError(f"--arrow-temperature must be > 0, not {self.arrow_temperature}")


@dataclass
class _Unit:
    adapter: AdapterSpec
    slot: int
    key: dict
    weights: dict[str, LoraWeights | None] = field(default_factory=dict)  # owner(example) -> adapter of this unit


def pick_descriptions(descriptions: Sequence[str], n: int, seed: int, task: str) -> list[str]:
    """n descriptions of a task, the same ones for the same seed (all of them if there are fewer)."""
    unique = list(dict.fromkeys(descriptions))
    if len(unique) <= n:
        return unique
    return random.Random(f"{seed}-{task}").sample(unique, n)


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class Evaluator:
    """Scores ``adapters`` on benchmarks with one runtime (base model + injected LoRA)."""

    def __init__(self, runtime, adapters: Sequence[AdapterSpec], settings: EvalSettings,
                 cache: ResultCache | None = None, show_progress: bool = True,
                 load_generator: Callable[[Path, Any], AdapterGenerator] | None = None):
        """load_generator(folder, device): an ``AdapterGenerator`` for a ``t2l=PATH`` adapter
        (``assembly.load_adapter_generator``; the assembly layer passes it)."""
        from t2l_framework.lora.peft_io import import_peft_adapter

        self.runtime, self.adapters, self.settings = runtime, list(adapters), settings
        self.cache = cache or ResultCache(None)
        self.show_progress = show_progress
        self.generators, self.peft, self.identity = {}, {}, {}
        self.arrow: dict[str, ArrowLibrary] = {}
        self.task_adapters: dict[str, dict[str, LoraWeights]] = {}  # library name -> task -> its adapter
        for spec in self.adapters:
            if spec.kind == "t2l":
                gen = runtime.generator
                if spec.path is not None:
                    if load_generator is None:
                        raise T2LError(f"--adapters {spec.name}: loading another run's hypernetwork needs "
                                       "Evaluator(load_generator=t2l_framework.assembly.load_adapter_generator)")
                    gen = load_generator(spec.path, runtime.device)
                    if gen.base_config.name_or_path != runtime.base_model_name:
                        raise T2LError(f"--adapters {spec.name}: its hypernetwork was trained for "
                                       f"'{gen.base_config.name_or_path}', but the evaluated model is "
                                       f"'{runtime.base_model_name}'")
                self.generators[spec.name] = gen
                self.identity[spec.name] = f"t2l:{gen.identity}"
            elif spec.kind == "peft":
                self.peft[spec.name] = import_peft_adapter(spec.path)
                self.identity[spec.name] = "peft:" + _digest([spec.path / "adapter_config.json",
                                                              spec.path / "adapter_model.safetensors"])
            elif spec.kind == "arrow":
                self.arrow[spec.name] = load_arrow_library(spec.path, settings.arrow_top_k, settings.arrow_temperature)
                files = sorted(p for d in spec.path.iterdir() if (d / "adapter_config.json").is_file()
                               for p in (d / "adapter_config.json", d / "adapter_model.safetensors"))
                self.identity[spec.name] = (f"arrow:k={settings.arrow_top_k}:t={settings.arrow_temperature:g}:"
                                            + _digest(files))
            elif spec.kind == "library":
                dirs = sorted(d for d in spec.path.iterdir() if (d / "adapter_config.json").is_file())
                self.task_adapters[spec.name] = {d.name: import_peft_adapter(d) for d in dirs}
                self.identity[spec.name] = "library:" + _digest(
                    [p for d in dirs for p in (d / "adapter_config.json", d / "adapter_model.safetensors")])
            else:
                self.identity[spec.name] = spec.kind
        every_peft = list(self.peft.values()) + [w for lib in self.task_adapters.values() for w in lib.values()]
        targets = [m for g in self.generators.values() for m in g.hypernet.target_modules]
        targets += [m for w in every_peft for m in w.modules]
        targets += [m for lib in self.arrow.values() for m in lib.modules]
        if targets:
            runtime.retarget(list(dict.fromkeys(targets)))  # adapters share targets: each module once
        ranks = [g.hypernet.rank for g in self.generators.values()] + [w.rank for w in every_peft]
        self.rank = max(ranks, default=1)
        shapes = runtime.injection.shapes if runtime.injection is not None else None
        try:
            self.peft = {n: w.conform(shapes, self.rank).to(runtime.device) for n, w in self.peft.items()}
            self.task_adapters = {n: {t: w.conform(shapes, self.rank).to(runtime.device) for t, w in lib.items()}
                                  for n, lib in self.task_adapters.items()}
        except T2LError as exc:
            raise T2LError(f"--adapters: a PEFT adapter does not fit {runtime.base_model_name}: {exc}") from None
        for name, lib in self.arrow.items():
            lib.check_fits(shapes, runtime.base_model_name)
            self.arrow[name] = lib.to(runtime.device)

    # --- one benchmark -------------------------------------------------------------------

    def _protocol(self, bench: Benchmark) -> str:
        return bench.protocol(self.settings.protocol)

    def _mode(self, bench: Benchmark) -> str:
        """'cloze', 'loglik' or 'generate' (``Benchmark.scoring``)."""
        return bench.scoring(self._protocol(bench), self.settings.scoring == "generate")

    def _units(self, bench: Benchmark, examples: list[Example], descs: dict[str, list[str]]) -> list[_Unit]:
        s, protocol, mode = self.settings, self._protocol(bench), self._mode(bench)
        own = all(ex.description is not None for ex in examples)  # each item asked with its own description
        n_slots = 1 if own else max(1, min(len(d) for d in descs.values()))
        fingerprint = bench.fingerprint()
        if any(a.control == "other_description" for a in self.adapters) and len(descs) < 2:
            raise T2LError(f"--adapters other_description needs a benchmark of several tasks (e.g. sni_unseen); "
                           f"'{bench.name}' has one")
        units = []
        for spec in self.adapters:
            seen_texts = []
            for slot in range(n_slots if spec.uses_descriptions else 1):
                texts = self._texts(spec, examples, descs, slot) if spec.uses_descriptions else None
                if texts is not None and texts in seen_texts:
                    continue  # e.g. the generic description: the same adapter in every slot, scored once
                seen_texts.append(texts)
                key = {"harness": HARNESS_VERSION, "model": self.runtime.base_model_name, "dtype": self.runtime.dtype,
                       "adapter": self.identity[spec.name], "benchmark": bench.name, "data": fingerprint,
                       "protocol": protocol, "items": [e.id for e in examples], "scoring": mode,
                       "mc_answer": s.mc_answer if mode == "loglik" else "",
                       "max_new_tokens": self._max_new(bench), "stop": list(bench.stop_texts(protocol)),
                       "chat_template": self.runtime.chat_template,
                       "code_timeout_s": s.code_timeout_s if bench.runs_programs else None,
                       "answer_loglik": self._scores_answers(bench),
                       "descriptions": texts}
                units.append(_Unit(spec, slot, key))
        return units

    def _texts(self, spec: AdapterSpec, examples: list[Example], descs: dict[str, list[str]],
               slot: int) -> dict[str, str]:
        """owner -> the text a unit's adapter is made from: the description, or its control's text."""
        control = DESCRIPTION_CONTROLS[spec.control] if spec.control else None
        out = {}
        for ex in examples:
            if owner(ex) not in out:
                text = ex.description if ex.description is not None else descs[ex.task][slot]
                out[owner(ex)] = control(text, ex.task, slot, descs, self.settings.seed) if control else text
        return out

    def _scores_answers(self, bench: Benchmark) -> bool:
        """Whether generated answers are also scored by the likelihood of the reference answers."""
        return self.settings.answer_loglik and bench.kind == "rouge" and self._mode(bench) == "generate"

    def _max_new(self, bench: Benchmark) -> int:
        if self._mode(bench) != "generate":
            return 0
        own, cap = bench.answer_length(self._protocol(bench)), self.settings.max_new_tokens
        return min(own, cap) if cap else own

    def _attach_weights(self, units: list[_Unit], examples: list[Example]) -> None:
        """Every unit's adapter per owner (task, or item); the T2L adapters of a benchmark come
        from one forward per hypernetwork, each distinct text once."""
        shapes = self.runtime.injection.shapes if self.runtime.injection is not None else None
        owners = list(dict.fromkeys(owner(ex) for ex in examples))
        for name, gen in self.generators.items():
            todo = [u for u in units if u.adapter.name == name]
            if not todo:
                continue
            texts = list(dict.fromkeys(text for u in todo for text in u.key["descriptions"].values()))
            weights = gen.adapters(texts).conform(shapes, self.rank).to(self.runtime.device)
            row = {text: i for i, text in enumerate(texts)}
            for u in todo:
                u.weights = {o: weights.select(row[text]) for o, text in u.key["descriptions"].items()}
        task_of = {owner(ex): ex.task for ex in examples}
        for u in units:
            if u.adapter.kind == "peft":
                u.weights = {o: self.peft[u.adapter.name] for o in owners}
            elif u.adapter.kind == "library":
                lib = self.task_adapters[u.adapter.name]
                missing = sorted({t for t in task_of.values() if t not in lib})
                if missing:
                    raise T2LError(f"adapter '{u.adapter.name}': {u.adapter.path} has no task adapter for "
                                   f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
                u.weights = {o: lib[task_of[o]] for o in owners}
            elif u.adapter.kind in ("base", "description", "arrow"):  # arrow: routed in _score
                u.weights = {o: None for o in owners}

    def _prompt(self, bench: Benchmark, unit: _Unit, example: Example) -> str:
        """The chat text up to where the answer starts; base+description puts the description
        first in the user turn, as the reference does."""
        user = example.prompt
        if unit.adapter.kind == "description":
            user = with_description(unit.key["descriptions"][owner(example)], user)
        if example.system is not None:
            text = paper_chat_text(self.runtime, user, example.system)
        elif bench.system_prompt:
            text = self.runtime.format([{"role": "system", "content": bench.system_prompt},
                                        {"role": "user", "content": user}])
        else:
            text = self.runtime.format(user)
        return text + (example.prefill if example.prefill is not None else bench.prefill)

    def _cloze_context(self, unit: _Unit, example: Example, context: str) -> str:
        """lm-eval contexts are raw text; base+description puts the description before them."""
        if unit.adapter.kind == "description":
            return with_description(unit.key["descriptions"][owner(example)], context)
        return context

    def _fit(self, ids: list[int], reserve: int, cap: int = 0) -> tuple[list[int], bool]:
        """Cut a prompt from the left so that it and ``reserve`` more tokens fit the context, and to
        at most ``cap`` tokens (0: no cap)."""
        limit = self.runtime.context - reserve if self.runtime.context else 0
        limit = min(limit, cap) if limit > 0 and cap > 0 else limit or cap
        if limit > 0 and len(ids) > limit:
            return ids[-limit:], True
        return ids, False

    def _prompt_caps(self, bench: Benchmark, units: list[_Unit], examples: list[Example]) -> list[int]:
        """Per (unit, example) row: the benchmark's ``max_prompt_tokens`` (0: none); a description in the
        prompt gets its own budget on top (its tokens + 8), so it survives the cut from the left."""
        if not bench.max_prompt_tokens:
            return [0] * (len(units) * len(examples))
        lengths: dict[str, int] = {}
        caps = []
        for u in units:
            for ex in examples:
                extra = 0
                if u.adapter.kind == "description":
                    text = u.key["descriptions"][owner(ex)]
                    if text not in lengths:
                        lengths[text] = len(self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])
                    extra = lengths[text] + 8
                caps.append(bench.max_prompt_tokens + extra)
        return caps

    def _plan(self, bench: Benchmark) -> tuple[list[Example], list[_Unit]]:
        """A benchmark's items and its units: every (adapter, description slot) to score them with."""
        examples = bench.examples(self.settings.limit, self._protocol(bench))
        if not examples:
            raise T2LError(f"benchmark '{bench.name}' has no examples")
        tasks = list(dict.fromkeys(e.task for e in examples))
        descs = {t: pick_descriptions(bench.descriptions(t), self.settings.n_descriptions, self.settings.seed, t)
                 for t in tasks}
        return examples, self._units(bench, examples, descs)

    def run_benchmark(self, bench: Benchmark) -> dict[str, dict]:
        """{adapter: {"score", "se", "n", "per_description", "cached", "truncated"}} + predictions."""
        examples, units = self._plan(bench)
        done: dict[int, dict] = {}
        for i, u in enumerate(units):
            hit = self.cache.get(u.key)
            if hit is not None:
                done[i] = dict(hit, cached=True)
        todo = [i for i in range(len(units)) if i not in done]
        if todo:
            self._attach_weights([units[i] for i in todo], examples)
            for i, value in zip(todo, self._score([units[i] for i in todo], bench, examples)):
                self.cache.put(units[i].key, value)
                done[i] = dict(value, cached=False)
        return self._aggregate(bench, examples, units, done)

    def _aggregate(self, bench, examples, units, done) -> dict:
        """Per adapter: mean and SE of each metric over items (descriptions averaged per item first),
        and the paired difference against ``base`` on the same items.

        Items of several tasks (``sni_unseen``) are not independent: their SEs are clustered by
        task (``stats.clustered_mean_se``); items of one benchmark are independent draws.
        """
        tasks = [ex.task for ex in examples]
        clusters = tasks if len(set(tasks)) > 1 else None

        def summary(values):
            return clustered_mean_se(values, clusters) if clusters else mean_se(values)

        def averaged(slots: list[list[float]]) -> list[float]:
            return [sum(s[j] for s in slots) / len(slots) for j in range(len(examples))]

        out, predictions, per_item = {}, [], {}
        for spec in self.adapters:
            idx = [i for i, u in enumerate(units) if u.adapter.name == spec.name]
            per_slot = [done[i]["scores"] for i in idx]
            extra_names = list(done[idx[0]].get("extra") or {})
            per_item[spec.name] = {bench.metric: averaged(per_slot)}
            for name in extra_names:
                per_item[spec.name][name] = averaged([done[i]["extra"][name] for i in idx])
            score, se = summary(per_item[spec.name][bench.metric])
            out[spec.name] = {"score": score, "se": se, "n": len(examples),
                              "per_description": [sum(s) / len(s) for s in per_slot],
                              "cached": all(done[i]["cached"] for i in idx),
                              "truncated": sum(done[i].get("truncated", 0) for i in idx),
                              "metrics": {name: dict(zip(("score", "se"), summary(per_item[spec.name][name])))
                                          for name in extra_names}}
            for i in idx:
                extra = done[i].get("extra") or {}
                for j, (ex, pred, sc) in enumerate(zip(examples, done[i]["predictions"], done[i]["scores"])):
                    row = {"benchmark": bench.name, "adapter": spec.name, "description_slot": units[i].slot,
                           "id": ex.id, "prediction": pred, "score": sc}
                    row.update({name: values[j] for name, values in extra.items()})
                    predictions.append(row)
        base = next((a.name for a in self.adapters if a.kind == "base"), None)
        if base is not None:
            for name, metrics in per_item.items():
                if name == base:
                    continue
                for metric, values in metrics.items():
                    if metric not in per_item[base]:
                        continue
                    diff = dict(zip(("diff", "se"), paired_difference(values, per_item[base][metric], clusters)))
                    target = out[name] if metric == bench.metric else out[name]["metrics"][metric]
                    target["vs_base"] = diff
        return {"scores": out, "predictions": predictions, "n": len(examples), "clustered": clusters is not None}

    # --- scoring -------------------------------------------------------------------------

    def _bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="row", disable=not self.show_progress, leave=False, dynamic_ncols=True)

    def _score(self, units: list[_Unit], bench: Benchmark, examples: list[Example]) -> list[dict]:
        """Every unit's scores; the per-sample units share batches, each Arrow unit runs on its own
        with its library routed in every layer."""
        out: list[dict] = [{}] * len(units)
        for idx, routing in self._batch_groups(units):
            with routing:
                for i, value in zip(idx, self._score_units([units[i] for i in idx], bench, examples)):
                    out[i] = value
        return out

    def _batch_groups(self, units: list[_Unit]):
        """(unit indices, context to score them in): the per-sample units together, each Arrow unit
        alone with its library routed in every layer."""
        shared = [i for i, u in enumerate(units) if u.adapter.kind != "arrow"]
        if shared:
            yield shared, nullcontext()
        for i, u in enumerate(units):
            if u.adapter.kind == "arrow":
                yield [i], self.runtime.injection.use_arrow(self.arrow[u.adapter.name])

    def _score_units(self, units: list[_Unit], bench: Benchmark, examples: list[Example]) -> list[dict]:
        mode = self._mode(bench)
        if mode == "cloze":
            return self._score_cloze(units, bench, examples)
        if mode == "loglik":
            return self._score_loglik(units, bench, examples)
        return self._score_generated(units, bench, examples)

    def _score_cloze(self, units, bench, examples) -> list[dict]:
        """lm-evaluation-harness multiple choice: log p(continuation | context) per option, raw text,
        tokenized as the harness does; acc, and acc_norm where the benchmark defines it."""
        from t2l_framework.eval.loglik import OptionsRow, encode_pair, option_logprobs, sequence_count
        from t2l_framework.eval.scoring import ClozeAccuracy

        tok, special = self.runtime.tokenizer, adds_special_tokens(self._protocol(bench))
        rows, where, truncated = [], [], [0] * len(units)  # where[k][j]: (row, option) of each option
        encoded: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        for k, u in enumerate(units):
            places = []
            for ex in examples:
                by_context: dict[str, list[int]] = {}
                for i, (context, continuation) in enumerate(ex.cloze):
                    by_context.setdefault(self._cloze_context(u, ex, context), []).append(i)
                spots = [None] * len(ex.cloze)
                for context, idx in by_context.items():
                    pairs = []
                    for i in idx:
                        if (context, ex.cloze[i][1]) not in encoded:
                            encoded[context, ex.cloze[i][1]] = encode_pair(tok, context, ex.cloze[i][1], special)
                        pairs.append(encoded[context, ex.cloze[i][1]])
                    ctx_ids, cut = self._fit(pairs[0][0], max(len(p[1]) for p in pairs))
                    truncated[k] += cut
                    for n, i in enumerate(idx):
                        spots[i] = (len(rows), n)
                    rows.append(OptionsRow(ctx_ids, [p[1] for p in pairs], u.weights[owner(ex)]))
                places.append(spots)
            where.append(places)
        with self._bar(sequence_count(rows), f"{bench.name}: log-likelihood") as bar:
            logprobs = option_logprobs(self.runtime.model, self.runtime.injection, rows, self.settings.batch_size,
                                       self.runtime.pad_id, progress=bar.update)
        out = []
        for k in range(len(units)):
            lls = [[logprobs[r][n] for r, n in spots] for spots in where[k]]
            gold = [ex.gold for ex in examples]
            acc = ClozeAccuracy()
            acc.update(lls, gold)
            value = {"scores": acc.scores(), "truncated": truncated[k], "extra": {},
                     "predictions": [{"choice": ClozeAccuracy.choose(lp), "logprobs": [round(v, 5) for v in lp]}
                                     for lp in lls]}
            if all(ex.norm_lengths is not None for ex in examples):
                norm = ClozeAccuracy(normalize=True)
                norm.update(lls, gold, [ex.norm_lengths for ex in examples])
                value["extra"]["acc_norm"] = norm.scores()
                for pred, lp, ex in zip(value["predictions"], lls, examples):
                    pred["choice_norm"] = ClozeAccuracy.choose(lp, ex.norm_lengths)
            out.append(value)
        return out

    def _score_loglik(self, units, bench, examples) -> list[dict]:
        from t2l_framework.eval.loglik import OptionsRow, encode_continuations, option_logprobs, sequence_count
        from t2l_framework.eval.scoring import MultipleChoiceAccuracy, select_option

        by_text = self.settings.mc_answer == "text"
        rows, truncated = [], [0] * len(units)
        encoded: dict[tuple[str, str], tuple[list[int], list[list[int]]]] = {}  # units share most prompts
        for k, u in enumerate(units):
            for ex in examples:
                answers = ex.options if by_text else ex.labels
                prompt = self._prompt(bench, u, ex)
                if (ex.id, prompt) not in encoded:
                    encoded[ex.id, prompt] = encode_continuations(self.runtime.tokenizer, prompt, answers)
                context, options = encoded[ex.id, prompt]
                context, cut = self._fit(context, max(len(o) for o in options))
                truncated[k] += cut
                rows.append(OptionsRow(context, options, u.weights[owner(ex)]))
        with self._bar(sequence_count(rows), f"{bench.name}: log-likelihood") as bar:
            logprobs = option_logprobs(self.runtime.model, self.runtime.injection, rows, self.settings.batch_size,
                                       self.runtime.pad_id, progress=bar.update)
        out = []
        for k in range(len(units)):
            part = logprobs[k * len(examples):(k + 1) * len(examples)]
            metric = MultipleChoiceAccuracy(normalize=by_text)
            lengths = [[len(o.encode("utf-8")) for o in ex.options] for ex in examples] if by_text else None
            metric.update(part, [ex.gold for ex in examples], lengths)
            chosen = [{"choice": select_option(lp, ln), "logprobs": [round(v, 5) for v in lp]}
                      for lp, ln in zip(part, lengths or [None] * len(part))]
            out.append({"scores": metric.scores(), "predictions": chosen, "truncated": truncated[k]})
        return out

    def _generation_rows(self, units, bench, examples) -> tuple[list[list[int]], list, list[int]]:
        """Per (unit, item) row, units outer: the prompt ids (cut as generation cuts them) and the
        row's adapter; and per unit how many prompts were cut."""
        max_new, protocol = self._max_new(bench), self._protocol(bench)
        prompts, weights, truncated = [], [], [0] * len(units)
        texts = [self._prompt(bench, u, ex) for u in units for ex in examples]
        encoded = self.runtime.tokenizer(texts, add_special_tokens=adds_special_tokens(protocol))["input_ids"]
        caps = self._prompt_caps(bench, units, examples)
        for n, ids in enumerate(encoded):
            k, j = divmod(n, len(examples))
            ids, cut = self._fit(list(ids), max_new, caps[n])
            truncated[k] += cut
            prompts.append(ids)
            weights.append(units[k].weights[owner(examples[j])])
        return prompts, weights, truncated

    def answer_likelihood(self, bench: Benchmark) -> tuple[list[str], dict[str, list[float]]]:
        """(each item's task, {adapter: per item ``answer_logprob``}) without generating: the fast check
        of a benchmark with reference answers (kind 'rouge'), e.g. whether the adapters depend on the
        description. Each adapter's descriptions are averaged per item, as ``run_benchmark`` averages
        scores."""
        if bench.kind != "rouge" or self._mode(bench) != "generate":
            raise T2LError(f"benchmark '{bench.name}' has no reference answers to score (kind '{bench.kind}')")
        examples, units = self._plan(bench)
        self._attach_weights(units, examples)
        n, per_unit = len(examples), {}
        for idx, routing in self._batch_groups(units):
            with routing:
                prompts, weights, _ = self._generation_rows([units[i] for i in idx], bench, examples)
                values = self._answer_logprobs(bench, prompts, weights, examples)
            per_unit.update({i: values[k * n:(k + 1) * n] for k, i in enumerate(idx)})
        out: dict[str, list[list[float]]] = {}
        for i, u in enumerate(units):
            out.setdefault(u.adapter.name, []).append(per_unit[i])
        return ([ex.task for ex in examples],
                {name: [sum(s[j] for s in slots) / len(slots) for j in range(n)] for name, slots in out.items()})

    def _score_generated(self, units, bench, examples) -> list[dict]:
        from t2l_framework.runtime.greedy import greedy_decode

        rt, max_new = self.runtime, self._max_new(bench)
        stop = bench.stop_texts(self._protocol(bench))
        prompts, weights, truncated = self._generation_rows(units, bench, examples)
        answers = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        with self._bar(len(prompts), f"{bench.name}: generating") as bar:
            for start in range(0, len(order), self.settings.batch_size):
                idx = order[start:start + self.settings.batch_size]
                outs = greedy_decode(rt.model, [prompts[i] for i in idx], [weights[i] for i in idx], rt.injection,
                                     max_new, rt.eos_ids, rt.pad_id, stop, rt.tokenizer)
                for i, tokens in zip(idx, outs):
                    answers[i] = rt.tokenizer.decode(tokens, skip_special_tokens=True)
                bar.update(len(idx))
        out = [dict(self._grade(bench, examples, answers[k * len(examples):(k + 1) * len(examples)]),
                    truncated=truncated[k]) for k in range(len(units))]
        if self._scores_answers(bench):
            likelihood = self._answer_logprobs(bench, prompts, weights, examples)
            for k, value in enumerate(out):
                value["extra"] = dict(value.get("extra") or {},
                                      answer_logprob=likelihood[k * len(examples):(k + 1) * len(examples)])
        return out

    def _answer_logprobs(self, bench: Benchmark, prompts: list[list[int]], weights: list, examples: list[Example]
                         ) -> list[float]:
        """Per (unit, item) row: the mean log-probability per token of the item's reference answer and the
        EOS after it, given the row's prompt and adapter, best over the item's references (nats/token).

        The answer is tokenized alone and ends with EOS, as training encodes it (``data.encoding``),
        so this is the quantity the SFT loss maximises, on the evaluated items. Unlike exact match it
        moves with every token of every item, which lets a small split tell conditions apart; the
        first ``ANSWER_LOGLIK_TOKENS`` tokens of a long reference count.
        """
        from t2l_framework.data.encoding import eos_id
        from t2l_framework.eval.loglik import OptionsRow, option_logprobs, sequence_count

        tok = self.runtime.tokenizer
        eos = eos_id(tok)
        refs = [list(dict.fromkeys(str(a) for a in ex.gold)) or [""] for ex in examples]
        flat = [a for r in refs for a in r]
        ids = tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        answers, at = [], 0
        for r in refs:
            answers.append([(list(i) + [eos])[:ANSWER_LOGLIK_TOKENS] for i in ids[at:at + len(r)]])
            at += len(r)
        rows = [OptionsRow(prompt, answers[n % len(examples)], w) for n, (prompt, w) in enumerate(zip(prompts, weights))]
        with self._bar(sequence_count(rows), f"{bench.name}: answer likelihood") as bar:
            logprobs = option_logprobs(self.runtime.model, self.runtime.injection, rows, self.settings.batch_size,
                                       self.runtime.pad_id, progress=bar.update)
        return [max(lp / len(option) for lp, option in zip(row_lp, row.options)) for row_lp, row in zip(logprobs, rows)]

    def _grade(self, bench: Benchmark, examples: list[Example], answers: list[str]) -> dict:
        """The benchmark grades its own answers (built-in scorers, the sandbox, or a plugin's metric)."""
        with self._bar(len(answers), f"{bench.name}: grading") as bar:
            context = GradeContext(self.settings.code_timeout_s, progress=lambda n: bar.update(n - bar.n))
            graded = bench.grade(examples, answers, self._protocol(bench), context)
        if not isinstance(graded, Graded):
            graded = Graded(list(graded))
        if len(graded.scores) != len(answers):
            raise T2LError(f"benchmark '{bench.name}': grade() gave {len(graded.scores)} scores for "
                           f"{len(answers)} answers")
        return {"scores": [float(v) for v in graded.scores], "predictions": answers, **graded.details}

    # --- everything --------------------------------------------------------------------------

    def run(self, benchmarks: Sequence[Benchmark]) -> tuple[dict, list[dict]]:
        """(results, predictions) for ``write_outputs``."""
        start = time.perf_counter()
        base = next((a.name for a in self.adapters if a.kind == "base"), None)
        results = {"model": {"name": self.runtime.base_model_name, "dtype": self.runtime.dtype}, "baseline": base,
                   "adapters": {a.name: {"kind": a.kind, "path": str(a.path) if a.path else None,
                                         "identity": self.identity[a.name]} for a in self.adapters},
                   "settings": vars(self.settings).copy(), "benchmarks": {},
                   "scores": {a.name: {} for a in self.adapters}}
        predictions = []
        for bench in benchmarks:
            t0 = time.perf_counter()
            part = self.run_benchmark(bench)
            extra = sorted({m for v in part["scores"].values() for m in v["metrics"]})
            results["benchmarks"][bench.name] = {"kind": bench.kind, "metric": bench.metric, "metrics": extra,
                                                 "protocol": self._protocol(bench), "scoring": self._mode(bench),
                                                 "n": part["n"], "se_clustered_by_task": part["clustered"],
                                                 "seconds": round(time.perf_counter() - t0, 2)}
            for name, value in part["scores"].items():
                results["scores"][name][bench.name] = value
            predictions += part["predictions"]
            if self.show_progress:
                line = "  ".join(f"{n} {100 * v['score']:.1f}" for n, v in part["scores"].items())
                cached = " (cached)" if all(v["cached"] for v in part["scores"].values()) else ""
                say(f"{bench.name}: {line}  [{time.perf_counter() - t0:.1f} s{cached}]")
        results["seconds"] = round(time.perf_counter() - start, 2)
        results["cache"] = {"hits": self.cache.hits, "misses": self.cache.misses,
                            "folder": str(self.cache.folder) if self.cache.folder else None}
        return results, predictions
