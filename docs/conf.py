# Sphinx configuration (a stub: the documentation site is its own issue).
project = "unitary_lr"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
napoleon_numpy_docstring = True
html_theme = "alabaster"
