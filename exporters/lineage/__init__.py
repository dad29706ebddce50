"""Lineage to a relational store: the schema and its migrations (``schema``), URLs and
engines (``engine``), the merging store (``store``), its pipeline exporter
(``exporter``), and the spool used while the database is away (``spool``)."""
