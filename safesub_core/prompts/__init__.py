"""Prompt sets: the `PromptSet` type and its fixed splits (`sets`), the built-in sets and generated arithmetic
(`builtin`), sets packaged in data distributions and the lookup of named sets (`named`), user files (`files`), and
the evaluation sets scores run on (`eval_sets`). The names below are the public surface."""
from safesub_core.prompts.builtin import BUILTIN_SOURCE, arithmetic_set
from safesub_core.prompts.eval_sets import EvalSets
from safesub_core.prompts.files import EXTENSIONS, load_file
from safesub_core.prompts.named import DATA_INSTALL, available_sets, is_installed, load_set, package_dir, resolve
from safesub_core.prompts.sets import KINDS, PromptSet, split_of

__all__ = [
    "BUILTIN_SOURCE", "DATA_INSTALL", "EXTENSIONS", "KINDS", "EvalSets", "PromptSet", "arithmetic_set",
    "available_sets", "is_installed", "load_file", "load_set", "package_dir", "resolve", "split_of",
]
