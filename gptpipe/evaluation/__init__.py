"""Evaluation maths and pictures (no I/O): prompting and sampling G.pt (``sampling``), optimiser
baselines (``baselines``), memorisation and landscape checks (``checks``), plots and report text
(``report``)."""
