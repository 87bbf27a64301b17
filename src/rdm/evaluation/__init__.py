"""Measuring samples: ``rdm eval``.

- :mod:`~rdm.evaluation.metrics`     FD, KID, precision / recall, density / coverage on features
- :mod:`~rdm.evaluation.features`    extractors (``inception``, ``clip``, ``classifier``) -> (N, F)
- :mod:`~rdm.evaluation.inception`   the FID Inception layout and its local weights file
- :mod:`~rdm.evaluation.classifier`  the domain classifier (training, saving, loading)
- :mod:`~rdm.evaluation.images`      the model view: real images prepared as training saw them
- :mod:`~rdm.evaluation.stats`       colour statistics, faithfulness, memorisation
- :mod:`~rdm.evaluation.cache`       real-data features cached without pickle
- :mod:`~rdm.evaluation.generate`    conditionings + sampling through the public pipeline API
- :mod:`~rdm.evaluation.evaluate`    the whole measurement; :mod:`~rdm.evaluation.report` its tables
"""
