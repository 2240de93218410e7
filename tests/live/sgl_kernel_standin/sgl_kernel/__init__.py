"""Test stand-in for ``sgl_kernel`` on machines without its CPU build.

SGLang's CPU engine imports ``sgl_kernel``; the PyPI ``sglang-kernel`` wheel holds only CUDA
builds, whose ``__init__`` fails to load its ops without ``libcuda.so.1``, and the CPU build
is not on any registry these machines reach. Put this folder first on ``PYTHONPATH``: the
package then runs the installed wheel's own ``__init__`` and pure-Python submodules, with the
one module that loads native ops (``load_utils``) replaced by no-ops. ``torch.ops.sgl_kernel``
stays empty, so ``cpu_has_amx_support()`` is false and SGLang takes its plain-torch CPU
paths. Test scaffolding only: a real CPU deployment builds ``sgl_kernel`` for its CPU.
"""

import os
import sys
import types

_HERE = os.path.dirname(os.path.realpath(__file__))


def _installed_package_dir() -> str:
    """The installed wheel's ``sgl_kernel`` folder: the next one on sys.path after this one."""
    for entry in sys.path:
        candidate = os.path.realpath(os.path.join(entry or os.getcwd(), "sgl_kernel"))
        if candidate != _HERE and os.path.isfile(os.path.join(candidate, "load_utils.py")):
            return candidate
    raise ImportError("sgl_kernel stand-in: no installed sglang-kernel wheel on sys.path")


def _no_native_ops(*_args, **_kwargs):
    return None


__path__ = [_installed_package_dir()]
_load_utils = types.ModuleType(f"{__name__}.load_utils")
_load_utils._load_architecture_specific_ops = _no_native_ops
_load_utils._preload_cuda_library = _no_native_ops
sys.modules[_load_utils.__name__] = _load_utils

_wheel_init = os.path.join(__path__[0], "__init__.py")
with open(_wheel_init) as f:
    exec(compile(f.read(), _wheel_init, "exec"))
