"""Where the shared-memory arena runs: x86-64 POSIX (stores and loads stay in program order)."""

import os
import platform

X86_64 = platform.machine().lower() in ("x86_64", "amd64") and os.name == "posix"
