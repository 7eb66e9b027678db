"""Elastic training: one run trains a family of sub-models (depth, width, top-k).

- ``moue.elastic.config``: the ``elastic:`` config section and its rules;
- ``moue.elastic.submodel``: what a sub-model is, which layers and experts it keeps, the family;
- ``moue.elastic.schedule``: the sub-model of each optimizer step;
- ``moue.elastic.apply``: putting a sub-model onto a built model (the only place that does);
- ``moue.elastic.export``: ``moue-export``, a standalone checkpoint of one sub-model.

docs/elastic.md describes the semantics and the decisions.
"""
