"""Zero- and few-shot evaluation with the paper's protocol (section 3)."""

from camelid.eval.report import compare, format_results, markdown_report, paper_results, results_table
from camelid.eval.runner import evaluate
from camelid.eval.scoring import Scorer
from camelid.eval.tasks import PAPER_TASKS, Settings, get_task

__all__ = ["PAPER_TASKS", "Scorer", "Settings", "compare", "evaluate", "format_results", "get_task",
           "markdown_report", "paper_results", "results_table"]
