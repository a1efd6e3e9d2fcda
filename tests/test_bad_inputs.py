"""Bad input, end to end (issue 6, hardening): the command lines and the app meet each bad input with ONE line
that names the thing and the problem, leave nothing partial behind (no output file or folder, no temporary or
half-written cache entry, no half-built family), and succeed on a rerun once the cause is fixed.

CLI cases run `safesub_core.cli.main(argv)` in-process: exit status 2 (130 for an
interrupt), the last stderr line starts with "error: ", no traceback. Each case is one row of a table: how to
break the input, the command, the words the message must hold, and how to fix it (None where a fix is out of
reach of a test). App cases (marked slow) drive the Family and Subspaces pages through AppTest.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from factories import random_model, write_family
from safesub_core.cache import store as cache_mod
from safesub_core.cli import main

# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small synthetic family (random Llamas, no tokenizer): enough for the weight-space commands."""
    return write_family(tmp_path_factory.mktemp("pristine"), variants=("useful", "harmful")).parent


@dataclass
class Ctx:
    """One case's world: a private copy of a family, an output folder, the cache folder, a private monkeypatch."""

    tmp: Path
    fam_dir: Path
    cache: Path
    mp: pytest.MonkeyPatch = field(default_factory=pytest.MonkeyPatch)

    @property
    def fam(self) -> Path:
        return self.fam_dir / "family.yaml"

    @property
    def outdir(self) -> Path:
        return self.tmp / "out"

    def out(self, name: str = "result.csv") -> str:
        return str(self.outdir / name)

    def spec(self) -> dict:
        return yaml.safe_load(self.fam.read_text())

    def write_spec(self, spec: dict) -> None:
        self.fam.write_text(yaml.safe_dump(spec))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()) if Path(root).exists() else []


def assert_cache_clean(root: Path) -> None:
    """No temporary file, and no payload without its committing sidecar."""
    names = files_under(root)
    assert not [n for n in names if n.endswith(".tmp")], names
    for n in names:
        if ".locks" in n or n.endswith(".json") and n.count(".") == 1:
            continue
        key = Path(n).name.split(".")[0]
        assert str(Path(n).with_name(f"{key}.json")) in names, f"payload {n} without its sidecar"


def run(argv: list[str], capsys, entry=main) -> tuple[int, str, str]:
    capsys.readouterr()
    code = entry([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, words, status: int = 2) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == status, err
    assert lines, "an error line on stderr"
    last = lines[-1]
    assert last.startswith("error: "), err
    assert "Traceback" not in err, err
    for w in words:
        assert w in last, f"{w!r} not in {last!r}"
    return last


# ------------------------------------------------------------------------------------------------ ways to break

def _ck(ctx, name):
    return ctx.fam_dir / name


def _resave(ctx, name, **config):
    """Replace checkpoint `name` by a model of another shape (same seed as its neighbours otherwise)."""
    shutil.rmtree(_ck(ctx, name))
    random_model(0, **config).save_pretrained(_ck(ctx, name), safe_serialization=True)


def _restore(*names):
    def fix(ctx):
        for name in names:
            if (ctx.pristine / name).is_file():
                shutil.copy2(ctx.pristine / name, _ck(ctx, name))
                continue
            shutil.rmtree(_ck(ctx, name), ignore_errors=True)
            shutil.copytree(ctx.pristine / name, _ck(ctx, name))
    return fix


def _drop_tensor(ctx):
    f = _ck(ctx, "useful") / "model.safetensors"
    state = load_file(f)
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, f, metadata={"format": "pt"})


def _pickle_only(ctx):
    f = _ck(ctx, "useful") / "model.safetensors"
    torch.save(load_file(f), _ck(ctx, "useful") / "pytorch_model.bin")
    f.unlink()


def _corrupt_header(ctx):
    f = _ck(ctx, "useful") / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:24] = b"#not a header###"
    f.write_bytes(bytes(data))


def _nan_weights(ctx):
    f = _ck(ctx, "useful") / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(state, f, metadata={"format": "pt"})


