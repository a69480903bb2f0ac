"""Which PEFT releases :mod:`unitary_lr.peft` works with, answerable without
importing PEFT (which takes seconds: it imports transformers)."""

from __future__ import annotations

# [lowest, first untested): unitary_lr.peft fills PEFT's method tables and
# subclasses BaseTuner and BaseTunerLayer, all internal and changing between
# minor releases.
TESTED_PEFT_VERSIONS = ("0.21.0", "0.22.0")


def check_peft_version(version):
    """Raise ImportError, naming ``version`` and the tested range, unless the
    PEFT release ``version`` lies in ``TESTED_PEFT_VERSIONS``."""
    from packaging.version import InvalidVersion, Version

    lowest, untested = TESTED_PEFT_VERSIONS
    try:
        parsed = Version(version)
    except InvalidVersion:
        parsed = None
    # a dev or rc build of a tested release counts as that release
    if parsed is None or not Version(lowest) <= Version(parsed.base_version) < Version(untested):
        raise ImportError(
            f"unitary_lr.peft was tested with PEFT >= {lowest}, < {untested}; the installed PEFT is {version!r}. "
            f"It uses PEFT internals that change between releases: pip install 'peft>={lowest},<{untested}'"
        )


def peft_problem():
    """None when a tested PEFT is installed, else why not (one line); reads
    the installed version from its metadata, without importing PEFT."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("peft")
    except PackageNotFoundError:
        return "PEFT is not installed: pip install 'unitary-lr[peft]'"
    try:
        check_peft_version(installed)
    except ImportError as error:
        return str(error)
    return None
