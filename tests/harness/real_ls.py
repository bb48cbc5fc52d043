"""The real Lightning Stream binary for the tests that need one, by the demo's rule
(:mod:`lssupervisor.testing.lsbinary`): ``$LIGHTNINGSTREAM_BIN``, else ``lightningstream`` on PATH,
else the test skips saying which of the two was missing."""

from __future__ import annotations

import pytest

from lssupervisor.testing.lsbinary import find_real_ls


def real_ls_binary() -> str:
    """The real LS's absolute path, or skip the calling test with the reason."""
    found = find_real_ls()
    if found.path is None:
        pytest.skip(f"needs the real Lightning Stream: {found.how}")
    return found.path
