"""Training frameworks: :mod:`~gradsurgery.integrations.lightning` (``GradSurgeryMixin`` for
``self.manual_backward(losses)``) and :mod:`~gradsurgery.integrations.accelerate` (what
``gs.backward(opt, losses, accelerator=acc)`` applies). Imported only when used; neither imports its
framework, and ``import gradsurgery`` imports neither.
"""
