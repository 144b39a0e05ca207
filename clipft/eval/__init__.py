"""Evaluation: pure metric functions (``metrics``) and Lightning callbacks (``callbacks``)."""
