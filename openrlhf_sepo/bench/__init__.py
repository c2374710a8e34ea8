"""The benchmark harness: ``runner`` (the output dir, stages, launches, resume markers, and the benchmark and
sweep modes), ``stats`` (means, 95% intervals, paired differences), and one spec per task: ``keywords`` (the demo,
``make demo``; its report in ``keywords_report``) and ``style`` (the TKPO benchmark); ``regime_map`` runs the
demo's spec once per cell of a grid of testbed tasks and maps its paired differences. Each spec's tuned settings
sit beside it (``demo_settings.json``, ``tkpo_settings.json``). The harness sits above the library: nothing in the
library imports it, and it imports no ``openrlhf_sepo.cli`` module."""
