"""A complete offline world for end-to-end tests: a tiny Llama with a word-level chat
tokenizer, a tiny BERT encoder, a handful of synthetic tasks, and a recipe using them.

Each synthetic task answers every input with its own label word, so a hypernetwork can only
get the answer right by reading the task description: the loss falls fast when T2L works.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

LABELS = ["apple", "river", "stone", "cloud", "tiger", "piano"]
WORDS = ["red", "blue", "green", "small", "large", "fast", "slow", "warm", "cold", "bright"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _tasks() -> tuple[list[dict], list[dict]]:
    rng = random.Random(0)
    tasks, instances = [], []
    for i, label in enumerate(LABELS):
        tid = f"toy_{i}"
        descs = [f"answer every input with the word {label} variant {k}" for k in range(8)]
        role = "train" if i < 4 else "eval_unseen"
        tasks.append({"task": tid, "descriptions": descs, "eval_descriptions": [], "role": role,
                      "definition": f"say {label}"})
        for split, n in (("train", 40 if role == "train" else 0), ("test", 6)):
            for j in range(n):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
                instances.append({"task": tid, "split": split, "id": f"{tid}-{split}-{j}", "input": text,
                                  "output": [label]})
    return tasks, instances


def word_tokenizer(texts: list[str], unk: str = "<unk>", pad: str = "<pad>", eos: str = "</s>"):
    """A whitespace word-level tokenizer over every word of ``texts``: each word is one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    vocab = {unk: 0, pad: 1, eos: 2}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad, unk_token=unk)


def build_world(root: Path) -> dict[str, Path]:
    """Write model, encoder, data and recipe under ``root``; returns their paths."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tasks, instances = _tasks()
    data = root / "data"
    data.mkdir(exist_ok=True)
    (data / "tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    (data / "instances.jsonl").write_text("".join(json.dumps(i) + "\n" for i in instances))

    texts = [CHAT_TEMPLATE, "<system> <user> <assistant> </s>"] + [i["input"] for i in instances]
    texts += [d for t in tasks for d in t["descriptions"]] + LABELS
    tok = word_tokenizer(texts)
    tok.chat_template = CHAT_TEMPLATE
    llm = root / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                         initializer_range=0.1)  # expressive enough for a rank-2 LoRA to matter
    LlamaForCausalLM(config).save_pretrained(llm)
    tok.save_pretrained(llm)

    enc = root / "tiny-bert"
    words = sorted({w.lower() for t in tasks for d in t["descriptions"] for w in d.split()})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    enc.mkdir(exist_ok=True)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(enc)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(enc)

    recipe = root / "tiny.yaml"
    recipe.write_text(f"""\
description: tiny end-to-end test world
base_model:
  name_or_path: {llm}
  family: llama
  dtype: float32
encoder:
  name: transformers
  model: {enc}
  pooling: mean
hypernet:
  head: per_layer
  latent_size: 32
  task_dim: 16
  layer_emb_dim: 8
  module_emb_dim: 8
lora:
  rank: 2
  alpha: 4
data:
  tasks_file: {data / 'tasks.jsonl'}
  instances_file: {data / 'instances.jsonl'}
  train_tasks: [toy_0, toy_1, toy_2, toy_3]
  eval_tasks: [toy_4, toy_5]
  n_tasks_per_batch: 4
  n_samples_per_task: 2
  holdout_descriptions: 2
  max_prompt_tokens: 32
  max_answer_tokens: 4
  max_eval_instances: 4
training:
  lr: 1.0e-2
  warmup_steps: 2
  neftune_alpha: 5.0
  output_dir: {root / 'runs'}
  checkpoint_every_n_steps: 4
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 8
  val_check_interval: 4
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
eval:
  batch_size: 8
  max_new_tokens: 3
""")
    return {"root": root, "recipe": recipe, "llm": llm, "encoder": enc, "data": data}


def build_trained_world(root: Path, run_name: str, steps: int = 2) -> dict[str, Path]:
    """``build_world`` plus a run folder trained ``steps`` steps (for generate / serve tests)."""
    from t2l_framework.assembly import fit

    world = build_world(root)
    world["run"] = fit(str(world["recipe"]), [f"trainer.max_steps={steps}", f"training.run_name={run_name}",
                                              "eval.final_report=false"])
    return world
