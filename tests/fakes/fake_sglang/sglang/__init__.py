"""A fake `sglang` 0.5.23 for the SGLang adapter's contract tests (the real one needs CUDA).

It reproduces the API surface `adapters.sglang` uses, with the signatures and output shapes of
the 0.5.23 wheel's source (each module cites the lines it copies), driven by the deterministic
script in `sglang.fake_control` instead of a model. Only `tests/unit/test_sglang_contract.py`
puts the folder holding this package on `sys.path`.

Must never: invent a shape the real source does not have; be importable by accident (it is
named `sglang` and lives outside every package root).
"""

# real sglang/__init__.py exposes these two through LazyImport; plain imports are the same names
from sglang.srt.entrypoints.engine import Engine
from sglang.srt.server_args import ServerArgs
from sglang.version import __version__

__all__ = ["Engine", "ServerArgs", "__version__"]
