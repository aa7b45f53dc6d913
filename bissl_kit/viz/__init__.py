"""Presentation: every plotly, ipywidgets and kaleido piece of the kit, one module per idea.

* :mod:`~bissl_kit.viz.figures`: live figures (a plotly ``FigureWidget`` in JupyterLab, a static figure
  headless), HTML/PNG export, static display;
* :mod:`~bissl_kit.viz.tables`: Markdown tables for notebooks;
* :mod:`~bissl_kit.viz.pretrain`, :mod:`~bissl_kit.viz.bilevel`, :mod:`~bissl_kit.viz.finetune`,
  :mod:`~bissl_kit.viz.features`, :mod:`~bissl_kit.viz.compare`: the figures and widgets of notebooks
  01–05, fed with the records and results of the stage of the same name.

The stages themselves import none of this (tests/test_packaging.py checks it), so that a training
process on a cluster needs no plotting library.
"""
