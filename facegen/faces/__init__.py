"""Face detection (detect), alignment (align), embedders (embed) and the faces stage (GENERATED -> SAMPLE rows)."""
