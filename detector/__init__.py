"""ATSS + GFL one-stage detector built on gfl_ops (README.md, "The detector"; where it sits:
docs/architecture.md).

Layout, lowest layer first (a module imports only its own layer and those below; checked by
``tests/test_import_layers.py``):

``ops/``, ``data/``       box arithmetic; COCO-format datasets, transforms, loaders, embedded data
``config/``               every configuration: ``schema.py`` (ModelConfig, the run's data /
                          train settings), ``experiments.py`` (the named ones),
                          ``overrides.py`` (``section.key=value``)
``models/``               the network with its ATSS assignment, loss and post-processing
``metrics.py``            COCO AP and score–IoU Pearson of COCO-format detections
``checkpoint.py``         checkpoint files: atomic write, read, load a model for inference
``engine/``               training loop, evaluation loop, distributed set-up, resume, logs
``train.py``, ``eval.py``, ``infer.py``, ``main_job.py``
                          the commands (``python -m detector.train`` ...)
``export.py``             ONNX export; ``ablation/``: the paper's ablation runner

``losses.py`` and ``assigners.py`` are the old import paths of ``models/losses.py`` and
``models/assigners.py``, kept while ``benchmarks/`` uses them.
"""
