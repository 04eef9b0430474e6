"""NanoForge: a compiler-style LLM inference engine."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy, so `import nanoforge` (e.g. for the CLI's --help) does not import torch
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from .runtime.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
