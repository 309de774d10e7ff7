"""Using a trained hypernetwork: ``load_run(folder) -> T2LRuntime``.

A runtime holds the frozen base model (with batched LoRA injected once), its tokenizer and
chat format, the text encoder and the hypernetwork. It turns descriptions into adapters
(one hypernetwork forward per batch), exports them as PEFT folders, and chats with a batch
of prompts where every row may carry its own adapter or none (base model).
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from omegaconf import OmegaConf

from t2l_framework.console import say
from t2l_framework.errors import T2LError
from t2l_framework.lora.weights import LoraWeights, stack_rows

Messages = list[dict]  # OpenAI-style [{"role": "system" | "user" | "assistant", "content": str}]
RowWeights = LoraWeights | Sequence[LoraWeights | None] | None


@dataclass
class Completion:
    """One row's answer: text (without EOS), 'stop' or 'length', and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], int)


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _locate(folder: Path) -> tuple[Path, Path | None]:
    """(hypernet folder, recipe.yaml or None) for a run folder or a hypernet folder."""
    from t2l_framework.hypernet.checkpoint import CONFIG_NAME

    if not folder.is_dir():
        raise T2LError(f"{folder}: no such folder; expected a run folder (runs/NAME) or its hypernet/ folder")
    if (folder / CONFIG_NAME).is_file():
        recipe = folder.parent / "recipe.yaml"
        return folder, recipe if recipe.is_file() else None
    if (folder / "hypernet" / CONFIG_NAME).is_file():
        recipe = folder / "recipe.yaml"
        return folder / "hypernet", recipe if recipe.is_file() else None
    if (folder / "adapter" / "adapter_config.json").is_file():
        raise T2LError(f"{folder}: a LoRA-baseline run (its adapter/ is already a PEFT folder); "
                       "generating adapters needs a T2L run with a hypernet/ folder")
    raise T2LError(f"{folder}: not a T2L run folder (no recipe.yaml + hypernet/) nor a hypernet folder "
                   "(no hypernet_config.json); train one with `t2l fit RECIPE`")


@dataclass
class AdapterGenerator:
    """A trained hypernetwork and its text encoder: descriptions in, LoRA weights out.

    identity: sha256 of the hypernetwork's files; adapters are only comparable (and
    cacheable) under the same identity. base_config: the base model it was trained for.
    """

    hypernet: object
    encoder: object
    identity: str
    name: str
    base_config: object
    chat_template: bool = True

    @torch.inference_mode()
    def generate(self, descriptions: Sequence[str]) -> LoraWeights:
        """One encoder + hypernetwork forward for all descriptions: A[m]: [n, layers, r, in]."""
        descriptions = [descriptions] if isinstance(descriptions, str) else list(descriptions)
        if not descriptions or any(not d.strip() for d in descriptions):
            raise T2LError("task descriptions must be non-empty text")
        return self.hypernet.generate(descriptions, self.encoder)


TRUST_HINT = "pass --trust-remote-code (Python: trust_remote_code=True) only if you trust where this run came from"


def check_run_trust(cfg, where, trust_remote_code: bool) -> None:
    """Refuse a run's recipe that would execute code (a model's custom modelling code, or a head
    named by import path) unless the user said they trust it: run folders are downloaded input."""
    if trust_remote_code:
        return
    for key in ("base_model.trust_remote_code", "encoder.trust_remote_code"):
        if cfg is not None and OmegaConf.select(cfg, key, default=False):
            raise T2LError(f"{where}: {key} is true, so loading this run would execute Python code that ships "
                           f"with its model; {TRUST_HINT}")
    head = OmegaConf.select(cfg, "hypernet.head", default="") if cfg is not None else ""
    if ":" in str(head):
        raise T2LError(f"{where}: hypernet.head '{head}' is an import path, so loading this run would import and "
                       f"run that module; {TRUST_HINT}")


