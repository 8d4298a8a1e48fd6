"""collcomm inside other frameworks: each subpackage or module makes collcomm the communication layer
of one framework, and imports that framework only when it is used.

* :mod:`collcomm.integrations.torch`: the ``torch.distributed`` backend "collcomm", registered on
  ``import torch`` through the ``torch.backends`` entry point.
* :mod:`collcomm.integrations.ray`: a ``ray.util.collective`` backend "collcomm", a Ray tensor
  transport "collcomm", and handles for Ray objects moved through collcomm's object layer
  (``import collcomm.integrations.ray`` registers the first two; it needs the extra ``ray``).

Nothing is imported here: ``import torch`` loads :mod:`collcomm.integrations.torch` through its
entry point, which must stay cheap and side-effect free beyond registering the backend."""
