"""The whole findings run: the experiments on each family, the findings checked, figures and FINDINGS.md written.

`run(families, configs, out, figures, ...)` is what the CLI's `findings` verb calls; `family_configs` builds the
per-family FindingsConfig from the verb's options, whose values the `parse_*` functions read ("tiny=32,smol=16",
"0.01,0.5,0.99", "smol=0.01/0.5/0.99"). A bad value is a one-line SafesubError.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from safesub_core.errors import SafesubError
from safesub_core.findings import parallel
from safesub_core.findings.criteria import check_findings, study_reference
from safesub_core.findings.experiments import RHOS, FamilyFindings, FindingsConfig, run_family
from safesub_core.findings.figures import write_figures
from safesub_core.findings.hypotheses import keep_section
from safesub_core.findings.report import atomic_write, figure_links, render_markdown

FamilyProgress = Callable[[str, int, int, str], None]  # (family, done, total, what)


def parse_list(text: str | None) -> tuple[str, ...] | None:
    """"a, b,c" -> ("a", "b", "c"); None stays None (an option left out)."""
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str, sep: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(sep) if x.strip())
    except ValueError:
        raise SafesubError(f"{what} {text!r}: expected numbers separated by '{sep}'") from None


def parse_rhos(text: str) -> tuple[float, ...]:
    """Rank fractions: "0.01,0.5,0.99" -> (0.01, 0.5, 0.99)."""
    return _floats(text, ",", "rank fractions")


def parse_rhos_for(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Rank fractions of single families: ["smol=0.01/0.5/0.99"] -> {"smol": (0.01, 0.5, 0.99)}."""
    out = {}
    for item in items:
        name, _, values = item.partition("=")
        out[name.strip()] = _floats(values, "/", f"rank fractions of {name.strip()!r}")
    return out


def parse_per_family(text: str) -> dict[str, int]:
    """Prompts per evaluation set: "32" -> {"*": 32} (every family); "tiny=32,smol=16" -> {"tiny": 32, "smol": 16}."""
    out = {}
    for part in text.split(","):
        key, _, value = part.rpartition("=")
        try:
            out[key.strip() or "*"] = int(value)
        except ValueError:
            raise SafesubError(f"prompt counts {text!r}: expected n or name=n,name=n") from None
    return out


# the FindingsConfig fields one family may set apart (`--for FAMILY:OPTION=VALUE`): option -> (field, parse)
FAMILY_OPTIONS = {
    "gen-modes": ("gen_modes", lambda v: tuple(x for x in v.split("/") if x)),
    "power-modes": ("power_modes", lambda v: tuple(x for x in v.split("/") if x)),
    "power-matches": ("power_matches", lambda v: tuple(x for x in v.split("/") if x)),
    "seeds": ("n_seeds", int), "n-boot": ("n_boot", int), "n-perm": ("n_perm", int),
    "study-prompts": ("study_prompts", int), "live-waves": ("live_waves", int),
}


def parse_for(items: Sequence[str]) -> dict[str, dict]:
    """Settings of single families: ["smol:gen-modes=parallel", "smol:n-boot=100"] -> {"smol": {"gen_modes":
    ("parallel",), "n_boot": 100}} (lists separated by '/'); a bad item is a one-line SafesubError."""
    out: dict[str, dict] = {}
    for item in items:
        family, _, rest = item.partition(":")
        option, _, value = rest.partition("=")
        if not family.strip() or not value.strip() or option.strip() not in FAMILY_OPTIONS:
            raise SafesubError(f"--for {item!r}: expected FAMILY:OPTION=VALUE with OPTION one of "
                               f"{', '.join(FAMILY_OPTIONS)}")
        name, parse = FAMILY_OPTIONS[option.strip()]
        try:
            parsed = parse(value.strip())
        except ValueError:
            raise SafesubError(f"--for {item!r}: {value.strip()!r} is not a whole number") from None
        if parsed == ():
            raise SafesubError(f"--for {item!r}: expected names separated by '/'")
        out.setdefault(family.strip(), {})[name] = parsed
    return out


