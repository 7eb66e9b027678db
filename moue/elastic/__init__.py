"""Elastic training: one run trains a family of sub-models (depth, width, top-k).

- ``moue.elastic.config``: the ``elastic:`` config section and its rules;
- ``moue.elastic.submodel``: what a sub-model is, which layers and experts it keeps, the family;
- ``moue.elastic.schedule``: the sub-model of each optimizer step;
- ``moue.elastic.apply``: putting a sub-model onto a built model (the only place that does);
- ``moue.elastic.extract``: a sub-model taken out as a model of its own (config and weights;
  ``moue-export`` in ``moue.commands.export`` writes it).

docs/elastic.md describes the semantics and the decisions.
"""
