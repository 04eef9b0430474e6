"""NanoForge: a compiler-style LLM inference engine."""

from .version import __version__

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # lazy, so `import nanoforge` (e.g. for the CLI's --help) does not import torch
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "SamplingParams":
        from .runtime.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
