"""The built-in components, registered through the same hooks as third-party plugins."""

from t2l_framework.plugins.hookspecs import hookimpl


@hookimpl
def t2l_register_encoders(register):
    from t2l_framework.encoders import SentenceTransformersEncoder, TransformersEncoder

    register("transformers", TransformersEncoder.from_config)
    register("sentence_transformers", SentenceTransformersEncoder.from_config)


@hookimpl
def t2l_register_heads(register):
    from t2l_framework.hypernet.heads import BUILTIN_HEADS

    for name, head in BUILTIN_HEADS.items():
        register(name, head)


@hookimpl
def t2l_register_base_models(register):
    from t2l_framework.llm.families import BUILTIN_FAMILIES

    for family in BUILTIN_FAMILIES:
        register(family.name, family)


@hookimpl
def t2l_register_benchmarks(register):
    from t2l_framework.eval.benchmarks import BUILTIN_BENCHMARKS

    for benchmark in BUILTIN_BENCHMARKS:
        register(benchmark.name, benchmark)
