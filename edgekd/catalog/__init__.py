"""The catalog: targets (how an artifact is produced and run) and device profiles (what a device is,
how to bench it, its budgets), one TOML file per entry under targets/ and profiles/.

``schema`` (frozen dataclasses and the checks of every key; a target's [options] are checked
against its backend's schema), ``loading`` (names, aliases, paths), ``preflight`` (what a target
will not accept or not accelerate). Must not import torch: bench runs on devices without it.
"""

from .loading import (as_dict, data_dir, list_profiles, list_targets, load_profile, load_target,  # noqa: F401
                      parse_profile, profile_names, resolve_profile, resolve_target, target_names)
from .preflight import LEVELS, preflight, require_deployable  # noqa: F401
from .schema import (MAX_BATCH_SIZES, MAX_BITS, MIN_BITS, PERCENTILES, BenchSettings, Budgets, Clocks,  # noqa: F401
                     Conventions, Profile, Target, Tolerance, bits_text, check_bench, parse_target)
