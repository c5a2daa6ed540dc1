"""Triton 3.6's interpreter on numpy >= 2.4.

While it interprets a kernel, triton.runtime.interpreter._patch_lang_tensor gives tl.tensor an
`__index__` of `int(self.handle.data)`. A scalar there is a one-element 1-d array, and numpy 2.4
turned int() of such an array from a deprecation into `TypeError: only 0-dimensional arrays can be
converted to Python scalars`, so every kernel that uses a tensor as an index (a loop bound, a
shape) fails. Triton 3.9 reads `int(self.handle.data.squeeze())`; `apply()` installs that same
`__index__` after the interpreter's own patch, and only where the interpreter's one fails.
"""
import types

import numpy as np


def _index(tensor) -> int:
    return int(tensor.handle.data.squeeze())


def _index_fails(index) -> bool:
    one_element = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.zeros(1, dtype=np.int32)))
    try:
        index(one_element)
    except TypeError:
        return True
    return False


def apply():
    from triton.runtime import interpreter

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is None or getattr(patch_lang_tensor, "numpy_compat", False):
        return

    def patch_with_compatible_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        if _index_fails(tensor.__index__):
            scope.set_attr(tensor, "__index__", _index)  # restored with the interpreter's patches

    patch_with_compatible_index.numpy_compat = True
    interpreter._patch_lang_tensor = patch_with_compatible_index
