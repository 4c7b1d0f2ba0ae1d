"""Training-free per-head STA window search.

Run the dense model over calibration prompts with the flow-matching Euler sampler, score
every candidate window of every (denoising step, layer, head) against dense attention, and
choose windows by an error threshold or under a density budget::

    from stafinetune.search import SearchConfig, search_windows, write_report

    result = search_windows(dit, calibration_batches, SearchConfig(mode="budget", budget=0.3))
    write_report(result, "search_out")  # mask_strategy.json, reports, heatmap

The strategy loads with ``AttentionConfig(strategy_path="search_out/mask_strategy.json")``.
"""

from .candidates import default_candidates, resolve_candidates
from .config import SEARCH_METRICS, SEARCH_MODES, SearchConfig
from .report import build_report, format_markdown, plot_heatmap, write_report
from .scoring import CandidateErrors, SearchStore, candidate_errors, evaluate_candidates
from .search import SearchResult, search_windows, select_windows
from .select import select_budget, select_threshold

__all__ = [
    "SEARCH_METRICS",
    "SEARCH_MODES",
    "CandidateErrors",
    "SearchConfig",
    "SearchResult",
    "SearchStore",
    "build_report",
    "candidate_errors",
    "default_candidates",
    "evaluate_candidates",
    "format_markdown",
    "plot_heatmap",
    "resolve_candidates",
    "search_windows",
    "select_budget",
    "select_threshold",
    "select_windows",
    "write_report",
]
