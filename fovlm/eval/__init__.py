"""Evaluation: multiple-choice scoring in the three modes, benchmark adapters, reports, baselines, attention maps."""