def load_generator(folder: str | Path, device: str | torch.device, trust_remote_code: bool = False) -> AdapterGenerator:
    """The hypernetwork and encoder of a run folder (``recipe.yaml`` + ``hypernet/``) or a bare
    hypernet folder; a bare folder takes the base model and encoder its config records.

    Nothing in the folder runs as code unless ``trust_remote_code``: a recipe asking for a
    model's custom code or a head named by import path is refused with the reason.
    """
    from t2l_framework.config import BaseModelConfig, EncoderConfig, load_recipe
    from t2l_framework.encoders import build_encoder
    from t2l_framework.hypernet.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config
    from t2l_framework.hypernet.hypernetwork import HyperNetwork

    hyper_dir, recipe = _locate(Path(folder).expanduser())
    meta = read_config(hyper_dir)
    check_run_trust(OmegaConf.create({"hypernet": meta["hypernet"]}), hyper_dir / CONFIG_NAME, trust_remote_code)
    if recipe is not None:
        cfg = load_recipe(recipe, check_files=False)  # its data files belong to the machine it was trained on
        check_run_trust(cfg, recipe, trust_remote_code)
        base_cfg, enc_cfg = cfg.base_model, cfg.encoder
    else:
        base_cfg = OmegaConf.structured(BaseModelConfig(name_or_path=meta["base_model"]))
        known = set(EncoderConfig.__dataclass_fields__)
        try:
            enc_cfg = OmegaConf.structured(EncoderConfig(**{k: v for k, v in meta["encoder"].items() if k in known}))
        except Exception as exc:  # noqa: BLE001 - OmegaConf's type errors, named for the user
            raise T2LError(f"{hyper_dir / CONFIG_NAME}: 'encoder': {str(exc).splitlines()[0]}") from None
        check_run_trust(OmegaConf.create({"encoder": OmegaConf.to_container(enc_cfg)}), hyper_dir / CONFIG_NAME,
                        trust_remote_code)
    if "normalize_scale" not in meta.get("encoder", {}):
        # Saved before task embeddings followed the reference (x sqrt(d), full stop): keep what it was trained on.
        enc_cfg = OmegaConf.merge(enc_cfg, {"normalize_scale": "unit", "full_stop": False})
    hypernet = HyperNetwork.from_pretrained(hyper_dir, expect_base_model=base_cfg.name_or_path, device=device)
    encoder = build_encoder(enc_cfg).to(device)
    identity = _file_digest([hyper_dir / CONFIG_NAME, hyper_dir / WEIGHTS_NAME])
    name = (hyper_dir.parent if recipe is not None else hyper_dir).resolve().name
    return AdapterGenerator(hypernet, encoder, identity, name, base_cfg, bool(base_cfg.chat_template))


def load_run(folder: str | Path, device: str | torch.device | None = None, dtype: str | None = "auto",
             trust_remote_code: bool = False) -> "T2LRuntime":
    """Load a run folder (``recipe.yaml`` + ``hypernet/``) or a bare hypernet folder.

    The recipe gives the base model and encoder settings; a bare hypernet folder falls back
    to what its ``hypernet_config.json`` records (base model name, encoder). dtype: the base
    model's weights: 'auto' = bfloat16 where the device does it natively, else float32
    (``llm/dtype.py``); None = the recipe's ``base_model.dtype``. trust_remote_code: see
    ``load_generator``; without it, opening a run never executes code from it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = load_generator(folder, device, trust_remote_code)
    return runtime_for(generator.base_config, device, dtype, generator)


def runtime_for(base_cfg, device: str | torch.device | None = None, dtype: str | None = "auto",
                generator: AdapterGenerator | None = None, target_modules: Sequence[str] = ()) -> "T2LRuntime":
    """Load the base model of ``base_cfg`` (a ``BaseModelConfig``) with LoRA injected on the
    generator's targets (or ``target_modules`` when there is no generator)."""
    from t2l_framework.llm.loading import load_base_model
    from t2l_framework.lora.batched import inject_lora

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is not None:
        base_cfg = OmegaConf.merge(base_cfg, {"dtype": dtype})
    base = load_base_model(base_cfg, device=device, say=say)
    targets = generator.hypernet.target_modules if generator is not None else list(target_modules)
    injection = inject_lora(base.model, targets) if targets else None
    return T2LRuntime(base, injection, generator, bool(base_cfg.chat_template), base.dtype.name)