def family_configs(families: Sequence[str], n_prompts: Mapping[str, int] | int = 32,
                   rhos: Sequence[float] = RHOS, rhos_for: Mapping[str, Sequence[float]] | None = None,
                   settings_for: Mapping[str, Mapping] | None = None, **common) -> dict[str, FindingsConfig]:
    """family -> FindingsConfig: `n_prompts` per family ("*" for the others, else 32), `rhos_for` a family's
    rank fractions (else `rhos`), `settings_for` a family's own fields (`parse_for`), `common` the other
    FindingsConfig fields for every family."""
    counts = {"*": n_prompts} if isinstance(n_prompts, int) else dict(n_prompts)
    rhos_for, settings_for = rhos_for or {}, settings_for or {}
    unknown = set(settings_for) - set(families)
    if unknown:
        raise SafesubError(f"--for {sorted(unknown)[0]}: not one of the families run ({', '.join(families)})")
    return {f: FindingsConfig(n_prompts=counts.get(f, counts.get("*", 32)), rhos=tuple(rhos_for.get(f, rhos)),
                              **(common | dict(settings_for.get(f, {})))) for f in families}


def run(families: Sequence[str], configs: Mapping[str, FindingsConfig] | None = None,
        out: str | os.PathLike = "FINDINGS.md", figures: str | os.PathLike | None = "docs/figures",
        study: str | os.PathLike | None = None, plotlyjs: str = "directory", command: str = "",
        progress: FamilyProgress | None = None, log: Callable[[str], None] | None = None,
        sets: Mapping[str, str] | None = None, convention: str | None = None, jobs: int = 1) -> Path:
    """Run the experiments on each family (`configs[family]`, else the defaults), check the study's findings
    against `study` (default: the repository's copy of its tables), write the figures into `figures` (None: no
    figures; `plotlyjs` as in `figures.write_figures`) and the report to `out` (linking the figures relative to
    it); returns `out`. `command` is how the report says it was made; `log` gets each family's behaviour and
    verdicts as text; the section of the competing hypotheses in an existing `out` is kept
    (`hypotheses.run_section` writes it); `sets` (role -> set spec) and `convention` choose evaluation sets for every family
    (`experiments.eval_sets`). With `jobs` > 1 the families' parts are computed first on that many worker processes
    (`parallel.run_parts`), then read. Nothing is written when a family fails (SafesubError)."""
    parallel.check_jobs(jobs)
    configs = configs or {}
    study_table = study_reference(study)
    cfgs = {spec: replace(configs.get(spec) or FindingsConfig(), set_overrides=sets, convention=convention)
            for spec in families}
    todo, part_times, wall = [], {}, 0.0
    if jobs > 1:
        t0 = time.time()
        todo = parallel.order([p for spec in families for p in parallel.parts(spec, cfgs[spec])])
        part_times = parallel.run_parts(todo, jobs, log)
        wall = time.time() - t0
    results = []
    for spec in families:
        t0 = time.time()
        r = run_family(spec, cfgs[spec],
                       progress and (lambda done, total, what, spec=spec: progress(spec, done, total, what)))
        if jobs > 1:  # what each part cost in its worker, and the wall time of them all
            r.timings = {f"{p.name} (worker)": part_times[p.label] for p in todo if p.spec == spec} | {
                f"parts of every family on {jobs} workers": wall} | r.timings
        r.findings = check_findings(r, study_table)
        r.timings["total"] = time.time() - t0
        results.append(r)
        if log:
            log(_summary(r))
    out = Path(out)
    links = figure_links(results, write_figures, figures, out, plotlyjs)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the section "Beyond the study: competing hypotheses" is not recomputed here: the old report's is kept
    return atomic_write(out, keep_section(out, render_markdown(results, study_table, links, command)))


def _summary(r: FamilyFindings) -> str:
    """A family's held-out behaviour, its checks and the findings' verdicts, as printed by the CLI."""
    lines = [f"== {r.name}: held-out behaviour (stored by the builder)",
             r.behaviour.to_string(index=False) if len(r.behaviour) else "(none stored)"]
    if len(r.checks):
        lines.append(r.checks.to_string(index=False))
    lines += [f"{row.finding}: {row.verdict}" for row in r.findings.itertuples()]
    return "\n".join(lines)