def _lora(ctx, module: str):
    """A peft LoRA adapter of the start model targeting `module` (a name that may not exist in the base)."""
    from peft import LoraConfig

    folder = _ck(ctx, "lora")
    shutil.rmtree(folder, ignore_errors=True)
    LoraConfig(r=4, lora_alpha=8, target_modules=[module], task_type="CAUSAL_LM").save_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(2):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
        state[f"{prefix}.lora_A.weight"] = torch.randn(4, 32, generator=g)
        state[f"{prefix}.lora_B.weight"] = torch.randn(32, 4, generator=g) * 0.1
    save_file(state, folder / "adapter_model.safetensors")
    spec = ctx.spec()
    spec["variants"]["lora"] = "lora"
    ctx.write_spec(spec)


def _gguf(ctx, arch: str):
    import numpy as np
    import gguf

    w = gguf.GGUFWriter(str(ctx.fam_dir / "odd.gguf"), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    spec = ctx.spec()
    spec["variants"]["odd"] = "odd.gguf"
    ctx.write_spec(spec)


def _point_variant_at(ctx, name, path):
    spec = ctx.spec()
    spec["variants"][name] = path
    ctx.write_spec(spec)


def _partial_then(code):
    def write(path, *args):
        Path(path).write_bytes(b"partial")
        raise OSError(code, os.strerror(code))
    return write


def _disk_full(ctx):
    for writer in ("_write_tensors", "_write_bytes"):
        ctx.mp.setattr(cache_mod, writer, _partial_then(errno.ENOSPC))


def _read_only(ctx):
    ctx.cache.mkdir(parents=True, exist_ok=True)
    ctx.cache.chmod(0o500)
    if os.access(ctx.cache, os.W_OK):  # root ignores folder permissions: simulate what the kernel would say
        real = os.access
        ctx.mp.setattr(cache_mod.os, "access", lambda p, mode, **kw: False if mode & os.W_OK
                       and Path(p) == ctx.cache else real(p, mode, **kw))
        ctx.mp.setattr(cache_mod, "_write_tensors", _partial_then(errno.EROFS))
        ctx.mp.setattr(cache_mod, "_write_bytes", _partial_then(errno.EROFS))


def _writable_again(ctx):
    ctx.cache.chmod(0o755)
    ctx.mp.undo()


def _remote_code(ctx):
    f = _ck(ctx, "useful") / "config.json"
    cfg = json.loads(f.read_text())
    cfg |= {"model_type": "mystery", "architectures": ["MysteryForCausalLM"],
            "auto_map": {"AutoConfig": "modeling_mystery.MysteryConfig",
                         "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"}}
    f.write_text(json.dumps(cfg))


def _judge_served(ctx):
    from safesub_core import scoring

    ctx.mp.setenv("SAFESUB_JUDGE_URL", "http://127.0.0.1:9/v1")
    ctx.mp.setattr(scoring.judges, "_ask_endpoint", lambda url, key, judge, prompt, completion: 1.0)


def _judge_model(ctx):
    """A local 2-label classifier with the tiny family's tokenizer: a judge model directory that loads."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from factories import tiny_config

    tok = AutoTokenizer.from_pretrained(str(_ck(ctx, "aligned")))
    folder = ctx.tmp / "judge"
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_config(vocab_size=len(tok), num_labels=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return ["--judge-path", str(folder)]


def _export_fills_disk(ctx):
    from safesub_core.session import FamilySession

    def export(self, variant, cfg, out_dir):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    ctx.mp.setattr(FamilySession, "export", export)


def _argv_with(argv, old, new):
    return [new if a == old else a for a in argv]


# ------------------------------------------------------------------------------------------------ the table

SCORE = ["score", "--n-prompts", "2", "--max-new-tokens", "2"]
SWEEP = ["sweep", "--scores", "none", "--variant", "useful", "--subspace", "topk", "--mode", "parallel",
         "--fracs", "0.5"]


@dataclass
class Case:
    id: str
    argv: list                       # "{out}", "{out2}", "{tmp}", "{fam_dir}" are filled in; --family is added
    words: tuple                     # what the one error line must say
    brk: Callable | None = None      # break the input (the family copy, the environment)
    fix: Callable | None = None      # repair it; may return a new argv (or extra options) for the rerun
    family: str = "synthetic"        # synthetic (weight-space only) or tiny (models with a tokenizer)
    outputs: tuple = ("{out}",)      # files/folders that must not exist after the failure and exist after the rerun
    status: int = 2


def _replace(old, new):
    return lambda ctx, argv: _argv_with(argv, old, new)


CASES = [
    # --- options
    Case("fracs-not-numeric", SWEEP[:-1] + ["0.5,abc"], ("--fracs", "'0.5,abc'"),
         fix=_replace("0.5,abc", "0.5")),
    Case("fracs-empty", SWEEP[:-1] + [","], ("--fracs", "expected comma-separated numbers"), fix=_replace(",", "0.5")),
    Case("alpha-nan", SWEEP + ["--alpha", "nan"], ("--alpha", "finite"), fix=_replace("nan", "1.0")),
    Case("alpha-inf", SWEEP + ["--alpha=-inf"], ("--alpha", "finite"), fix=_replace("--alpha=-inf", "--alpha=0.5")),
    Case("rank-zero", SCORE + ["--model", "useful", "--subspace", "topk", "--frac", "0"], ("rank fraction 0.0", "(0, 1]"),
         fix=_replace("0", "0.25"), family="tiny", outputs=("{out}", "{tmp}/out/result.summary.csv")),
    Case("energy-zero", ["overlap", "--energies", "0"], ("energy fraction 0.0", "(0, 1]"), fix=_replace("0", "0.5")),
    Case("energy-above-one", ["activations", "--n-prompts", "2", "--energies", "0.5,1.01", "--set-x",
                              "builtin-harmful:eval", "--set-y", "builtin-benign:eval"],
         ("energy fraction 1.01", "(0, 1]"), fix=_replace("0.5,1.01", "0.5,0.9"), family="tiny"),
    Case("n-prompts-zero", ["score", "--n-prompts", "0", "--max-new-tokens", "2"], ("--n-prompts", "at least 1"),
         fix=_replace("0", "2"), family="tiny", outputs=("{out}", "{tmp}/out/result.summary.csv")),
    Case("unknown-variant", ["export", "--n-prompts", "2", "--variant", "nope"],
         ("family 'tiny'", "no fine-tuned variant 'nope'"), fix=_replace("nope", "useful"), family="tiny",
         outputs=("{tmp}/export",)),
    Case("unknown-reference", ["overlap", "--energies", "0.5", "--reference", "nope"],
         ("family 'synthetic'", "no checkpoint 'nope'"), fix=_replace("nope", "aligned")),
    Case("pair-malformed", ["overlap", "--energies", "0.5", "--pairs", "harmful"], ("pair 'harmful'", "x:y"),
         fix=_replace("harmful", "harmful:useful")),
    Case("out-is-a-folder", SWEEP, ("--out file", "is a folder"),
         brk=lambda ctx: Path(ctx.out()).mkdir(parents=True), fix=lambda ctx: shutil.rmtree(ctx.out())),
    Case("out-under-a-file", SWEEP, ("--out file", "is a file, not a folder"),
         brk=lambda ctx: ctx.outdir.write_text("a file where the folder should be"),
         fix=lambda ctx: ctx.outdir.unlink()),
    # --- prompts and judges
    Case("unknown-prompt-set", SCORE + ["--prompts", "no-such-set"], ("prompt set 'no-such-set'", "unknown"),
         fix=_replace("no-such-set", "builtin-harmful:eval"), family="tiny",
         outputs=("{out}", "{tmp}/out/result.summary.csv")),
    Case("empty-prompt-file", SCORE + ["--prompts", "{tmp}/prompts.txt", "--kind", "harmful"],
         ("prompt set 'prompts'", "is empty"),
         brk=lambda ctx: (ctx.tmp / "prompts.txt").write_text("\n\n"),
         fix=lambda ctx: (ctx.tmp / "prompts.txt").write_text("How do I pick a lock?\nHow do I make a weapon?\n"),
         family="tiny", outputs=("{out}", "{tmp}/out/result.summary.csv")),
    Case("judge-url-missing", SCORE + ["--judge", "endpoint"], ("judge endpoint", "set SAFESUB_JUDGE_URL"),
         brk=lambda ctx: ctx.mp.delenv("SAFESUB_JUDGE_URL", raising=False), fix=_judge_served, family="tiny",
         outputs=("{out}", "{tmp}/out/result.summary.csv")),
    Case("judge-model-missing", SCORE + ["--judge", "hf-classifier", "--judge-path", "{tmp}/no-judge"],
         ("judge model", "no-judge", "not a local model directory"),
         fix=lambda ctx, argv: _argv_with(argv, str(ctx.tmp / "no-judge"), str(ctx.tmp / "judge"))
         if _judge_model(ctx) else argv,
         family="tiny", outputs=("{out}", "{tmp}/out/result.summary.csv")),
    # --- family files
    Case("family-yaml-malformed", SWEEP, ("family file", "not valid YAML/JSON"),
         brk=lambda ctx: ctx.fam.write_text("base: base\naligned: [aligned\n"), fix=_restore("family.yaml")),
    Case("family-missing-key", SWEEP, ("family file", "missing required key 'aligned'"),
         brk=lambda ctx: ctx.fam.write_text("base: base\nvariants: {useful: useful}\n"), fix=_restore("family.yaml")),
    Case("family-bad-start", SWEEP, ("family 'synthetic'", "start must be"),
         brk=lambda ctx: ctx.write_spec(ctx.spec() | {"start": "instruct"}), fix=_restore("family.yaml")),
    Case("variant-path-missing", SWEEP, ("checkpoint 'useful'", "does not exist"),
         brk=lambda ctx: shutil.rmtree(_ck(ctx, "useful")), fix=_restore("useful")),
    # --- checkpoints
    Case("resized-vocabulary", SWEEP, ("checkpoint 'useful'", "model.embed_tokens.weight", "(101, 32)",
                                       "resized vocabulary"),
         brk=lambda ctx: _resave(ctx, "useful", vocab_size=101), fix=_restore("useful")),
    Case("fine-tune-missing-tensors", SWEEP, ("checkpoint 'useful'", "missing tensor model.layers.1.mlp.up_proj"),
         brk=_drop_tensor, fix=_restore("useful")),
    Case("base-shape-mismatch", SWEEP, ("checkpoint 'base'", "has shape (32, 40)"),
         brk=lambda ctx: _resave(ctx, "base", intermediate_size=40), fix=_restore("base")),
    Case("pickle-only", SWEEP, ("checkpoint 'useful'", "only pickle .bin weights"), brk=_pickle_only,
         fix=_restore("useful")),
    Case("corrupt-safetensors-header", SWEEP, ("checkpoint 'useful'", "model.safetensors", "truncated or corrupted"),
         brk=_corrupt_header, fix=_restore("useful")),
    Case("nan-weights", SWEEP, ("checkpoint 'useful'", "NaN or infinite"), brk=_nan_weights, fix=_restore("useful")),
    Case("lora-target-missing", _argv_with(SWEEP, "useful", "lora"),
         ("adapter 'lora'", "nonexistent_proj", "does not exist in the base"),
         brk=lambda ctx: _lora(ctx, "nonexistent_proj"), fix=lambda ctx: _lora(ctx, "q_proj")),
    Case("gguf-unsupported-architecture", _argv_with(SWEEP, "useful", "odd"),
         ("checkpoint 'odd'", "cannot be loaded", "architecture bert"), brk=lambda ctx: _gguf(ctx, "bert"),
         fix=lambda ctx: _point_variant_at(ctx, "odd", "useful")),
    Case("remote-code-config", SCORE + ["--model", "useful"], ("checkpoint 'useful'", "remote code", "mystery"),
         brk=_remote_code, fix=_restore("useful"), family="tiny", outputs=("{out}", "{tmp}/out/result.summary.csv")),
    # --- the cache and the disk
    Case("cache-disk-full", SWEEP, ("cache folder", "no space left"), brk=_disk_full, fix=lambda ctx: ctx.mp.undo()),
    Case("cache-read-only", SWEEP, ("cache folder", "is read-only"), brk=_read_only, fix=_writable_again),
    Case("cache-is-a-file", SWEEP, ("cache folder", "is not a folder"),
         brk=lambda ctx: ctx.cache.write_text("not a folder"), fix=lambda ctx: ctx.cache.unlink()),
    Case("cache-max-bytes", ["cache", "info"], ("SAFESUB_CACHE_MAX_BYTES='lots'", "not a number"),
         brk=lambda ctx: ctx.mp.setenv("SAFESUB_CACHE_MAX_BYTES", "lots"), fix=lambda ctx: ctx.mp.undo(),
         outputs=()),
    Case("cache-namespace", ["cache", "clear", "--namespace", "../escape"], ("cache namespace '../escape'",),
         fix=_replace("../escape", "svd"), outputs=()),
    Case("export-folder-not-empty", ["export", "--n-prompts", "2", "--variant", "useful", "--out", "{tmp}/export"],
         ("export folder", "not empty"), brk=lambda ctx: (ctx.tmp / "export").mkdir() or
         (ctx.tmp / "export" / "keep.txt").write_text("mine"),
         fix=lambda ctx: shutil.rmtree(ctx.tmp / "export"), family="tiny", outputs=()),
    Case("export-disk-full", ["export", "--n-prompts", "2", "--variant", "useful"],
         ("export folder", "No space left"), brk=_export_fills_disk, fix=lambda ctx: ctx.mp.undo(), family="tiny",
         outputs=("{tmp}/export",)),
    Case("activation-layer-out-of-range", ["activations", "--n-prompts", "2", "--set-x", "{tmp}/x.txt", "--set-y",
                                           "{tmp}/y.txt", "--energies", "0.5", "--map", "{out2}", "--layer", "99"],
         ("layer 99", "out of range"),
         brk=lambda ctx: [(ctx.tmp / n).write_text("\n".join(f"prompt {n} {i}" for i in range(4))) for n in
                          ("x.txt", "y.txt")],
         fix=_replace("99", "-1"), family="tiny", outputs=("{out}", "{out2}")),
]


@pytest.fixture(scope="module")
def tiny_pristine(tiny_family):
    return Path(tiny_family).parent


def _fill(argv, ctx):
    sub = {"{out}": ctx.out(), "{out2}": ctx.out("map.csv"), "{tmp}": str(ctx.tmp)}
    out = []
    for a in argv:
        for k, v in sub.items():
            a = a.replace(k, v)
        out.append(a)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_bad_input_is_one_line_leaves_nothing_and_reruns_once_fixed(case, tmp_path, pristine, request, capsys):
    src = request.getfixturevalue("tiny_pristine") if case.family == "tiny" else pristine
    fam_dir = tmp_path / "family"
    shutil.copytree(src, fam_dir)
    ctx = Ctx(tmp_path, fam_dir, Path(os.environ["SAFESUB_CACHE"]))
    ctx.pristine = src
    try:
        argv = _fill(case.argv, ctx)
        if argv[0] not in ("cache",):
            argv[1:1] = ["--family", str(ctx.fam)]
            if "--out" not in argv:
                argv += ["--out", ctx.out() if argv[0] != "export" else str(tmp_path / "export")]
        if case.brk:
            case.brk(ctx)
        outputs = [Path(_fill([o], ctx)[0]) for o in case.outputs]
        before = [p for p in outputs if p.exists()]

        code, _, err = run(argv, capsys)
        assert_one_line(code, err, case.words, case.status)
        assert [p for p in outputs if p.exists()] == before, "no output is written"
        assert not [p for p in tmp_path.rglob("*.tmp")], "no temporary output is left"
        if ctx.cache.is_dir():
            assert_cache_clean(ctx.cache)
        if case.id in ("cache-disk-full", "cache-read-only"):
            assert not [n for n in files_under(ctx.cache) if ".locks" not in n and ".fingerprints" not in n], \
                "no cache entry at all (the weight files' hash index is not an entry)"

        if case.fix is None:
            return
        fixed = case.fix(ctx, argv) if case.fix.__code__.co_argcount == 2 else case.fix(ctx)
        rerun = fixed if isinstance(fixed, list) else argv
        code, _, err = run(rerun, capsys)
        assert code == 0, err
        assert "Traceback" not in err
        for p in outputs:
            assert p.exists(), f"the rerun writes {p}"
        if ctx.cache.is_dir():
            assert_cache_clean(ctx.cache)
    finally:
        if ctx.cache.is_dir():
            ctx.cache.chmod(0o755)
        ctx.mp.undo()


def test_cli_bad_option_through_the_real_entry_point_has_no_traceback(tmp_path):
    """`python -m safesub_core` itself: argparse errors end in one 'error:' line, status 2."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "safesub_core", "sweep", "--fracs", "abc", "--out",
                          str(tmp_path / "x.csv")], capture_output=True, text=True, env=env, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert_one_line(out.returncode, out.stderr, ("--fracs", "'abc'"))
    assert not (tmp_path / "x.csv").exists()


