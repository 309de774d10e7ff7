"""Every shipped recipe builds its base model and hypernetwork on the `meta` device.

No weights are downloaded: the model configs of the hub models the recipes name are written
down here (from their config.json), so shapes and parameter counts are checked offline.
"""

import pytest
import torch

from t2l_framework.assembly import load_recipe
from t2l_framework.config import recipes_dir
from t2l_framework.hypernet.hypernetwork import HyperNetwork
from t2l_framework.lora.targets import target_shapes

HUB_CONFIGS = {
    "mistralai/Mistral-7B-Instruct-v0.2": ("MistralConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, sliding_window=None)),
    "meta-llama/Llama-3.1-8B-Instruct": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256)),
    "meta-llama/Llama-3.1-70B-Instruct": ("LlamaConfig", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256)),
    "google/gemma-2-2b-it": ("Gemma2Config", dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000)),
    "smollm2-135m-instruct": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
}
ENCODER_DIMS = {"Alibaba-NLP/gte-large-en-v1.5": 1024, "all-MiniLM-L6-v2": 384}
# Trainable parameters of T2L on Mistral-7B (r=8, q_proj + v_proj, gte-large), as the reference
# code builds them (with head biases); the paper rounds them to 55.3M / 34.3M / 4.99M.
PAPER_COUNTS = {"per_layer": 55_424_000, "shared": 34_412_288, "chunked": 4_994_816}

SHIPPED = sorted(recipes_dir().glob("*.yaml"))


def build_on_meta(cfg):
    import transformers

    cls_name, kwargs = HUB_CONFIGS[cfg.base_model.name_or_path]
    config = getattr(transformers, cls_name)(**kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
        shapes = target_shapes(model, list(cfg.lora.target_modules))
        hypernet = HyperNetwork.from_recipe(cfg, shapes, ENCODER_DIMS[cfg.encoder.model])
    return model, shapes, hypernet


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_recipe_builds_base_model_and_hypernetwork_on_meta(path):
    cfg = load_recipe(path)
    assert cfg.base_model.name_or_path in HUB_CONFIGS, "add the model's config to HUB_CONFIGS"
    model, shapes, hypernet = build_on_meta(cfg)
    assert shapes.n_layers == model.config.num_hidden_layers
    assert shapes.modules == list(cfg.lora.target_modules)
    emb = torch.empty(2, hypernet.enc_dim, device="meta")
    weights = hypernet(emb)
    for m, (fan_in, fan_out) in shapes.shapes.items():
        assert tuple(weights.A[m].shape) == (2, shapes.n_layers, cfg.lora.rank, fan_in)
        assert tuple(weights.B[m].shape) == (2, shapes.n_layers, fan_out, cfg.lora.rank)


@pytest.mark.parametrize("name", ["mistral_L", "mistral_M", "mistral_S"])
def test_paper_recipes_match_paper_parameter_counts(name):
    cfg = load_recipe(name)
    _, shapes, hypernet = build_on_meta(cfg)
    assert shapes.shapes == {"q_proj": (4096, 4096), "v_proj": (4096, 1024)}
    assert hypernet.num_trainable_parameters() == PAPER_COUNTS[cfg.hypernet.head]
