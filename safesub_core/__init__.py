"""safesub: an instrument for the geometry of LLM safety alignment.

All computation lives here and never imports streamlit. See docs/ARCHITECTURE.md for the module map.
Importing the package makes the process offline for the Hugging Face hub (HF_HUB_OFFLINE=1 unless set).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from safesub_core.errors import SafesubError  # noqa: E402

__all__ = ["SafesubError"]
__version__ = "0.1.0"