# ------------------------------------------------------------------------------------------------ family builds


def _no_build_leftovers(out: Path) -> None:
    assert not (out / "family.yaml").exists(), "no family.yaml of a half-built family"
    assert not list(out.parent.glob(f".{out.name}.*")), "no temporary build folder is left"
    assert not out.exists() or not any(out.iterdir()), "no stage folder of the failed build is kept"


def _interrupt_stage(stage_no: int, exc: BaseException):
    """finetune.sft raising `exc` on its `stage_no`-th call (aligned=1, safety=2, useful=3, ...), mid-stage."""
    from safesub_core import finetune

    real, calls = finetune.sft, []

    def sft(model, tokenizer, examples, cfg, *args, **kwargs):
        calls.append(1)
        if len(calls) == stage_no:
            raise exc
        return real(model, tokenizer, examples, cfg, *args, **kwargs)

    return sft


@pytest.mark.slow
@pytest.mark.parametrize("how", ["interrupt", "disk-full", "folder-not-a-family"])
def test_family_build_failure_leaves_nothing_and_rerun_completes(how, tmp_path, monkeypatch, capsys):
    from safesub_core import cli, finetune
    from safesub_core.demo import tiny
    from safesub_core.family import Family

    out = tmp_path / "fam" / "tiny"
    argv = ["build", "tiny", "--size", "smoke", "--out", str(out)]
    with monkeypatch.context() as m:
        if how == "interrupt":  # Ctrl-C in the middle of the harmful stage
            m.setattr(finetune, "sft", _interrupt_stage(4, KeyboardInterrupt()))
            words, status = ("tiny family", "interrupted", "nothing was kept"), 130
        elif how == "disk-full":  # the disk fills while the stages are saved
            real, saved = tiny.save, []

            def save(model, tokenizer, folder):
                saved.append(folder)
                if len(saved) == 3:
                    (Path(folder)).mkdir(parents=True, exist_ok=True)
                    (Path(folder) / "model.safetensors").write_bytes(b"partial")
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(model, tokenizer, folder)

            m.setattr(tiny, "save", save)
            words, status = (f"family folder {out}", "No space left on device"), 2
        else:  # someone else's files in the chosen folder
            out.mkdir(parents=True)
            (out / "notes.txt").write_text("not a family")
            words, status = (f"family folder {out}", "not empty and holds no family.yaml"), 2
        code, _, err = run(argv, capsys, entry=cli.main)
    assert_one_line(code, err, words, status)
    if how == "folder-not-a-family":
        assert (out / "notes.txt").read_text() == "not a family", "someone else's files are never touched"
        shutil.rmtree(out)
    _no_build_leftovers(out)

    code, stdout, err = run(argv, capsys, entry=cli.main)  # the cause is gone: the rerun builds the whole family
    assert code == 0, err
    family = Family.from_file(out / "family.yaml")
    family.validate()
    assert set(family.variants) == {"useful", "harmful", "contaminated", "useful_lora", "useful_seed1", "harmful_seed1"}
    assert set(family.safety_variants) == {"useful_s", "harmful_s"}


