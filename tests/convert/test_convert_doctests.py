"""The ``Example::`` blocks of the converter modules run and hold."""

from __future__ import annotations

import doctest

import recsys_mtl.data.convert


def test_docstring_examples():
    result = doctest.testmod(recsys_mtl.data.convert, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
