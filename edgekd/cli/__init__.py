"""The edgekd command line: click only. Commands parse options, call one pipeline function,
render the result and set the exit code. User errors (edgekd.core.errors.EdgekdError) become one
line on stderr and exit code 2. Heavy imports (torch, brevitas) happen inside the commands.

``app`` (the group), ``common`` (options from the options table), one module per stage:
``training`` (train, distill, quantize), ``deploy`` (export, compile), ``benching`` (bench, sweep),
``catalog`` (targets, profiles, check), ``explain`` (per-layer errors); ``render`` holds the catalog's tables.
"""

from . import benching, catalog, deploy, explain, training  # noqa: F401  (register the commands)
from .app import main  # noqa: F401