class T2LRuntime:
    """Base model + injected LoRA (+ the hypernetwork that makes adapters), ready for generation.

    generator: None for a bare base model (PEFT adapters only). Not thread-safe: call from one
    thread at a time.
    """

    def __init__(self, base, injection, generator: AdapterGenerator | None = None, chat_template: bool = True,
                 dtype: str = ""):
        self.base, self.model, self.tokenizer = base, base.model, base.tokenizer
        self.injection, self.generator = injection, generator
        self.chat_template, self.dtype = chat_template, dtype
        self.identity = generator.identity if generator else ""
        self.name = generator.name if generator else base.name_or_path
        self.device = next(self.model.parameters()).device
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = [self.tokenizer.eos_token_id] + (gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = {int(e) for e in eos if e is not None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)

    @property
    def base_model_name(self) -> str:
        return self.base.name_or_path

    @property
    def hypernet(self):
        return self.generator.hypernet if self.generator else None

    # --- adapters --------------------------------------------------------------------------

    def adapters(self, descriptions: Sequence[str]) -> LoraWeights:
        """One encoder + hypernetwork forward for all descriptions: A[m]: [n, layers, r, in]."""
        if self.generator is None:
            raise T2LError("this runtime has no hypernetwork (it was loaded from a recipe, not a run folder)")
        return self.generator.generate(descriptions)

    def retarget(self, target_modules: Sequence[str]) -> None:
        """Re-inject LoRA so that it covers ``target_modules`` too (e.g. a PEFT adapter's)."""
        from t2l_framework.lora.batched import inject_lora

        current = list(self.injection.shapes.modules) if self.injection else []
        wanted = current + [t for t in target_modules if t not in current]
        if wanted == current:
            return
        if self.injection is not None:
            self.injection.remove()
        self.injection = inject_lora(self.model, wanted)

    def export(self, descriptions: Sequence[str] | LoraWeights, out_dirs: Sequence[str | Path]) -> list[Path]:
        """Write one PEFT adapter folder per description (or per row of given weights)."""
        from t2l_framework.lora.peft_io import export_peft_adapter

        weights = descriptions if isinstance(descriptions, LoraWeights) else self.adapters(descriptions)
        if weights.batch_size != len(out_dirs):
            raise T2LError(f"{weights.batch_size} adapters but {len(out_dirs)} output folders")
        return [export_peft_adapter(weights.select(i).to("cpu"), d, self.base_model_name, paths=self.injection.paths)
                for i, d in enumerate(out_dirs)]

    # --- chat ------------------------------------------------------------------------------

    def format(self, prompt: str | Messages) -> str:
        """Chat text for a user prompt or a message list, ending where the answer starts."""
        family, tok = self.base.family, self.tokenizer
        if isinstance(prompt, str):
            return family.format_prompt(tok, prompt, chat_template=self.chat_template)
        roles = [m["role"] for m in prompt]
        if not prompt or roles[-1] != "user":
            raise T2LError("messages must end with a user message")
        if roles[:-1] in ([], ["system"]):  # the common case goes through the family's own format
            system = prompt[0]["content"] if len(prompt) == 2 else ""
            return family.format_prompt(tok, prompt[-1]["content"], system, chat_template=self.chat_template)
        if not (self.chat_template and getattr(tok, "chat_template", None)):
            names = {"system": "", "user": "User: ", "assistant": "Assistant: "}
            return "\n".join(names[m["role"]] + m["content"] for m in prompt) + "\nAssistant:"
        messages = [dict(m) for m in prompt]
        if messages[0]["role"] == "system" and not family.system_role:  # fold into the first user turn
            system = messages.pop(0)["content"]
            messages[0]["content"] = f"{system}\n\n{messages[0]['content']}"
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **family.template_kwargs)

    def encode(self, prompt: str | Messages, max_new_tokens: int = 0) -> list[int]:
        """Prompt token ids; T2LError when prompt + answer would not fit the model's context."""
        ids = list(self.tokenizer(self.format(prompt), add_special_tokens=False)["input_ids"])
        if self.context and len(ids) + max_new_tokens > self.context:
            raise T2LError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
                           f"context of {self.context} tokens")
        return ids

    def _row_weights(self, weights: RowWeights, n: int) -> LoraWeights | None:
        """One LoraWeights for the batch: batch 1 when every row shares it, zeros for base rows."""
        if weights is None or isinstance(weights, LoraWeights):
            if weights is not None and weights.batch_size not in (1, n):
                raise T2LError(f"{weights.batch_size} adapters for {n} prompts")
            return weights
        rows = list(weights)
        if len(rows) != n:
            raise T2LError(f"{len(rows)} adapters (or None) for {n} prompts")
        return stack_rows(rows)

    @torch.inference_mode()
    def chat(self, prompts: Sequence[str | Messages | list[int]], weights: RowWeights = None,
             max_new_tokens: int | Sequence[int] = 64, temperature: float | Sequence[float] = 0.0,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
        """Answer a batch of prompts in one ``generate`` call, row i with adapter i.

        prompts: user text, message lists, or token ids from ``encode``. weights: None (base
        model for all), LoraWeights of batch 1 (shared) or len(prompts), or a list with a
        batch-1 LoraWeights or None (base) per row. max_new_tokens / temperature: one value
        or one per row (temperature 0 = greedy). on_text(row, delta): streamed text.
        """
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from t2l_framework.decoding import RowLimits, RowStreamer, RowTemperature, cut_row
        from t2l_framework.eval.generation import left_pad

        n = len(prompts)
        if n == 0:
            return []
        per_row = lambda v: [v] * n if isinstance(v, (int, float)) else list(v)  # noqa: E731
        max_new, temps = per_row(max_new_tokens), per_row(temperature)
        ids = [list(p) if _is_ids(p) else self.encode(p, max(max_new)) for p in prompts]
        input_ids, mask = left_pad(ids, self.pad_id, self.device)
        lora = self._row_weights(weights, n)
        sample = any(t > 0 for t in temps)
        extra = {"logits_processor": LogitsProcessorList([RowTemperature(temps)]), "temperature": 1.0,
                 "top_k": 0, "top_p": 1.0} if sample else {}
        streamer = RowStreamer(self.tokenizer, max_new, self.eos_ids, on_text) if on_text else None
        with self.injection.use(lora.to(self.device)) if lora is not None else nullcontext():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max(max_new), do_sample=sample,
                pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), streamer=streamer,
                stopping_criteria=StoppingCriteriaList([RowLimits(input_ids.shape[1], max_new, self.eos_ids)]),
                **extra)
        results = []
        for i in range(n):
            tokens, reason = cut_row(out[i, input_ids.shape[1]:].tolist(), max_new[i], self.eos_ids)
            results.append(Completion(self.tokenizer.decode(tokens, skip_special_tokens=True), reason,
                                      len(ids[i]), len(tokens)))
        return results
