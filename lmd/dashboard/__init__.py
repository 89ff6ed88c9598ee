"""Plotly dashboards of an experiment's results: `python analysis/dashboard.py RESULTS [--out report.html]`."""

from lmd.dashboard.load import Experiment, ResultsError, load_experiment
from lmd.dashboard.page import DASHBOARD_FILE, render_dashboard

__all__ = ["DASHBOARD_FILE", "Experiment", "ResultsError", "load_experiment", "render_dashboard"]