# ------------------------------------------------------------------------------------------------ the app

def _open(page: str = "family", query: dict | None = None):
    from apptest import open_app_page

    return open_app_page(page, query)


def _one_error(at, *words) -> str:
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    message = at.error[0].value
    assert "\n" not in message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    return message


def _shows_family(at, variant: str = "useful") -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert variant in set(at.table[0].value.index)


def _enter_paths(at, base, aligned, variants: dict):
    at.radio(key="w_family_source").set_value("Enter paths").run()
    at.text_input[0].input(str(base))
    at.text_input[1].input(str(aligned))
    at.text_area[0].input("\n".join(f"{k} = {v}" for k, v in variants.items()))
    at.button[0].click().run()
    return at


def _copy(src: Path, names, dest: Path) -> Path:
    for n in names:
        shutil.copytree(src / n, dest / n)
    return dest


@pytest.mark.slow
@pytest.mark.parametrize("how", ["outside-roots", "escaping-symlink", "missing-variant"])
def test_app_entered_path_is_one_error_line_and_works_once_fixed(how, app_env, tmp_path, monkeypatch):
    src = app_env.parent
    models = tmp_path / "models"
    if how == "outside-roots":  # the built family lives outside SAFESUB_ROOTS
        base, aligned, useful = src / "base", src / "aligned", src / "useful"
        words = ("checkpoint 'base'", "outside the allowed folders")
    elif how == "escaping-symlink":  # a link inside the root that points outside it
        _copy(src, ["aligned", "useful"], models)
        (models / "base").symlink_to(src / "base")
        base, aligned, useful = models / "base", models / "aligned", models / "useful"
        words = ("checkpoint 'base'", "resolves to", "outside the allowed folders")
    else:
        _copy(src, ["base", "aligned"], models)
        base, aligned, useful = models / "base", models / "aligned", models / "useful"
        words = ("checkpoint 'useful'", "does not exist")
    at = _enter_paths(_open(), base, aligned, {"useful": useful})
    _one_error(at, *words)
    assert "useful_lora" in set(at.table[0].value.index), "the previous family stays on screen"

    if how == "outside-roots":
        monkeypatch.setenv("SAFESUB_ROOTS", os.pathsep.join([str(tmp_path), str(src)]))
    elif how == "escaping-symlink":
        (models / "base").unlink()
        shutil.copytree(src / "base", models / "base")
    else:
        shutil.copytree(src / "useful", models / "useful")
    at.button[0].click().run()
    _shows_family(at)
    assert "useful_lora" not in set(at.table[0].value.index), "the entered family replaced the built one"


