"""The study's four experiments reproduced on a family, and a markdown report of them (FINDINGS.md).

The study: Ponkshe, Shah, Singhal, Vepakomma, "Safety Subspaces are Not Linearly Distinct: A Fine-Tuning Case
Study" (ICLR 2026). Per family ('tiny', 'smol' or a family file; `family.resolve_family`):

  experiments  1. utility and harm against rank (the study's Tables 4-5 layout), 2. weight-space overlap of the
               updates (per-layer panels, S pairs only from S-started variants, second-seed pairs), 3. activation
               overlap as the study ran it (activation_study); `run_family` runs them all
  power        E1/E2 by generation with several random draws, Wilson intervals, paired tests, F1's verdict
  energy       energy kept at a point, and Top-K at the energy a control keeps (the energy-matched tests)
  criteria     4. the study's findings F1-F3 checked on the family (holds / does not hold / inconclusive)
  deviations   every deviation from the study's set-up, one table
  report       the markdown report (`render_markdown`)
  figures      the three figures (plotly): interactive HTML, their data as CSV, PNGs for the report
  runner       `run(families, configs, out, figures)`: all of the above, as the CLI's `findings` verb does
  parallel     a run's parts (each variant's points, the checkpoints, the activation and weight experiments) on
               worker processes that fill the shared disk cache first (`findings --jobs N`)
  hypotheses   the section "Beyond the study: competing hypotheses" (refusal direction, SafeLoRA, the trade-off
               against the study's projections), written alone by `run_section` (`findings --only hypotheses`)

Everything is a function returning DataFrames; every score comes from the session's disk cache, so a rerun is
cheap (timings: benchmarks/README.md).
"""
from safesub_core.findings.criteria import (ACTIVATION_RATIO, STUDY_CSV, check_findings, f2_panels, f3_models,
                                            study_reference, study_topk_summary)
from safesub_core.findings.experiments import (HEADLINE_ENERGY, RHOS, FamilyFindings, FindingsConfig,
                                               activation_tables, panel_blocks,
                                               behaviour_checks, behaviour_table, eval_sets, rank_scores,
                                               reference_scores, run_family, study_layout, weight_table)
from safesub_core.findings.figures import PLOTLYJS, figure_frames, plotly_figures, write_figures, write_png
from safesub_core.findings.report import atomic_write, md_table, render_family, render_markdown
from safesub_core.findings.runner import (family_configs, parse_list, parse_per_family, parse_rhos, parse_rhos_for,
                                          run)

__all__ = [
    "ACTIVATION_RATIO", "HEADLINE_ENERGY", "PLOTLYJS", "RHOS", "STUDY_CSV", "FamilyFindings",
    "FindingsConfig", "activation_tables", "f2_panels", "f3_models", "panel_blocks", "atomic_write",
    "behaviour_checks", "behaviour_table",
    "check_findings", "eval_sets", "family_configs", "figure_frames", "md_table", "parse_list", "parse_per_family",
    "parse_rhos", "parse_rhos_for", "plotly_figures", "rank_scores", "reference_scores", "render_family",
    "render_markdown", "run", "run_family", "study_layout", "study_reference", "study_topk_summary",
    "weight_table", "write_figures", "write_png",
]
