"""Zero- and few-shot evaluation with the paper's protocol (section 3)."""

from camelid.eval.runner import evaluate, format_results
from camelid.eval.scoring import Scorer
from camelid.eval.tasks import PAPER_TASKS, Settings, get_task

__all__ = ["PAPER_TASKS", "Scorer", "Settings", "evaluate", "format_results", "get_task"]
