"""Data: text corpora and packing (:mod:`.text`); the procedural shapes world with exact readers (:mod:`.shapes`)."""
