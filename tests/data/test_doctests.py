"""The ``Example::`` blocks of the data modules' docstrings run and hold."""

from __future__ import annotations

import doctest

import pytest

import recsys_mtl.data.reader
import recsys_mtl.data.schema
import recsys_mtl.data.synth


@pytest.mark.parametrize("module", [recsys_mtl.data.schema, recsys_mtl.data.synth, recsys_mtl.data.reader])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
