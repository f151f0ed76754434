"""One rule per layer type (:mod:`~t2v_lightning.fisher.layers.rule`), kept in one table
(:mod:`~t2v_lightning.fisher.layers.table`, which says how to add a type)."""
