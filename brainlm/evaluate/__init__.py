"""Downstream evaluation: a model's scores only next to baselines and with honest intervals.

Independent benchmarks found that functional connectivity + a linear model often matches or
beats fMRI foundation models, so every result here is meant to be shown next to baselines
fitted on exactly the same recordings and subject-level split, with confidence intervals that
resample test SUBJECTS (a subject may contribute several recordings, which are not
independent). The package is split by what changes together: `metrics` (scores, bootstrap),
`intervals` (paired bootstraps over subjects, three-valued verdicts), `baselines` (FC, tangent,
raw-ROI MLP, floors), `heads` (penalty grids on the data's scale), `forecasting`,
`comparisons` (BrainLM minus each baseline, paired), `report` (tables, JSON, plots), `controls`
(planted-effect positive controls) and `run` (`brainlm evaluate` of a fine-tuning run). The public names are re-exported here.

Shapes: one recording is [parcels, time]; stacks are [n, parcels, time]; forecasting arrays are
[n, parcels, horizon].
"""

from __future__ import annotations

from .baselines import (
    FCBaseline,
    LinearAR,
    RawROIMLP,
    TangentBaseline,
    TrainMean,
    fc_features,
    parcel_mean,
    persistence,
    roi_block_features,
)
from .controls import find_ground_truth, positive_controls, synthetic_control_scores
from .metrics import (
    BASELINE_METHODS,
    NULL_METHODS,
    TASK_METRICS,
    TASKS,
    bootstrap_ci,
    classification_metrics,
    forecast_metrics,
    metric_fn,
    regression_metrics,
    score_rows,
    subject_split_check,
)
from .report import plot_comparison, plot_forecast, results_table, write_results
from .run import evaluate_run

__all__ = [
    "BASELINE_METHODS", "FCBaseline", "LinearAR", "NULL_METHODS", "RawROIMLP", "TASKS",
    "TASK_METRICS", "TangentBaseline", "TrainMean", "bootstrap_ci", "classification_metrics", "evaluate_run",
    "fc_features", "find_ground_truth", "forecast_metrics", "metric_fn", "parcel_mean",
    "persistence", "plot_comparison", "plot_forecast", "positive_controls",
    "regression_metrics", "results_table", "roi_block_features", "score_rows",
    "subject_split_check", "synthetic_control_scores", "write_results",
]
