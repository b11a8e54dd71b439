"""The API process never imports torch (DESIGN §1): checked in a clean interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_api_app_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from api.app import create_app\n"
        "import api.files.router, api.fine_tuning.router, api.catalog.router\n"
        "heavy = ('torch', 'transformers', 'peft', 'trl', 'workers')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
