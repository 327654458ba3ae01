"""Tools that work beside an optimizer rather than as one of its update rules.

- :mod:`~gradstep.tools.clipping`: ALF's gradient clipping around any optimizer (``GradientClipping``,
  ``clip_gradients``);
- :mod:`~gradstep.tools.trusted`: ALF's ``TrustedUpdater`` (undo a step that moved the parameters too far);
- :mod:`~gradstep.tools.derivative_free`: ALF's random-shooting and CEM trajectory optimizers;
- :mod:`~gradstep.tools.diagnostics`: the gradient noise scale (``GradientNoiseScaleEstimator``);
- :mod:`~gradstep.tools.projections`: GoMLX's monotonic projection;
- :mod:`~gradstep.tools.schedules`: GoMLX's cosine learning-rate schedule;
- :mod:`~gradstep.tools.checkpoint`: what an optimizer state_dict holds, and torch.optim state dicts converted.

They import the core and nothing from ``gradstep.integrations`` or ``gradstep.lab``.
"""
