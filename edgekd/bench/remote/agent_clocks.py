"""Device side, part 2 of 3: clock settings, applied only with ``--set-clocks``, restored afterwards.

``spec`` is the profile's ``[clocks]`` table: ``governor`` (cpufreq governor of every CPU, or
None), ``jetson_clocks`` (on a Jetson: lock the clocks at the power mode's maximum, storing the
previous state first) and ``nvpmodel`` (a power mode ID, or a mode name looked up in
/etc/nvpmodel.conf, whose ``< POWER_MODEL ID=n NAME=... >`` lines NVIDIA documents). As root the
files are written directly, otherwise through ``sudo -n`` (never a password prompt). A setting
that cannot be applied is reported in ``failed``, never fatal.
"""

import glob
import os
import re
import tempfile

if __package__:  # imported as part of edgekd; on the device the parts share one namespace
    from .agent_base import last_error, read_text, remove

NVPMODEL_CONF = "/etc/nvpmodel.conf"


def euid():
    return os.geteuid()


def as_root(argv):
    return list(argv) if euid() == 0 else ["sudo", "-n"] + list(argv)


def write_as_root(files, value, child):
    """None when ``value`` went into every file, else why not."""
    if euid() == 0:
        try:
            for path in files:
                with open(path, "w") as f:
                    f.write(value)
            return None
        except OSError as e:
            return "%s: %s" % (e.filename, e.strerror)
    rc, tail = child.run(["sudo", "-n", "tee"] + list(files), input=value + "\n")
    return None if rc == 0 else (last_error(tail, rc) + " (sudo -n: allow it without a password, or set it yourself)")


def nvpmodel_mode(child):
    rc, tail = child.run(["nvpmodel", "-q"])
    numbers = [line.strip() for line in tail if line.strip().isdigit()]
    return int(numbers[-1]) if rc == 0 and numbers else None


def nvpmodel_id(mode, conf=NVPMODEL_CONF):
    """(mode ID, None), or (None, why not) for a name that /etc/nvpmodel.conf does not define."""
    if isinstance(mode, int) or str(mode).isdigit():
        return int(mode), None
    modes = re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+)\s*>", read_text(conf) or "")
    for number, name in modes:
        if name.lower() == str(mode).lower():
            return int(number), None
    known = ", ".join("%s (%s)" % (name, number) for number, name in modes) or "none found"
    return None, "no power mode named %s in %s (modes: %s)" % (mode, conf, known)


def _set_governor(governor, child, sysfs, report, undo):
    files = sorted(glob.glob(os.path.join(sysfs, "devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")))
    before = {path: read_text(path) for path in files}
    if not files:
        report["failed"].append("cpu governor %s: no cpufreq scaling_governor here" % governor)
    elif set(before.values()) == {governor}:
        report["applied"].append("cpu governor already %s" % governor)
    else:
        report["before"]["cpu_governor"] = sorted(set(v or "?" for v in before.values()))
        error = write_as_root(files, governor, child)
        if error:
            report["failed"].append("cpu governor %s: %s" % (governor, error))
        else:
            was = ",".join(report["before"]["cpu_governor"])
            report["applied"].append("cpu governor %s (was %s)" % (governor, was))
            undo.append(("governor", before))


def _set_nvpmodel(mode, child, conf, report, undo):
    wanted, why = nvpmodel_id(mode, conf)
    if wanted is None:
        report["failed"].append("nvpmodel %s: %s" % (mode, why))
        return
    current = nvpmodel_mode(child)
    report["before"]["nvpmodel"] = current
    if current == wanted:
        report["applied"].append("nvpmodel already mode %s" % wanted)
        return
    rc, tail = child.run(as_root(["nvpmodel", "-m", str(wanted)]))
    if rc == 0:
        report["applied"].append("nvpmodel mode %s (was %s)" % (wanted, current))
        if current is not None:
            undo.append(("nvpmodel", current))
    else:
        report["failed"].append("nvpmodel -m %s: %s" % (wanted, last_error(tail, rc)))


def _set_jetson_clocks(child, report, undo):
    fd, store = tempfile.mkstemp(prefix="edgekd-jetson-clocks-")
    os.close(fd)
    rc, tail = child.run(as_root(["jetson_clocks", "--store", store]))
    if rc == 0:
        rc, tail = child.run(as_root(["jetson_clocks"]))
    if rc == 0:
        report["applied"].append("jetson_clocks")
        undo.append(("jetson_clocks", store))
    else:
        report["failed"].append("jetson_clocks: %s" % last_error(tail, rc))
        remove(store)


def set_clocks(spec, child, sysfs="/sys", tegra="/etc/nv_tegra_release", conf=NVPMODEL_CONF):
    """Apply ``spec`` ({"governor", "jetson_clocks", "nvpmodel"}); returns (report, undo steps).
    The power mode goes first: jetson_clocks locks the clocks of the mode in force."""
    report = {"requested": spec, "applied": [], "failed": [], "restored": [], "before": {}}
    undo = []
    if spec.get("governor"):
        _set_governor(spec["governor"], child, sysfs, report, undo)
    jetson = os.path.exists(tegra)
    if spec.get("nvpmodel") is not None and jetson:
        _set_nvpmodel(spec["nvpmodel"], child, conf, report, undo)
    if spec.get("jetson_clocks") and jetson:
        _set_jetson_clocks(child, report, undo)
    return report, undo


def restore_clocks(report, undo, child):
    for kind, value in reversed(undo):
        if kind == "governor":
            errors = [write_as_root([path], old, child) for path, old in value.items() if old]
            errors = [e for e in errors if e]
            (report["failed"] if errors else report["restored"]).append(
                "cpu governor restore: %s" % errors[0] if errors else "cpu governor")
        elif kind == "nvpmodel":
            rc, tail = child.run(as_root(["nvpmodel", "-m", str(value)]))
            (report["restored"] if rc == 0 else report["failed"]).append(
                "nvpmodel mode %s" % value if rc == 0 else "nvpmodel restore: %s" % last_error(tail, rc))
        elif kind == "jetson_clocks":
            rc, tail = child.run(as_root(["jetson_clocks", "--restore", value]))
            (report["restored"] if rc == 0 else report["failed"]).append(
                "jetson_clocks" if rc == 0 else "jetson_clocks --restore: %s" % last_error(tail, rc))
            remove(value)
