"""Pixel-level face preparation, embedders and the faces stage (GENERATED -> SAMPLE rows)."""
