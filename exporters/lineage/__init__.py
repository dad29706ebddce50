"""Lineage to a relational store: the schema and its migrations (``schema``), the merging
store and its exporter (``store``), and the spool used while the database is away
(``spool``)."""
