"""Evaluation of the demo model: attribute estimators (`attributes`) and prompt-adherence measurement."""
