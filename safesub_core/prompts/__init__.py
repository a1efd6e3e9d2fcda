"""Prompt sets: the `PromptSet` type and its fixed splits (`sets`), the built-in sets and generated arithmetic
(`builtin`), sets packaged in data distributions and the lookup of named sets (`named`), user files (`files`), the
set-spec grammar (`specs`) and the evaluation sets scores run on, one per role (`eval_sets`). The names below are
the public surface."""
from safesub_core.prompts.builtin import BUILTIN_SOURCE, arithmetic_set
from safesub_core.prompts.eval_sets import DEFAULT_SPECS, EvalSets
from safesub_core.prompts.files import EXTENSIONS, load_file
from safesub_core.prompts.named import (DATA_INSTALL, available_sets, catalogue, is_installed, load_set, package_dir,
                                       resolve)
from safesub_core.prompts.sets import KINDS, PromptSet, split_of
from safesub_core.prompts.specs import CONVENTIONS, ROLES, SetSpec, save_upload, upload_spec, uploads_dir

__all__ = [
    "BUILTIN_SOURCE", "CONVENTIONS", "DATA_INSTALL", "DEFAULT_SPECS", "EXTENSIONS", "KINDS", "ROLES", "EvalSets",
    "PromptSet", "SetSpec", "arithmetic_set", "available_sets", "catalogue", "is_installed", "load_file", "load_set",
    "package_dir", "resolve", "save_upload", "split_of", "upload_spec", "uploads_dir",
]