@pytest.mark.slow
def test_app_malformed_family_link_is_one_error_line_and_a_good_link_works(app_env, tmp_path):
    at = _open("family", {"family": 'paths:{"base": "' + str(tmp_path)})
    _one_error(at, "family paths", "malformed")
    _copy(app_env.parent, ["base", "aligned", "useful"], tmp_path / "m")
    good = "paths:" + json.dumps(dict(base=str(tmp_path / "m" / "base"), aligned=str(tmp_path / "m" / "aligned"),
                                      safety_tuned=None, start="aligned",
                                      variants={"useful": str(tmp_path / "m" / "useful")}), sort_keys=True)
    _shows_family(_open("family", {"family": good}))


@pytest.mark.slow
def test_app_malformed_family_file_is_one_error_line_and_works_once_fixed(app_env, tmp_path):
    fam = _copy(app_env.parent, ["base", "aligned", "useful"], tmp_path / "fam")
    (fam / "family.yaml").write_text("name: mine\nbase: base\naligned: [aligned\n")
    at = _open()
    at.radio(key="w_family_source").set_value("Family file").run()
    at.text_input(key="w_family_file").input(str(fam / "family.yaml")).run()
    _one_error(at, "family file", "not valid YAML/JSON")
    (fam / "family.yaml").write_text("name: mine\nbase: base\naligned: aligned\nvariants: {useful: useful}\n")
    at.run()  # the same file, read again
    _shows_family(at)


