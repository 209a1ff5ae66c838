"""The command runner, with real processes."""

from __future__ import annotations

import json
import sys

import pytest

from agentiso.privhelper.storage.errors import BackendUnavailable, CommandFailed
from agentiso.privhelper.storage.runner import Runner

pytestmark = pytest.mark.anyio


async def test_success_captures_output() -> None:
    res = await Runner().run(
        [sys.executable, "-c", "print('out'); import sys; print('err', file=sys.stderr)"]
    )
    assert (res.returncode, res.stdout, res.stderr) == (0, "out\n", "err\n")


async def test_failure_is_typed_with_stderr() -> None:
    argv = [
        sys.executable,
        "-c",
        "import sys; print('cannot destroy: busy', file=sys.stderr); sys.exit(3)",
    ]
    with pytest.raises(CommandFailed) as err:
        await Runner().run(argv)
    assert err.value.returncode == 3
    assert "busy" in err.value.stderr
    assert err.value.code == "internal"
    res = await Runner().run(argv, check=False)
    assert res.returncode == 3


async def test_missing_program_is_unavailable() -> None:
    with pytest.raises(BackendUnavailable):
        await Runner().run(["agentiso-no-such-program-xyz"])


async def test_timeout_kills() -> None:
    with pytest.raises(CommandFailed, match="timed out"):
        await Runner(timeout_s=0.3).run([sys.executable, "-c", "import time; time.sleep(30)"])


async def test_environment_is_minimal_and_c_locale() -> None:
    code = "import json, os; print(json.dumps(sorted(os.environ)))"
    names = json.loads((await Runner().run([sys.executable, "-c", code])).stdout)
    assert "LC_ALL" in names and set(names) <= {"LC_ALL", "PATH", "LC_CTYPE"}
