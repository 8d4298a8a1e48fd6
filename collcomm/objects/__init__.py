"""Objects in flight: put, get and reduce of named objects along trees built as participants arrive.

See :mod:`collcomm.objects.layer` (the calls), :mod:`.store`, :mod:`.server`, :mod:`.pull`,
:mod:`.wire`, :mod:`.stage` and :mod:`.reduce`; the directory is
:mod:`collcomm.coordinator.objects`.
"""

from collcomm.objects.layer import ObjectLayer

__all__ = ["ObjectLayer"]
