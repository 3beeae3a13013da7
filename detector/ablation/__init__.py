"""Ablation runner: the GFL paper's studies (Table 3, β of QFL, box representation, bins, L2 on
the joint score) as configurations of this repository's detector, run with resume, recorded
one CSV row per run, and reported beside the paper's figures.

Modules: :mod:`~detector.ablation.studies` (settings and paper figures),
:mod:`~detector.ablation.plan` (budgets, runs, run keys), :mod:`~detector.ablation.data`
(embedded or COCO-format data), :mod:`~detector.ablation.runner` (resume, jobs, progress),
:mod:`~detector.ablation.worker` (one run in its own process), :mod:`~detector.ablation.results`
(the CSVs), :mod:`~detector.ablation.report` / :mod:`~detector.ablation.plots` /
:mod:`~detector.ablation.publish` (tables and plots). Command line: ``python -m
detector.ablation --help``.
"""