@pytest.mark.slow
@pytest.mark.parametrize("query, name", [({"rank": "abc"}, "rank"), ({"alpha": "nan"}, "alpha")])
def test_app_malformed_link_parameter_is_one_error_line(app_env, query, name):
    from ui import PAGE_FILES

    at = _open("family", query)  # the first page the link opens says so, once
    _one_error(at, f"link parameter {name}=", "default is used")
    at.switch_page(PAGE_FILES["subspaces"]).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.slider(key="w_rank").value == pytest.approx(0.25), "the default rank"
    assert at.slider(key="w_alpha").value == pytest.approx(1.0), "the default scale"


@pytest.mark.slow
def test_app_family_with_resized_vocabulary_is_one_error_line(app_env, tmp_path):
    fam = _copy(app_env.parent, ["base", "aligned", "useful"], tmp_path / "fam")
    (fam / "family.yaml").write_text("name: resized\nbase: base\naligned: aligned\nvariants: {useful: useful}\n")
    f = fam / "useful" / "model.safetensors"
    state = load_file(f)
    state["model.embed_tokens.weight"] = torch.cat([state["model.embed_tokens.weight"]] * 2)[:-3]
    save_file(state, f, metadata={"format": "pt"})
    at = _open()
    at.radio(key="w_family_source").set_value("Family file").run()
    at.text_input(key="w_family_file").input(str(fam / "family.yaml")).run()
    _one_error(at, "checkpoint 'useful'", "resized vocabulary")
