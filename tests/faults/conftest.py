"""The fault tests' shared harness asserts too: let pytest rewrite its asserts as it does the tests'."""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("tests.faults.harness")
