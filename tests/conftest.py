import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Ray (the Ray integration's tests) reads these when imported: keep its nodes on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 127.0.0.1 shared by the Ray integration's tests (tests/rayjobs.py); skips
    when Ray is not installed (the extra ``ray``)."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
    import rayjobs

    ray = rayjobs.local_ray()
    yield ray
    rayjobs.stop()
