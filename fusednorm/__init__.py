"""fusednorm: fused normalization kernels (Triton, C++/CUDA) with drop-in torch.nn modules.

Importing fusednorm is light: it registers the ``fusednorm::*`` custom ops and defines the modules, but does not
import Triton, load the native extension or query a GPU; backends load on first use.
"""

from fusednorm import functional
from fusednorm.backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)
from fusednorm.modules import *  # noqa: F403
from fusednorm.modules import __all__ as _module_names

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "functional",
    "get_backend",
    "set_backend",
    "use_backend",
    *_module_names,
]

# ==== model conversion (issue 7) =========================================================================
from fusednorm.convert import (  # noqa: E402 - after the modules, which convert looks up at call time
    ReplacementSummary,
    replace_norms,
    replacement_summary,
    restore_norms,
)

__all__ += ["ReplacementSummary", "replace_norms", "replacement_summary", "restore_norms"]
