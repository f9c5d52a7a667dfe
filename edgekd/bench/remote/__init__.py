"""Bench on a device over SSH: ``edgekd bench BUNDLE... --host [USER@]HOST[:PORT]``.

For each host, in order, through the system OpenSSH client (``ssh``; one connection per host and
run, shared by every step through ControlMaster). The system client, rather than a Python SSH
library, because it is what users already configured: ``~/.ssh/config`` aliases, ProxyJump,
agents, hardware keys and known_hosts work as in a terminal, and nothing is added to install.

1. ``python3 --version`` there (or ``--remote-python PATH``): Python >= 3.10, else a ``python``
   error. This first call also tells an unreachable host from refused authentication.
2. ``probe``: removes temporary upload folders of runs that died (a folder whose lock no live
   process holds), reports free space and which files the device already has. Bundles live under
   ``<dir>/bundles/<sha256 of manifest.json>/<bundle folder>/``; one whose files no longer match
   its manifest is deleted and sent again. ``<dir>`` is ``~/.cache/edgekd`` by default. edgekd
   deletes only what it wrote, so ``<dir>`` must be edgekd's own: probe creates it (mode 0700)
   or takes it when empty, and marks it with ``.edgekd-dir``; a folder holding other files, the
   home or root folder, or a symbolic link (as ``<dir>`` or anywhere inside it) is refused
   (``upload`` stage), and ``--remote-dir`` values such as '', '~', '/' or '/tmp' are refused here.
3. ``receive``: what is missing (bundles, the edgekd wheel, a profile file, wheelhouse files)
   goes as one tar stream into ``<dir>/incoming/<tmp>/``, is checked (sizes, sha256, the bundle's
   own hashes) and only then renamed into place. Only regular files travel (a bundle holding a
   symbolic link is refused here), each with at most its permission bits here. An interrupted upload leaves no partial copy
   anywhere else, and the next run deletes the temporary folder.
4. ``run``: prepares ``<dir>/<version>/venv`` once (``python -m venv``, then ``pip install`` of the
   wheel's ``device`` extra plus the extras of the bundles' backends, then the wheel with
   ``--no-deps``; ``--system-site-packages`` uses ``venv-system-site`` instead, for JetPack's
   TensorRT), with a stamp written last so an interrupted preparation starts over. Then, only
   with ``--set-clocks``, applies the profile's ``[clocks]`` (sudo -n; failures are reported,
   not fatal; the previous settings are restored afterwards), and runs ``edgekd bench`` there
   with the profile and the settings given here. The rows come back as JSON.

The remote steps are a small stdlib-only Python program (``agent_base``, ``agent_clocks``,
``agent``, joined) sent with each command, so the device needs nothing but Python, a POSIX shell
and SSH. While it runs it watches its stdin: when the connection closes (Ctrl-C here, a dropped
link) it stops the benchmark or pip, restores clocks and cleans up instead of running on. Each
call runs there as its own process group; the Python check and the probe have a time limit
(``RemoteOptions.step_timeout``), after which that group is ended there, not only ssh here.

``bench_remote`` returns the device's bench rows (the ``bench --json`` contract) with ``host``,
``remote_path`` and ``stage`` added (``stage`` is None unless the row is an error of this
package). A host that fails yields one ``error`` row per bundle naming the host and the stage
(STAGES); the other hosts still run. Ctrl-C raises ``Interrupted``. Never prints; progress goes
to ``log``.

Modules: ``ssh`` (hosts, options, the connection and what its failures mean), ``wheel`` (the
wheel of the running package), ``plan`` (what to ship), ``run`` (``bench_remote``), ``rows``
(rows, the host column, footer lines), ``agent*`` (the device side).
"""

from .plan import DEFAULT_CLOCKS, clock_settings  # noqa: F401
from .rows import HOST_COLUMN, TABLE_COLUMNS, exit_code, footer  # noqa: F401
from .run import bench_remote  # noqa: F401
from .ssh import DEFAULT_REMOTE_DIR, Host, Interrupted, RemoteOptions, agent_source, parse_host  # noqa: F401
from .wheel import build_wheel, device_requirements  # noqa: F401

STAGES = ("unreachable", "auth", "host key", "python", "space", "upload", "runtime", "bench", "interrupted")
