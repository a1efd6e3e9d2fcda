"""safesub: an instrument for the geometry of LLM safety alignment.

All computation lives here and never imports streamlit; docs/ARCHITECTURE.md maps the modules and docs/method.md
states what they compute. The notebook API (`safesub_core.api`, docs/notebook.md) is importable from here:

    import safesub_core as ss
    session = ss.open_session("tiny", n_prompts=8)
    table = ss.sweep(session, subspaces=["topk", "random"], modes=["parallel"], fracs=[0.1, 0.5])

Its names load on first use (PEP 562), so `import safesub_core` alone imports neither torch nor transformers.
Importing the package changes no environment variable: the CLI and the app call `settings.go_offline()`, and
every model load passes `local_files_only=True`.
"""
from __future__ import annotations

import importlib

from safesub_core.errors import SafesubError

__version__ = "0.2.0"
_API = ("open_family", "open_session", "prompt_set", "sweep", "Family", "FamilySession", "EvalSets",
        "ProjectionConfig", "PromptSet")
__all__ = ["SafesubError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("safesub_core.api"), name)
    raise AttributeError(f"module 'safesub_core' has no attribute {name!r}")
