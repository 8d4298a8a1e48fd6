"""Integrations: the torch.distributed backend "collcomm" (:mod:`collcomm.integrations.torch`); Ray later.

Nothing is imported here: ``import torch`` loads :mod:`collcomm.integrations.torch` through its
entry point, which must stay cheap and side-effect free beyond registering the backend."""
