"""Collection rules for the docstring examples (pytest --doctest-modules).

``__main__`` would run the command on import; the adapters' modules need their
frameworks, and are left out (not failed) where those are not installed, as
their tests are.
"""

import importlib.util

collect_ignore = ["unitary_lr/__main__.py"]
if importlib.util.find_spec("torch") is None:
    collect_ignore.append("unitary_lr/torch")
if importlib.util.find_spec("jax") is None or importlib.util.find_spec("optax") is None:
    collect_ignore.append("unitary_lr/optax.py")
