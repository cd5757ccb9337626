"""A site process runs no server code: importing the site's command loads neither the server, its
aggregation, nor the gRPC service (the transport's shared limits live in ``transport/limits.py``)."""

from __future__ import annotations

import subprocess
import sys


def test_the_site_command_imports_no_server_code() -> None:
    code = ("import sys, fedbone_med.cli.site, fedbone_med.site.networked; "
            "print(sorted(m for m in sys.modules if m.startswith(('fedbone_med.server', 'fedbone_med.aggregation', "
            "'fedbone_med.transport.grpc_service'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"the site imports server code: {out}"
