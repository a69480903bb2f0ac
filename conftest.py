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
# unitary_lr.peft needs torch and a PEFT release it was tested with (checked
# from PEFT's metadata: importing PEFT takes seconds)
_peft_ok = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("packaging") is not None
if _peft_ok:
    from unitary_lr._peft_support import peft_problem

    _peft_ok = peft_problem() is None
if not _peft_ok:
    collect_ignore.append("unitary_lr/peft.py")
