"""The lab: what stands behind the ``gradstep`` command line, apart from the library.

- :mod:`~gradstep.lab.cli`: the command line, one module per command;
- :mod:`~gradstep.lab.tasks`: the small offline tasks optimizers are compared on, one module per task family;
- :mod:`~gradstep.lab.plots` and :mod:`~gradstep.lab.report`: the pictures (matplotlib) and the HTML report;
- :mod:`~gradstep.lab.bench` (``gradstep bench``), :mod:`~gradstep.lab.bench_fsdp` (``python -m
  gradstep.lab.bench_fsdp``) and :mod:`~gradstep.lab.peers`, the other libraries' optimizers they time.

The lab imports the library; the library never imports the lab (tests/test_architecture.py checks it), so
``import gradstep`` loads none of the lab's dependencies (matplotlib, scikit-learn, tqdm).
"""
